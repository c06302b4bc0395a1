#!/usr/bin/env bash
# Example SLURM launcher: one torchrun per node, one process per GPU, DDP over nccl.
#
#   sbatch scripts/slurm_imagenet.sh /path/to/imagenet -a resnet50 --attention_type simam --attention_param 0.1 --epochs 100
#
# -b stays the total batch over all processes (256 over 2 nodes x 4 GPUs = 32 per GPU), -j the
# loader workers per node. Resubmitting with `--resume <ckpt>/<run>/checkpoint.pth.tar` continues a run.
#SBATCH --job-name=simam-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

# srun starts one torchrun per node; torchrun starts the per-GPU processes and sets RANK,
# LOCAL_RANK and WORLD_SIZE, which main_imagenet.py reads.
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD_NODE:$PORT" \
    main_imagenet.py "$@"
