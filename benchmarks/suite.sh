#!/usr/bin/env bash
# Issue 8's GPU benchmarks in one device call, each part bounded, everything under $OUT/bench/:
#   results.jsonl  one JSON line per result ({"bench": ..., ...}; benchmarks/plots.py reads it), plus
#                  one {"bench": "suite", ...} line per part (ok / failed / timeout / skipped, seconds)
#   suite.log      each part's command, status and its last lines (the tables)
#   full.log       each part's output (last 400 lines per part, then the server's statistics lines)
# Usage (repo root, GPU machine, .whl carried):  bash benchmarks/suite.sh [PART...]
# Parts (default: idle serving startup), in the order given:
#   idle          GPU idle between steps, async scheduling on/off, batch 64, qwen3-0.6b   (~1.5 min)
#   serving       SSE, 400 requests, 100-1024 in/out, 16 req/s and inf, --stream-interval 1 and 8 (~4 min)
#   serving-host  the server's host path alone (no model: benchmarks/serving_host.py), 64 and 256
#                 streams, --stream-interval 1 and 8, Qwen3's tokenizer when built           (~1.5 min)
#   startup       process start to /health, -O0 and -O2, cold and warm compile cache    (~2-3 min)
#   startup-all   the same for -O1 and -O3                                               (~3-5 min)
#   peer          benchmarks/peer_hf.py: transformers beside us (latency, continuous batching) (~4 min)
#   throughput    256 requests, 100-1024 in/out: -O0, -O1, -O2, -O2 --no-async-scheduling  (~4 min)
#   throughput-O3 the same at -O3                                                        (~2-4 min)
#   latency       batch 1, prompt 512, 128 out: qwen3-0.6b and llama-3.1-8b              (~1.5 min)
#   kernels sampling structured   the micro-benchmarks (JSON lines appended to results.jsonl; kernels
#                 includes the batch-1 GEMV beside cuBLAS and decode attention on ragged batches)
#   graphed-decode  decode attention on ragged batches inside CUDA graphs: the plan, one pass, the best of a grid
# SUITE_BUDGET_S (default 540): the call's budget; a part gets min(its bound, what is left) and is
# skipped when less than 45 s are left. MODEL (default benchmarks/models/qwen3-0.6b).
# SMOKE=1: the same parts on the embedded model with tiny workloads (a CPU check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
B=$OUT/bench
mkdir -p "$B"
R=$B/results.jsonl
BUDGET=${SUITE_BUDGET_S:-540}
MODEL=${MODEL:-benchmarks/models/qwen3-0.6b}
COMMON="--load-format dummy --dtype bfloat16 --max-model-len 4096"
LATENCY_MODELS="benchmarks/models/qwen3-0.6b benchmarks/models/llama-3.1-8b"
IDLE="--num-requests 64 --prompt-len 128 --output-len 512"
SERVE="--num-prompts 400 --input-len 100 1024 --output-len 100 1024"
PEER=""
OFFLINE="--num-prompts 256 --input-len 100 1024 --output-len 100 1024"
LATENCY="--input-len 512 --output-len 128"
FILL_THREADS="1 4"
if [ -n "${SMOKE:-}" ]; then
  export OMP_NUM_THREADS=1  # small CPU machines: OpenMP threads waiting on a busy core slow every matmul
  MODEL=aio_engine/default_model COMMON="--max-model-len 1024" LATENCY_MODELS=$MODEL
  IDLE="--num-requests 8 --prompt-len 16 --output-len 48 --warmup-steps 4 --timed-steps 20 --profile-steps 10"
  SERVE="--num-prompts 12 --input-len 16 64 --output-len 16 64"
  PEER="--prompt-len 32 --output-len 16 --num-prompts 8 --hf-num-prompts 4 --input-range 16 64 --output-range 8 32 --max-model-len 256"
  OFFLINE="--num-prompts 8 --input-len 16 64 --output-len 16 64"
  LATENCY="--input-len 32 --output-len 8 --num-iters 2"
  FILL_THREADS="1 2"
fi
PY=${PYTHON:-python3}
T0=$(date +%s)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(idle serving startup)

note() {  # part status seconds [detail]
  printf '{"bench": "suite", "part": "%s", "status": "%s", "seconds": %s, "detail": "%s"}\n' "$1" "$2" "$3" "${4:-}" >>"$R"
}

