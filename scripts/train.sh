#!/usr/bin/env bash
# Train one config on all GPUs of this node with torchrun; resumes an interrupted run, skips a finished one.
#
#   scripts/train.sh configs/imagenet/resnet50_simam.toml /data/imagenet [main_imagenet.py flags...]
#   scripts/train.sh configs/coco/mask_rcnn_resnet50_simam.toml /data/coco [main_coco.py flags...]
#
# Extra flags override the config (e.g. --ckpt runs --amp bf16 --channels-last --seed 0).
# Environment: NPROC (processes; default: visible GPUs, or 1 on a CPU machine), WORKERS (data loading
# workers for the node, shared by its processes; default: its CPU count), PYTHON (default: .venv's),
# RUN_LIST (a file to append the run folder to; set by reproduce_imagenet.sh).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG DATA [main_imagenet.py / main_coco.py flags...]" >&2
    exit 2
fi
CONFIG=$1 DATA=$2
shift 2
[ -f "$CONFIG" ] || { echo "error: config file not found: $CONFIG" >&2; exit 1; }
[ -d "$DATA" ] || { echo "error: data folder not found: $DATA" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
WORKERS=${WORKERS:-$(nproc)}

# new | resume | done, the script (main_coco.py for configs/coco/, else main_imagenet.py), then the run
# folder or checkpoint (tab-separated, last: paths may hold spaces), decided by the trainer's own parser.
IFS=$'\t' read -r STATE SCRIPT WHERE < <("$PYTHON" "$ROOT/scripts/launch_plan.py" "$DATA" --config "$CONFIG" "$@")
if [ -n "${RUN_LIST:-}" ]; then  # reproduce_imagenet.sh collects the run folders
    if [ "$STATE" = resume ]; then dirname "$WHERE"; else echo "$WHERE"; fi >> "$RUN_LIST"
fi
case "$STATE" in
    done)   echo "=> $CONFIG: finished ($WHERE); skipping"; exit 0 ;;
    resume) echo "=> $CONFIG: resuming from $WHERE"; set -- --resume "$WHERE" "$@" ;;
    new)    echo "=> $CONFIG: new run in $WHERE" ;;
    *)      exit 1 ;;  # the helper has printed why
esac

# torchrun without its ~30-line report after a rank's one `error:` line (scripts/torchrun_quiet.py)
exec "$PYTHON" "$ROOT/scripts/torchrun_quiet.py" --standalone --nproc_per_node="$NPROC" \
    "$ROOT/$SCRIPT" "$DATA" --config "$CONFIG" -j "$WORKERS" "$@"
