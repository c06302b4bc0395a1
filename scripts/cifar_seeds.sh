#!/usr/bin/env bash
# Train one CIFAR setting once per seed, one run after another, then print best Acc@1 per seed and
# their mean +- sample std. Each run gets its own folder <ckpt>/<dataset>-<arch>[-<att>-param<p>][-<digest>]-seed<s>.
#
#   scripts/cifar_seeds.sh "0 1 2" --dataset cifar100 --dataset_dir DIR -a resnet20 --attention_type simam --attention_param 1e-4
#   LAUNCH="torchrun --nproc_per_node=2" scripts/cifar_seeds.sh "0 1 2" --dataset cifar10 --dataset_dir DIR -a resnet56
#
# PYTHON (default .venv/bin/python, else python3) runs main_cifar.py unless LAUNCH is set.
# A failed run stops the script (exit status of that run); finished seeds keep their folders.
set -euo pipefail
if [ $# -lt 1 ] || [ -z "${1// /}" ]; then
    echo "usage: $0 \"SEED [SEED...]\" [main_cifar.py flags, without --seed]" >&2
    exit 2
fi
seeds=$(printf '%s\n' $1 | awk '!seen[$0]++' | tr '\n' ' ')  # a seed given twice is one run
shift
for a in "$@"; do
    if [ "$a" = "--seed" ] || [[ "$a" == --seed=* ]]; then
        echo "$0: give the seeds as the first argument, not --seed" >&2
        exit 2
    fi
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -n "${LAUNCH:-}" ]; then read -r -a launch <<< "$LAUNCH"; else launch=("$PYTHON"); fi  # PYTHON may hold spaces

log=$(mktemp)
trap 'rm -f "$log"' EXIT
results=()
declare -A seen  # run folders: two spellings of one seed (0, 00) are one run, counted once
for s in $seeds; do
    echo "=== seed $s ==="
    "${launch[@]}" "$root/main_cifar.py" "$@" --seed "$s" | tee "$log"
    # the trainer's last line: "done: best Acc@1 X; run folder: DIR"
    best=$(sed -n 's/^done: best Acc@1 \([0-9.]*\);.*/\1/p' "$log" | tail -n 1)
    run=$(sed -n 's/^done: best Acc@1 [0-9.]*; run folder: \(.*\)$/\1/p' "$log" | tail -n 1)
    if [ -n "$run" ]; then
        [ -z "${seen[$run]:-}" ] || continue
        seen[$run]=1
    fi
    results+=("$s ${best:-?}")
done

echo "=== best Acc@1 per seed ==="
printf '%s\n' "${results[@]}" | awk '
    { print "seed " $1 ": " $2 }
    $2 != "?" { n++; sum += $2; sq += $2 * $2 }
    END {
        if (n == 0) exit
        mean = sum / n; var = n > 1 ? (sq - n * mean * mean) / (n - 1) : 0
        printf "mean %.2f +- %.2f (std over %d seeds)\n", mean, sqrt(var > 0 ? var : 0), n
    }'
