#!/usr/bin/env bash
# Run bench/awq_quality.py as WORKERS processes sharing one card: each takes the next task no other has taken
# (the most wanted first), writes its own JSON after every row, and the first also runs the float32 check.
# The course model is small: one process leaves the H200 mostly idle (launches, Python), several keep it busy, but
# only where they fit: at the full budget (128 x 2048) they do not (about 18 GiB at once each; llm-compressor grows
# to ~119 GiB): out-of-memory errors. Use it with --calib-samples well below 128 (bench/README.md).
# Usage:  bench/awq_parallel.sh WORKERS OUTDIR [awq_quality.py arguments...]
#   then: python bench/awq_quality.py --merge OUTDIR/part-*.json --out bench/results/awq_quality.json
set -uo pipefail
WORKERS=${1:?usage: bench/awq_parallel.sh WORKERS OUTDIR [args]}; OUTDIR=${2:?}; shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
trap 'kill $(jobs -p) 2>/dev/null' TERM INT EXIT  # a stopped run stops its workers too
PY=${PY:-python3}
mkdir -p "$OUTDIR/claims"
for ((i = 0; i < WORKERS; i++)); do
  check=--no-check; [ "$i" = 0 ] && check=--check
  AWQ_WORKER=$i OMP_NUM_THREADS=1 $PY "$HERE/awq_quality.py" --claims "$OUTDIR/claims" \
    --out "$OUTDIR/part-$i.json" $check "$@" > "$OUTDIR/log-$i.txt" 2>&1 &
  sleep 2  # the first loads the model while the others wait a little: fewer at once at the start
done
wait; trap - EXIT
tail -n 3 "$OUTDIR"/log-*.txt
