#!/usr/bin/env bash
# bench/awq_quality.py over a whole device session on one card, in two phases:
#   1. timing, the card to itself: each search (ours, llm-compressor's, llm-awq's) on the first 6 blocks of the
#      course model at the full budget, one after another (--timing-blocks), after the float32 correctness check;
#   2. quality, several workers sharing the card, each taking the next row no other has taken (--claims) and
#      skipping the rows DONE already holds: two for llm-awq (47 GiB at most each at the full budget, 34% of the
#      card each; they go on with ours when no llm-awq row is left), one for ours and llm-compressor's
#      (32% of the card: our AWQ batches as many alphas per call as
#      free memory takes, so unbounded it starves the others; it needs 43 GiB at least, 18 of them at once for
#      the attention scores; llm-compressor needs 25 GiB). A worker that runs
#      out of memory waits and tries again. The workers start in their own process sessions (setsid), so they go on after the call that
#      started them returns, for as long as the machine is held; each writes its JSON after every row.
# Usage (on the GPU machine, from the folder holding bench/, after bench/setup_gpu_machine.sh):
#   bench/awq_gpu_pool.sh STATE DONE_JSON     # phase 1 (SKIP_TIMING=1: none), then starts phase 2 and returns
#   tail the logs in STATE; later: python bench/awq_quality.py --merge STATE/part-*.json ... (bench/README.md)
set -uo pipefail
STATE=${1:?usage: bench/awq_gpu_pool.sh STATE DONE_JSON}; DONE=${2:?}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
OURS=("RTN" "AWQ" "AWQ + clip" "AWQ duo" "GPTQ act order, static groups" "AWQ then GPTQ" "AWQ on quantized inputs"
      "llm-compressor AWQ" "llm-compressor AWQ (duo)")
EXTRA=(${AWQ_ARGS:-})  # e.g. AWQ_ARGS='--quick --seeds 0' to try the script on a CPU
mkdir -p "$STATE/claims"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=2

if [ "${3:-}" = worker ]; then  # one worker of phase 2 (this script calls itself)
  name=$4; fraction=$5; shift 5
  check=--no-check; [ "$name" = O1 ] && check=--check  # one worker runs the float32 correctness check first
  passes=(ours); [ "$name" = O1 ] || passes=(llm-awq ours)  # the llm-awq workers go on with ours when done
  for pass in "${passes[@]}"; do
    [ "$pass" = llm-awq ] && only=("llm-awq (scale + clip)") || only=("${OURS[@]}")
    for bits in "$@"; do
      AWQ_WORKER=$name $PY "$HERE/awq_quality.py" --claims "$STATE/claims" $check --done "$DONE" \
        --memory-fraction "$fraction" --bits "$bits" --only "${only[@]}" \
        --out "$STATE/part-$name-$pass-$bits.json" "${EXTRA[@]}"
      check=--no-check
    done
  done
  exit
fi

[ -n "${SKIP_TIMING:-}" ] || $PY "$HERE/awq_quality.py" --timing-blocks 6 --seeds 0 --bits 4 --out "$STATE/timing.json" "${EXTRA[@]}" \
  --only "AWQ" "AWQ + clip" "AWQ duo" "GPTQ act order, static groups" "AWQ then GPTQ" \
         "llm-compressor AWQ" "llm-awq (scale + clip)" > "$STATE/log-timing.txt" 2>&1
tail -n 12 "$STATE/log-timing.txt" 2>/dev/null
for spec in "L1 0.34 4 3" "L2 0.34 3 4" "O1 0.32 3 4"; do
  set -- $spec
  setsid nohup bash "$0" "$STATE" "$DONE" worker "$@" > "$STATE/log-$1.txt" 2>&1 < /dev/null &
  sleep 20  # not every model load at once
done
echo "phase 2: $(ls "$STATE"/log-*.txt | wc -l) logs in $STATE"
