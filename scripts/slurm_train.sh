#!/usr/bin/env bash
# One run on several nodes under SLURM: one torchrun per node, rendezvous on the first node.
# Resumes an interrupted run and skips a finished one, like scripts/train.sh; saves and requeues
# itself before the time limit.
#
#   sbatch --nodes=4 scripts/slurm_train.sh configs/imagenet/resnet101_simam.toml /data/imagenet [flags...]
#   sbatch scripts/slurm_train.sh none /data/imagenet -a resnet50 --attention_type simam --attention_param 0.1
#   sbatch --nodes=2 scripts/slurm_train.sh configs/coco/faster_rcnn_resnet50_simam.toml /data/coco [flags...]
#
# CONFIG may be `none` (flags only). -b is the TOTAL batch over all nodes (256 in the paper's recipe:
# with 4 nodes of 8 GPUs that is 8 images per GPU; scale --lr with -b if you change it). Submit from
# the repository root so the default --ckpt (checkpoints/) lands there, or pass --ckpt on a shared
# file system. Environment: GPUS_PER_NODE (default 8), WORKERS (per node; default: CPUs given to the
# task), PYTHON, PORT (the rendezvous port on the first node, default 29500).
#
# Time limit and preemption: SLURM sends SIGUSR1 to this script 5 minutes before the limit
# (--signal=B:USR1@300). The script passes SIGTERM to srun, which hands it to torchrun and torchrun to
# every training process: they finish the running iteration, write checkpoint.pth.tar (with the
# position inside the epoch), exit, and the script requeues the job (scontrol requeue); the requeued
# job finds the checkpoint and resumes at that iteration. A SIGTERM to this script (preemption,
# scancel) saves the same way but does not requeue: SLURM requeues preempted jobs itself when the
# partition says so (PreemptMode=REQUEUE), and a scancel means stop.
#SBATCH --job-name=simam
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: sbatch [--nodes=N] $0 CONFIG|none DATA [main_imagenet.py / main_coco.py flags...]" >&2
    exit 2
fi
CONFIG=$1 DATA=$2
shift 2
CONFIG_ARGS=()
if [ "$CONFIG" != none ]; then
    [ -f "$CONFIG" ] || { echo "error: config file not found: $CONFIG" >&2; exit 1; }
    CONFIG_ARGS=(--config "$CONFIG")
fi
[ -d "$DATA" ] || { echo "error: data folder not found: $DATA" >&2; exit 1; }

# sbatch runs a copy of this file from the spool folder: find the repository from the submit folder.
ROOT=${ROOT:-$SLURM_SUBMIT_DIR}
[ -f "$ROOT/main_imagenet.py" ] || { echo "error: submit from the repository root or set ROOT" >&2; exit 1; }
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-8}}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

IFS=$'\t' read -r STATE SCRIPT WHERE < <("$PYTHON" "$ROOT/scripts/launch_plan.py" "$DATA" "${CONFIG_ARGS[@]}" "$@")
case "$STATE" in
    done)   echo "=> $CONFIG: finished ($WHERE); skipping"; exit 0 ;;
    resume) echo "=> $CONFIG: resuming from $WHERE"; set -- --resume "$WHERE" "$@" ;;
    new)    echo "=> $CONFIG: new run in $WHERE" ;;
    *)      exit 1 ;;
esac

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER:${PORT:-29500}" \
    "$ROOT/$SCRIPT" "$DATA" "${CONFIG_ARGS[@]}" -j "$WORKERS" "$@" &
SRUN=$!

stop_run() {  # $1: USR1 (the time limit is near: save and requeue) or TERM (save and stop)
    echo "=> $(date '+%F %T') SIG$1: asking the run to save its checkpoint and stop"
    kill -TERM "$SRUN" 2>/dev/null || true
    local status=0
    wait "$SRUN" || status=$?
    if [ "$1" = USR1 ]; then
        scontrol requeue "$SLURM_JOB_ID" && echo "=> requeued job $SLURM_JOB_ID: it resumes from the checkpoint"
    fi
    exit "$status"
}
trap 'stop_run USR1' USR1
trap 'stop_run TERM' TERM
status=0
wait "$SRUN" || status=$?  # a trapped signal interrupts this wait and runs stop_run
exit "$status"
