#!/usr/bin/env bash
# Pack what two calls of the GPU machine carry to run every benchmark from this checkout's HEAD.
#
# The device tool sends the session's own checkout plus the paths named in `carry`, 64 MiB a call in all, and keeps
# nothing between machines; the course model's GGUF alone is 98 MB. So it goes in two consecutive calls to the
# same (warm) machine, and bench/setup_gpu_machine.sh gathers the pieces in /tmp/quantcourse-gpu there:
#   DEST/a: HEAD's bench/, quantcourse/ and pyproject.toml (git archive: exactly the commit the JSONs will name),
#           .gpu/commit.env and the first piece of the GGUF: a short first call only stores the piece;
#   DEST/b: the same code and commit.env, .whl/ (bitsandbytes, cut down to its CPU and CUDA $BNB_CUDA libraries,
#           and gguf, at the versions of this checkout's .venv), the text (.gpu/janeausten.json) and the rest of the
#           GGUF: the second call runs every benchmark (nf4_dequant and w8a8_matmul need no model, so they would
#           still run if that call found a fresh machine).
# The GPU machine has no .git: .gpu/commit.env sets QUANTCOURSE_COMMIT (HEAD's hash) and QUANTCOURSE_DIRTY=0 (the
# archive is HEAD itself, whatever the work tree holds), which benchmeta.run_metadata records.
# Usage (from the repository root, after `make setup`):  bench/gpu_carry.sh DEST
#   DEST must lie inside the checkout the device tool sends, in a folder git ignores there; name DEST/a (first call)
#   and DEST/b (second call) in `carry`, and begin each command with
#   `cd DEST/a && source bench/setup_gpu_machine.sh` (DEST/b in the second).
set -euo pipefail
DEST=${1:?usage: bench/gpu_carry.sh DEST}
PY=${PY:-.venv/bin/python}
BNB_CUDA=${BNB_CUDA:-130}          # the GPU image's torch is built for CUDA 13.0
PIECE=${PIECE:-53000000}           # bytes of the GGUF in the first call; the rest goes in the second
export QUANTCOURSE_CACHE=${QUANTCOURSE_CACHE:-$PWD/.cache}
rm -rf "$DEST/a" "$DEST/b"; mkdir -p "$DEST/a/.gpu" "$DEST/b/.gpu" "$DEST/b/.whl"
for d in a b; do git archive HEAD bench quantcourse pyproject.toml | tar -x -C "$DEST/$d"; done
printf 'export QUANTCOURSE_COMMIT=%s QUANTCOURSE_DIRTY=0\n' "$(git rev-parse HEAD)" | tee "$DEST/a/.gpu/commit.env" > "$DEST/b/.gpu/commit.env"

BNB=$($PY -c 'import bitsandbytes; print(bitsandbytes.__version__)'); GGUF_PY=$($PY -c 'import importlib.metadata as m; print(m.version("gguf"))')
WHEELS=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "bitsandbytes==$BNB" "gguf==$GGUF_PY"
cp "$WHEELS"/gguf-*.whl "$DEST/b/.whl/"
$PY - "$WHEELS"/bitsandbytes-*.whl "$DEST/b/.whl" "$BNB_CUDA" <<'EOF'
import sys, zipfile, hashlib, base64
from pathlib import Path
source, dest, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
keep = lambda name: not (name.startswith('bitsandbytes/libbitsandbytes_') and
                         Path(name).name not in (f'libbitsandbytes_cuda{cuda}.so', 'libbitsandbytes_cpu.so'))
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest/source.name, 'w', zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if keep(n)]
    record = next(n for n in names if n.endswith('.dist-info/RECORD'))
    lines = []
    for name in names:
        if name == record: continue
        data = zin.read(name); zout.writestr(zin.getinfo(name), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()
        lines.append(f'{name},sha256={digest},{len(data)}')
    zout.writestr(record, '\n'.join(lines + [f'{record},,']) + '\n')
print(f'{dest/source.name}: {len(names)} of {len(zin.namelist())} files')
EOF
rm -rf "$WHEELS"

GGUF_FILE=$($PY -c 'from quantcourse.core import bundled_gguf; print(bundled_gguf())')
head -c "$PIECE" "$GGUF_FILE" > "$DEST/a/.gpu/model.gguf.part-aa"
tail -c +"$((PIECE + 1))" "$GGUF_FILE" > "$DEST/b/.gpu/model.gguf.part-ab"
test -f "$QUANTCOURSE_CACHE/janeausten.json" || $PY -c 'from quantcourse.core import load_text; load_text("prideprejudice")'
cp "$QUANTCOURSE_CACHE/janeausten.json" "$DEST/b/.gpu/"
du -sb "$DEST/a" "$DEST/b"
