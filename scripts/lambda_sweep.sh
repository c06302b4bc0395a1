#!/usr/bin/env bash
# The paper's lambda search: train one SimAM model per (lambda, seed), one run after another, then draw
# best top-1 (mean +- std over seeds) against lambda and print the table (scripts/plot_sweep.py).
# Each run gets its own folder <ckpt>/<dataset>-<arch>-simam-param<lambda>[-<digest>]-seed<s> (the digest names
# the other flags' non-default settings: docs/imagenet.md#run-folder-checkpoints-resume); the trainer prints it.
#
#   scripts/lambda_sweep.sh cifar "0 1 2" --dataset cifar100 --dataset_dir DIR -a resnet20 --ckpt runs/sweep
#   LAMBDAS="1e-1 1e-4" scripts/lambda_sweep.sh imagenet "0" /data/imagenet -a resnet18 --ckpt runs/sweep
#
# First argument: cifar (main_cifar.py) or imagenet (main_imagenet.py); second: the seeds, as for
# cifar_seeds.sh; the rest go to the trainer unchanged (without --seed / --attention_type / --attention_param).
# Environment: LAMBDAS (default: the paper's 1e-1 ... 1e-6), PYTHON (default .venv/bin/python, else
# python3), LAUNCH (e.g. "torchrun --nproc_per_node=2"; default: PYTHON), PLOT (the figure; default
# lambda_sweep.png next to the run folders).
# A failed run stops the sweep (exit status of that run); finished runs keep their folders.
set -euo pipefail
usage="usage: $0 cifar|imagenet \"SEED [SEED...]\" [trainer flags]"
if [ $# -lt 2 ] || [ -z "${2// /}" ]; then
    echo "$usage" >&2
    exit 2
fi
case "$1" in
    cifar) trainer=main_cifar.py ;;
    imagenet) trainer=main_imagenet.py ;;
    *) echo "$0: first argument must be cifar or imagenet, got '$1'" >&2; echo "$usage" >&2; exit 2 ;;
esac
seeds=$2
shift 2
for a in "$@"; do
    case "$a" in
        --seed|--seed=*|--attention_type|--attention_type=*|--attention_param|--attention_param=*)
            echo "$0: the sweep sets ${a%%=*} itself (seeds: second argument; lambdas: LAMBDAS)" >&2
            exit 2 ;;
    esac
done
# A value given twice is one run (the plot and table count each run folder once, too).
lambdas=$(printf '%s\n' ${LAMBDAS:-1e-1 1e-2 1e-3 1e-4 1e-5 1e-6} | awk '!seen[$0]++' | tr '\n' ' ')
seeds=$(printf '%s\n' $seeds | awk '!seen[$0]++' | tr '\n' ' ')

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -n "${LAUNCH:-}" ]; then read -r -a launch <<< "$LAUNCH"; else launch=("$PYTHON"); fi  # PYTHON may hold spaces

log=$(mktemp)
trap 'rm -f "$log"' EXIT
runs=()
for lam in $lambdas; do
    for s in $seeds; do
        echo "=== lambda $lam, seed $s ==="
        "${launch[@]}" "$root/$trainer" "$@" --attention_type simam --attention_param="$lam" --seed="$s" | tee "$log"
        # the trainer's last line: "done: best Acc@1 X; run folder: DIR"
        run=$(sed -n 's/^done: best Acc@1 [0-9.]*; run folder: \(.*\)$/\1/p' "$log" | tail -n 1)
        if [ -z "$run" ]; then
            echo "$0: no run folder reported for lambda $lam, seed $s" >&2
            exit 1
        fi
        runs+=("$run")
    done
done

plot=${PLOT:-$(dirname "${runs[0]}")/lambda_sweep.png}
echo "=== best Acc@1 against lambda ==="
"$PYTHON" "$root/scripts/plot_sweep.py" "${runs[@]}" -o "$plot"
