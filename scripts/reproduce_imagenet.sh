#!/usr/bin/env bash
# The paper's ImageNet comparison: its 24 configs (six networks x none/se/cbam/simam) in turn on this node,
# then the table (CONFIGS="configs/imagenet/*_eca.toml ..." runs others, e.g. the later modules).
# Finished runs are skipped and interrupted ones resumed (scripts/train.sh), so just run it again
# after a crash or a reboot.
#
#   scripts/reproduce_imagenet.sh /data/imagenet [main_imagenet.py flags...]     e.g. --amp bf16 --ckpt runs
#
# It first checks the dataset's layout (scripts/prepare_imagenet.py --check) and stops at the first
# failing run. Environment: CONFIGS (the configs to run, in order; default: all 24 in the table's
# order), CHECK_ARGS (extra flags for the layout check), and train.sh's NPROC, WORKERS, PYTHON.
# Results: results.md (markdown table) and results.csv in the --ckpt folder (default: checkpoints/).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 DATA [main_imagenet.py flags...]" >&2
    exit 2
fi
DATA=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
export PYTHON

# An array: the repository's path (and a config's) may hold spaces. CONFIGS from the environment is
# split at newlines when it has any (paths with spaces), else at spaces.
configs=()
if [ -z "${CONFIGS:-}" ]; then
    for arch in resnet18 resnet34 resnet50 resnet101 resnext50_32x4d mobilenet_v2; do
        for att in none se cbam simam; do
            configs+=("$ROOT/configs/imagenet/${arch}_${att}.toml")
        done
    done
elif [[ "$CONFIGS" == *$'\n'* ]]; then
    mapfile -t configs < <(printf '%s\n' "$CONFIGS" | sed '/^[[:space:]]*$/d')
else
    # shellcheck disable=SC2206  # split at spaces and expand globs (CONFIGS="configs/imagenet/*_eca.toml")
    configs=($CONFIGS)
fi

# shellcheck disable=SC2086  # CHECK_ARGS is a list of flags
"$PYTHON" "$ROOT/scripts/prepare_imagenet.py" --check "$DATA" ${CHECK_ARGS:-}

# train.sh appends each config's run folder to RUN_LIST: the table covers exactly these runs.
RUN_LIST=$(mktemp)
trap 'rm -f "$RUN_LIST"' EXIT
export RUN_LIST
for cfg in "${configs[@]}"; do
    "$ROOT/scripts/train.sh" "$cfg" "$DATA" "$@" || { echo "error: $cfg failed; fix it and run this again" >&2; exit 1; }
done

mapfile -t RUNS < "$RUN_LIST"
OUT=$(dirname "${RUNS[0]}")   # the --ckpt folder
"$PYTHON" "$ROOT/scripts/make_table.py" "${RUNS[@]}" --write-csv "$OUT/results.csv" | tee "$OUT/results.md"
echo "=> wrote $OUT/results.md and $OUT/results.csv"
