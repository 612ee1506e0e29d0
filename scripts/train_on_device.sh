#!/bin/bash
# Train Meta-QSM on a lent GPU machine, which has python3 with torch, numpy and scipy but no package index.
#
#   here:  scripts/train_on_device.sh wheels
#          nibabel and nilearn (the training crops' MNI template) as wheels into .whl/ (ignored by git; carried)
#   there: scripts/train_on_device.sh run MINUTES NAME [metaqsm-train options...]
#          installs the wheels into /tmp/site, runs metaqsm-train under `timeout MINUTES` on the GPU with one data
#          worker per CPU core but one (--device and --data-workers may be overridden in the options), and writes
#          into $OUT, the folder whose files come back: NAME.pt and NAME.json (the best validated weights, exported
#          as the package ships them), the run's run.json and val.jsonl, the last 200 lines of its step log, its
#          console output and the GPU's name.
#
# The machine starts bare and only $OUT comes back, so a run cannot be resumed there: start it from a shipped or
# exported model (--init-from NAME or PATH.pt) and use the returned NAME.pt as the next run's --init-from.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
wheels)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl nibabel==5.4.2 nilearn==0.14.1
    ls .whl
    ;;
run)
    [ $# -ge 3 ] || { echo "usage: $0 run MINUTES NAME [metaqsm-train options...]" >&2; exit 2; }
    minutes=$2 name=$3
    shift 3
    out=${OUT:?set OUT to the folder whose files come back}
    run_dir=$(mktemp -d /tmp/metaqsm-run.XXXX)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU") > "$out/gpu.txt"
    status=0
    timeout "${minutes}m" python3 -m metaqsm_bids.cli.train --device cuda --data-workers $(($(nproc) - 1)) \
        --no-progress "$@" --out "$run_dir/run" > "$out/train.log" 2>&1 || status=$?
    # 124: stopped by the timeout, as planned; the checkpoints are on disk
    [ $status -eq 0 ] || [ $status -eq 124 ] || { tail -n 40 "$out/train.log"; exit $status; }
    python3 -c "import sys; from metaqsm_bids.training.train import export_model; export_model(*sys.argv[1:])" \
        "$run_dir/run" "$name" "$out" best
    cp "$run_dir/run/run.json" "$run_dir/run/val.jsonl" "$out/"
    tail -n 200 "$run_dir/run/log.jsonl" > "$out/log-tail.jsonl"
    tail -n 5 "$out/train.log"
    ls -l "$out"
    ;;
*)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
