#!/usr/bin/env bash
# One device session: tests/gpu and the GPU benchmarks, logs under $OUT.
# Run from the repo root on the GPU machine with .whl carried (see README "GPU machine").
# Extra arguments go to pytest; SKIP_TESTS=1 / SKIP_BENCH=1 skip a half.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -rs tests/gpu "$@" 2>&1 | tee "$OUT/tests_gpu.log" | tail -15
  status=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  q=benchmarks/models/qwen3-0.6b
  common="--load-format dummy --dtype bfloat16 --max-model-len 4096"
  python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tail -14 | tee "$OUT/kernels.log"
  python3 benchmarks/sampling.py --json "$OUT/sampling.json" 2>&1 | tail -12 | tee "$OUT/sampling.log"
  for opt in "-O2" "-O0" "-O2 --no-async-scheduling"; do
    echo "== throughput $opt"
    python3 benchmarks/throughput.py --model $q $common $opt --num-prompts 256 --input-len 100 1024 \
      --output-len 100 1024 2>&1 | grep -E "^Throughput|Error|error" | tee -a "$OUT/throughput.log"
  done
  for m in qwen3-0.6b llama-3.1-8b; do
    echo "== latency $m"
    python3 benchmarks/latency.py --model benchmarks/models/$m $common --input-len 512 --output-len 128 \
      2>&1 | grep -vE "Capturing|Loading" | tail -4 | tee -a "$OUT/latency.log"
  done
  python3 benchmarks/peer_hf.py --model $q --json "$OUT/peer_hf.json" 2>&1 | grep -vE "Capturing|Loading" | tail -4 | tee "$OUT/peer.log"
  python3 benchmarks/structured.py --mode engine --json "$OUT/structured.json" 2>&1 | tail -12 | tee "$OUT/structured.log"
fi
exit $status
