#!/usr/bin/env bash
# One device session: tests/gpu and the GPU benchmarks, logs under $OUT.
# Run from the repo root on the GPU machine with .whl carried (see README "GPU machine").
# Extra arguments go to pytest; SKIP_TESTS=1 / SKIP_BENCH=1 skip a half.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -rs tests/gpu "$@" 2>&1 | tee "$OUT/tests_gpu.log"
  status=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
  python3 benchmarks/throughput.py --model benchmarks/models/qwen3-0.6b --load-format dummy --dtype bfloat16 \
    --num-prompts 64 --input-len 64 256 --output-len 64 256 --max-model-len 4096 --json "$OUT/throughput_qwen3-0.6b.json" \
    2>&1 | grep -v "Processed prompts" | tee "$OUT/throughput.log"
fi
exit $status
