#!/usr/bin/env bash
# The rosjax benchmark on one GPU, in one command, without network access.
#
#   bash experiments/gpu_benchmark.sh            # run from anywhere; prints one table
#   OUT=/some/folder bash experiments/gpu_benchmark.sh   # also keeps benchmark.json there
#
# 224-px images, global batch 128, 3 warm-up + 20 timed steps per measurement, bfloat16 then
# float32: the five teachers' train steps (and the engine loop on each), the distillation step
# with online teachers against the cached one, the cache build and the data pipeline with
# 0, 4 and 8 grain workers. Everything must already be installed (jax with CUDA, rosjax).
# A total timeout (BENCH_TIMEOUT seconds, default 450) keeps it under 8 minutes; the JSON is
# rewritten after every measurement, so a cut-short run still prints what it measured.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${BENCH_TIMEOUT:-450}
OUT_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
JSON="$OUT_DIR/benchmark.json"

"$PYTHON" -c "import jax; print('devices:', jax.devices())" || exit 1

# Progress lines go to stderr (shown); the final table is printed once, below, from the JSON.
timeout --kill-after=15 "$BUDGET" "$PYTHON" -m experiments.benchmark \
    --image-size 224 --batch-size 128 --warmup 3 --steps 20 --dtype bfloat16,float32 \
    --workers 0,4,8 --data-batches 10 --cache-batches 4 --source-size 450x600 \
    --out "$JSON" > /dev/null
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "benchmark stopped by the ${BUDGET}-s timeout: the table shows what finished" >&2
fi
if [ -f "$JSON" ]; then
    "$PYTHON" -m experiments.benchmark --print "$JSON"
    echo "JSON: $JSON"
fi
exit "$status"