# run NAME BOUND_S COMMAND...: run one command under what is left of the budget.
run() {
  local name=$1 bound=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  if [ "$left" -lt 45 ]; then
    echo "== $name: skipped ($left s left of $BUDGET)" | tee -a "$B/suite.log"
    note "$name" skipped 0 "budget"
    return
  fi
  local limit=$((bound < left - 10 ? bound : left - 10))
  local log
  log=$(mktemp)
  echo "== $name (limit ${limit}s): $*" | tee -a "$B/suite.log"
  local start=$(date +%s)
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$log" 2>&1
  local rc=$? took=$(($(date +%s) - start))
  local status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  note "$name" "$status" "$took" "rc $rc"
  { echo "== $name: $status (rc $rc) in ${took}s"; grep -vE '^\{"bench"|aiohttp.access|USDT|it/s\]|Capturing' "$log" | tail -n 40; } \
    | tee -a "$B/suite.log"
  { echo "===== $name: $*"; tail -n 400 "$log"; } >>"$B/full.log"
  # The server's statistics lines (aio_engine.stats: throughput, loop iterations' median / p99 /
  # longest and what the longest held), however much other output came after them.
  grep -q 'aio_engine.stats' "$log" && { echo "----- $name: statistics lines"; grep 'aio_engine.stats' "$log"; } >>"$B/full.log"
  rm -f "$log"
}

# json_line NAME FILE: append a --json document as one results line.
json_line() {
  [ -s "$2" ] && $PY -c 'import json,sys; d=json.load(open(sys.argv[2])); print(json.dumps({"bench": sys.argv[1], **(d if isinstance(d, dict) else {"results": d})}))' "$1" "$2" >>"$R"
  rm -f "$2"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$B/suite.log" 2>&1
echo "suite: ${parts[*]} (budget ${BUDGET}s, model $MODEL), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)" \
  | tee -a "$B/suite.log"
for part in "${parts[@]}"; do
  case $part in
    idle)
      run idle 150 $PY benchmarks/idle.py --model "$MODEL" $COMMON $IDLE --jsonl "$R" ;;
    serving-host)
      tok=""
      [ -f benchmarks/tokenizers/qwen3/tokenizer.json ] && tok="--tokenizer benchmarks/tokenizers/qwen3"
      for streams in 64 256; do
        for si in 1 8; do
          run "serving-host-$streams-si$si" 60 $PY benchmarks/serving_host.py --streams $streams --output-len 200 \
            --stream-interval $si $tok --jsonl "$R"
        done
      done ;;
    serving)
      for si in 1 8; do
        run "serving-si$si" 200 $PY benchmarks/serving.py $SERVE --request-rate 16 inf --max-seconds 90 \
          --jsonl "$R" -- --model "$MODEL" $COMMON --stream-interval $si
      done ;;
    startup)
      run startup 240 $PY benchmarks/startup.py --levels 0 2 --timeout 150 --jsonl "$R" -- --model "$MODEL" $COMMON ;;
    startup-all)
      run startup-all 330 $PY benchmarks/startup.py --levels 1 3 --timeout 160 --jsonl "$R" -- --model "$MODEL" $COMMON ;;
    peer)
      run peer 330 $PY benchmarks/peer_hf.py --model "$MODEL" --part-timeout 150 $PEER --jsonl "$R" ;;
    throughput | throughput-O3)
      if [ "$part" = throughput ]; then levels=("-O0" "-O1" "-O2" "-O2 --no-async-scheduling"); else levels=("-O3"); fi
      for opt in "${levels[@]}"; do
        run "throughput $opt" 150 $PY benchmarks/throughput.py --model "$MODEL" $COMMON $opt $OFFLINE --jsonl "$R"
      done ;;
    latency)
      for m in $LATENCY_MODELS; do
        run "latency $(basename $m)" 120 $PY benchmarks/latency.py --model $m $COMMON $LATENCY --jsonl "$R"
      done ;;
    kernels | sampling)
      run "$part" 240 $PY benchmarks/$part.py --json "$B/$part.tmp.json"
      json_line "$part" "$B/$part.tmp.json" ;;
    graphed-decode)
      run "$part" 150 $PY benchmarks/kernels.py --only graphed-decode --json "$B/$part.tmp.json"
      json_line kernels "$B/$part.tmp.json" ;;
    structured)
      run structured 200 $PY benchmarks/structured.py --mode engine --fill-threads $FILL_THREADS --json "$B/structured.tmp.json"
      json_line structured "$B/structured.tmp.json" ;;
    *)
      echo "suite: unknown part $part" | tee -a "$B/suite.log"
      note "$part" unknown 0 ;;
  esac
done
echo "suite done in $(($(date +%s) - T0))s" | tee -a "$B/suite.log"
