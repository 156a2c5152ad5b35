#!/usr/bin/env bash
# One device session: tests/gpu, then benchmark parts through benchmarks/suite.sh, all under $OUT
# (gpu.txt, tests_gpu.log; the suite's bench/results.jsonl, bench/suite.log, bench/full.log).
# Run from the repo root on the GPU machine with .whl carried (see README "GPU machine").
# Extra arguments go to pytest (test paths among them replace tests/gpu; each test gets
# --timeout 240 s, so a hang shows its stack instead of eating the call); SKIP_TESTS=1 / SKIP_BENCH=1 skip a half. PARTS picks the suite's
# parts (default: kernels sampling structured; issue 8's set: idle serving startup, then
# peer throughput latency — see benchmarks/suite.sh). The suite gets what is left of
# SESSION_BUDGET_S (default 540) after the tests.
set -uo pipefail
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  paths=(tests/gpu)
  for arg in "$@"; do [[ $arg == tests/* ]] && paths=(); done
  python3 -m pytest -q -p no:cacheprovider -rs --timeout 240 "${paths[@]}" "$@" 2>&1 | tee "$OUT/tests_gpu.log" | tail -15
  status=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  export SUITE_BUDGET_S=${SUITE_BUDGET_S:-$((${SESSION_BUDGET_S:-540} - ($(date +%s) - T0)))}
  # shellcheck disable=SC2086  # PARTS is a list of words
  bash benchmarks/suite.sh ${PARTS:-kernels sampling structured}
fi
exit $status
