#!/usr/bin/env bash
# One config on several nodes under SLURM: one torchrun per node, rendezvous on the first node.
# Resumes an interrupted run and skips a finished one, like scripts/train.sh.
#
#   sbatch --nodes=4 scripts/slurm_train.sh configs/imagenet/resnet101_simam.toml /data/imagenet [flags...]
#   sbatch --nodes=2 scripts/slurm_train.sh configs/coco/faster_rcnn_resnet50_simam.toml /data/coco [flags...]
#
# -b in the config is the TOTAL batch over all nodes (256 in the paper's recipe: with 4 nodes of
# 8 GPUs that is 8 images per GPU; scale --lr with -b if you change it). Submit from the repository
# root so the default --ckpt (checkpoints/) lands there, or pass --ckpt on a shared file system.
# Environment: GPUS_PER_NODE (default 8), WORKERS (per node; default: CPUs given to the task), PYTHON.
#SBATCH --job-name=simam
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: sbatch [--nodes=N] $0 CONFIG DATA [main_imagenet.py / main_coco.py flags...]" >&2
    exit 2
fi
CONFIG=$1 DATA=$2
shift 2
[ -f "$CONFIG" ] || { echo "error: config file not found: $CONFIG" >&2; exit 1; }
[ -d "$DATA" ] || { echo "error: data folder not found: $DATA" >&2; exit 1; }

# sbatch runs a copy of this file from the spool folder: find the repository from the submit folder.
ROOT=${ROOT:-$SLURM_SUBMIT_DIR}
[ -f "$ROOT/main_imagenet.py" ] || { echo "error: submit from the repository root or set ROOT" >&2; exit 1; }
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-8}}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

read -r STATE WHERE SCRIPT < <(PYTHONPATH="$ROOT" "$PYTHON" -m utils.runs plan "$DATA" --config "$CONFIG" "$@")
case "$STATE" in
    done)   echo "=> $CONFIG: finished ($WHERE); skipping"; exit 0 ;;
    resume) echo "=> $CONFIG: resuming from $WHERE"; set -- --resume "$WHERE" "$@" ;;
    new)    echo "=> $CONFIG: new run in $WHERE" ;;
    *)      exit 1 ;;
esac

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER:29500" \
    "$ROOT/$SCRIPT" "$DATA" --config "$CONFIG" -j "$WORKERS" "$@"
