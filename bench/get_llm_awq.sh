#!/usr/bin/env bash
# Copy the Python files of mit-han-lab's llm-awq that bench/llm_awq_peer.py runs into peers/llm-awq/ (ignored by
# git: none of llm-awq's code is committed here), and record the commit they came from in peers/llm-awq/COMMIT.
#
# Source: a git directory of https://github.com/mit-han-lab/llm-awq, e.g. the one the session's `fetch` tool
# leaves at /work/.mirror/mit-han-lab+llm-awq/repo (a bare mirror: read with `git --git-dir`), or any clone.
# Usage (from the repository root):  bench/get_llm_awq.sh [GIT_DIR] [COMMIT]
#   GIT_DIR defaults to the first */mit-han-lab+llm-awq/repo under /work/.mirror; COMMIT to its HEAD.
# What is copied (about 85 kB): awq/quantize/*.py (pre_quant, auto_scale, auto_clip, quantizer, qmodule; the rest
# is copied but not imported), awq/utils/*.py and LICENSE. No CUDA extension is built: fake quantization needs none.
# The GPU machine has no network: carry peers/llm-awq (see bench/README.md).
set -euo pipefail
GIT_DIR=${1:-$(ls -d /work/.mirror/*mit-han-lab+llm-awq*/repo 2>/dev/null | head -1)}
test -n "$GIT_DIR" || { echo "no llm-awq git directory given or found under /work/.mirror" >&2; exit 1; }
REV=$(git --git-dir="$GIT_DIR" rev-parse "${2:-HEAD}^{commit}")
DEST=peers/llm-awq
rm -rf "$DEST"; mkdir -p "$DEST"
for f in LICENSE $(git --git-dir="$GIT_DIR" ls-tree -r --name-only "$REV" awq/quantize awq/utils | grep '\.py$'); do
  mkdir -p "$DEST/$(dirname "$f")"; git --git-dir="$GIT_DIR" show "$REV:$f" > "$DEST/$f"
done
echo "$REV" > "$DEST/COMMIT"
git --git-dir="$GIT_DIR" show -s --format='%H %cI %s' "$REV" > "$DEST/COMMIT.log"
echo "llm-awq $REV -> $DEST ($(du -sb "$DEST" | cut -f1) bytes)"
