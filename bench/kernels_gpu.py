"""Quantized matmul kernels on the GPU (chapter 09): our Triton int4 group kernel (GPTQ/AWQ's layout) and NF4 kernel
(bitsandbytes' layout, double quantization) against cuBLAS float16, torch's tinygemm int4 kernel and bitsandbytes'
gemv_4bit, on Llama-3's six weight shapes at batch 1 and 16, with the card's ceilings for the roofline; our int8
weight-only kernel (W8A16) on the same shapes; our W8A8 kernels (int8 and FP8 E4M3, the activations quantized per
token inside the GEMM) against cuBLAS bfloat16, torch._int_mm and torch._scaled_mm at 2048 and 4096 tokens. Parts:

- `ceilings`: device-to-device copy bandwidth (1 GiB), cuBLAS float16 and bfloat16 matmul rates at 8192^3,
  `torch._int_mm` (int8) and `torch._scaled_mm` (FP8 E4M3, tensor-wise scales) at 8192^3;
- `correctness`: on the device, before any timing, every method on every shape at batch 1 and 16 against
  float32 dequantize-then-matmul of the *same* codes (relative error of the whole output; a method that fails
  is recorded and not timed): cuBLAS float16 (against its own float16 weight), our int4 g128 (float16 and
  bfloat16; plain and with a random act-order column order), tinygemm (`torch._weight_int4pack_mm`, fed our
  codes: its zero is (8 - z) * s in bfloat16, so its reference is built from its own bfloat16 numbers),
  bitsandbytes `matmul_4bit` (NF4, double quantization, its own packing), our NF4 kernel on those same bytes,
  our int8 W8A16 kernel (float16 and bfloat16) on chapter 03's int8 rows; then, on Llama-3-8B's three shapes at 37
  and 2048 tokens (bfloat16 activations, 8 channels 20x louder), every `w8a8` method below against float32 products
  of the same codes: chapter 03's `quantize_activations` codes for int8, `quantize_fp8_rows` for FP8 (`_int_mm` on
  given codes against their exact integer product);
- `int4`: timings of float16 F.linear, our int4 g128 (plain, act order), tinygemm; `nf4`: float16, bitsandbytes
  `matmul_4bit` (gemv_4bit at batch 1), our NF4 kernel. Both measure the copy bandwidth again and give each
  shape's bytes floor (bytes the kernel must read and write / copy bandwidth);
- `int8`: float16 F.linear and our W8A16 kernel (chapter 03's int8 codes, a float32 absmax per row), the six shapes
  at batch 1 and 16, with the copy bandwidth and each shape's bytes floor, timed as `int4` is;
- `w8a8`: Llama-3-8B's 4096x4096, 14336x4096, 4096x14336 at 2048 and 4096 tokens: cuBLAS bfloat16 F.linear;
  `torch._int_mm` alone and `torch._scaled_mm` (FP8 E4M3, row-wise float32 scales, bfloat16 out) alone, on codes
  made beforehand; the same each with an eager per-token quantization in front (chapter 03's
  `W8A8Linear.compute` for int8; `quantize_fp8_rows` for FP8); our fused int8 and FP8 kernels (`w8a8_matmul`: a
  Triton pre-pass for the row scales, the quantization in the GEMM's prologue; FP8 also with FAST_ACCUM, the
  whole sum left to the tensor cores' FP8 accumulator); `quantize_tokens` alone (one Triton pass writing x's 8-bit
  codes and scales); our two-pass route (that pass, then our GEMM on the codes, int8 and FP8 with and without
  FAST_ACCUM, over the tiles of `TWO_PASS_CONFIGS`) and the torch route (that pass, then `torch._scaled_mm`, or
  `torch._int_mm` with the scales applied in PyTorch). Each is checked against float32
  first, then timed by do_bench (median) and a CUDA graph of 4 calls (none for W8A8Linear, whose NaN check syncs
  with the host); rows give microseconds, TFLOP/s and the speed-up over bfloat16;
- `tune`: our int4 kernel's settings for each shape (the six and Llama-3-8B's 1024x4096 k/v projection) at
  batch 1 and 16, by coordinate descent from the library's defaults (`gemv_config` at batch 1, else `pick_config`;
  at batch 1 `pick_config`'s general kernel is timed too and kept if faster): each setting in turn over
  its values (`GEMV_SPACE` for the batch-1 GEMV kernel, `TILE_SPACE` for the tensor-core tiles), two rounds; each
  candidate checked against float32 before it is timed as a CUDA graph over rotating weight copies; an even share
  of `--tune-seconds` per shape and batch. `--int4-configs TUNE.json` then makes the library's `int4_config`
  answer from that table in the other parts (and in decode_gpu.py), recorded in each part.

Timing: `triton.testing.do_bench`, median (it zeroes a 256 MB buffer before every call, so no weight sits in the
L2 cache), and a second figure from a CUDA graph of one call on each of 2 to 16 copies of the weight (at least 128
MB of weights in turn, over twice the L2 cache of an H100 or H200), replayed 20 times: the median replay / the
number of calls. The graph removes the host's launch overhead (checks, allocations, the Triton launcher), which
do_bench includes whenever it exceeds the cache flush; decoding loops run under CUDA graphs.

    python bench/kernels_gpu.py [--only PART ...] [--out PATH] [--quick] [--shapes 4096x4096 ...]

On CUDA it writes bench/results/kernels_gpu.json (or --out); parts run now replace those parts in the file and the
others are kept. `--merge A.json B.json --out C.json` joins files written by separate calls (each part keeps its
own `seconds`; the metadata at the top is the first file's unless C.json had its own). `--quick` runs tiny shapes
and short tunes; without CUDA it runs every part but `ceilings` on the CPU, our kernels in Triton's interpreter
(TRITON_INTERPRET=1, set by the script): the checks are real, the times mean nothing (no graphs, no tinygemm or
bitsandbytes CUDA kernels); it writes only with --out.

Expected on one H100 or H200, each part alone (estimates: not yet run on a GPU): ceilings ~30 s, < 6 GiB;
correctness ~2-3 min (Triton compiles about 100 kernel variants, well under a second each for sm_90 on
this project's CPU, kept in ~/.triton/cache for the later parts on the same machine), < 8 GiB; int4 ~2-3 min,
< 12 GiB (up to 16 rotating copies of each weight); nf4 ~2 min, < 12 GiB; int8 ~2-3 min, < 12 GiB (built like int4,
plus an int8 copy of each weight); w8a8 ~1-2 min (a handful of Triton compiles, then 8 methods x 6 cases of
30-600 us each), < 4 GiB (float32 references of outputs up to 4096 x 14336); the correctness part's W8A8 checks add
~30 s and ~2 GiB; tune: about 100 s per shape and batch
for the whole grid, cut at --tune-seconds (default 420) plus a minute of setup, < 8 GiB: tune two shapes a call
(`--only tune --tune-kernel int4 --shapes 4096x4096 28672x8192`).

On the lent GPU machine (no network, no .git; bitsandbytes from the carried wheels), one call each:

    source bench/setup_gpu_machine.sh
    python3 bench/kernels_gpu.py --only ceilings correctness --out $OUT/kernels_a.json
    python3 bench/kernels_gpu.py --only int4 --out $OUT/kernels_b.json
    python3 bench/kernels_gpu.py --only nf4 --out $OUT/kernels_c.json
    python3 bench/kernels_gpu.py --only int8 w8a8 --out $OUT/kernels_e.json
    python3 bench/kernels_gpu.py --only tune --tune-kernel int4 --shapes 4096x4096 28672x8192 --out $OUT/kernels_d.json

then here: `python bench/kernels_gpu.py --merge A B C D E --out bench/results/kernels_gpu.json`.
"""
from __future__ import annotations
import argparse, json, math, os, statistics, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F

if '--quick' in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')  # before triton defines our kernels
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from quantcourse.gptq import GPTQWeight
from quantcourse.kernels import (int4_matmul, interpreted, nf4_matmul, pick_config,
                                 prepare_int4, relative_error, prepare_int8, w8a16_matmul, w8a8_matmul,
                                 quantize_fp8_rows, quantize_fp8_weight, quantize_tokens)
from quantcourse.outliers import W8A8Linear, quantize_activations
from quantcourse.nf4 import Weight4bit, quantize_4bit
from quantcourse.scales import quantize_weight
from benchmeta import run_metadata, sync

try: import triton
except ImportError: triton = None
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError: bnb = None
try: import gemlite   # optional (PyPI, pure Triton); not timed by this script yet: it needs tuning first
except ImportError: gemlite = None

SHAPES = {'4096x4096': (4096, 4096), '14336x4096': (14336, 4096), '4096x14336': (4096, 14336),
          '8192x8192': (8192, 8192), '28672x8192': (28672, 8192), '8192x28672': (8192, 28672)}
QUICK_SHAPES = {'96x256': (96, 256), '70x384': (70, 384), '128x128': (128, 128)}
BATCHES = (1, 16)           # timed
CHECK_BATCHES = (1, 3, 16, 64)  # checked on the first two shapes (and every quick shape); the rest at BATCHES
GROUP, BLOCKSIZE = 128, 64
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
LIBRARY_TOLERANCE = 2e-2  # reference libraries: that they compute this product, not how precisely
W8A8_SHAPES = {s: SHAPES[s] for s in ('4096x4096', '14336x4096', '4096x14336')}   # Llama-3-8B
QUICK_W8A8_SHAPES = {'96x256': (96, 256), '70x384': (70, 384)}
W8A8_TOKENS, QUICK_W8A8_TOKENS = (2048, 4096), (33, 64)       # timed
W8A8_CHECK_TOKENS, QUICK_W8A8_CHECK_TOKENS = (37, 2048), (33,)  # checked in `correctness`
EXACT_TOLERANCE = 1e-5   # integer products of codes given beforehand, against float32 (rounding only)
PARTS = ('ceilings', 'correctness', 'int4', 'nf4', 'int8', 'w8a8', 'tune')
DEFAULT_OUT = Path(__file__).resolve().parent / 'results' / 'kernels_gpu.json'
GRAPH_CALLS, GRAPH_REPLAYS, L2_FLUSH = 16, 20, 256 * 2**20  # at most 16 copies, aiming at 256 MB


def log(*args): print(*args, flush=True)


# ---------------------------------------------------------------- the weights of one shape
class Layer:
    "One random weight of a shape in every format, on the device, with its float32 references."
    def __init__(self, n: int, k: int, device: str, seed: int = 0, references: bool = True):
        g = torch.Generator(device=device).manual_seed(seed)
        w = torch.randn(n, k, generator=g, device=device) * 0.02
        self.n, self.k, self.device = n, k, device
        self.fp16 = w.half()
        q = quantize_weight(w, 4, GROUP, False)
        self.int4 = prepare_int4(q)
        self.int4_ref = q.dequantize(torch.float32)
        perm = torch.randperm(k, generator=g, device=device)
        qp = GPTQWeight(quantize_weight(w[:, perm], 4, GROUP, False), perm.short())  # stored columns permuted
        self.int4_perm, self.int4_perm_ref = prepare_int4(qp), qp.dequantize(torch.float32)
        self.codes, self.zeros, self.scales = q.codes, q.zero, q.scale   # for tinygemm
        self.int8 = prepare_int8(quantize_weight(w, 8, 'channel', True))   # chapter 03's int8 rows
        self.int8_ref = self.int8.dequantize(torch.float32) if references else None
        if bnb is not None and device == 'cuda':
            packed, state = bnbF.quantize_4bit(self.fp16, blocksize=BLOCKSIZE, quant_type='nf4',
                                               compress_statistics=True)
            self.bnb = (packed, state)
            self.nf4 = Weight4bit(packed.view(-1), state.absmax, (n, k), torch.float16, BLOCKSIZE, 'nf4',
                                  state.state2.absmax, state.offset)
        else:
            self.bnb, self.nf4 = None, quantize_4bit(self.fp16, BLOCKSIZE, 'nf4', double_quant=True)
        self.nf4_ref = self.nf4.dequantize(torch.float32) if references else None
        if not references: self.int4_ref = self.int4_perm_ref = None  # copies for rotation only

    def tinygemm(self):
        "torch's tinygemm int4 layout of our codes: packed weight, (K/g, N, 2) bfloat16 scales and zeros."
        packed = (self.codes[:, ::2].int() << 4 | self.codes[:, 1::2].int()).to(torch.uint8)
        weight = torch._convert_weight_to_int4pack(packed.contiguous(), 8)
        scale = self.scales.float()
        zero = (8 - self.zeros.float()) * scale   # tinygemm: w = (q - 8) * scale + zero
        scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
        sz = scales_and_zeros.float()
        groups = torch.arange(self.k, device=self.device) // GROUP
        reference = (self.codes.float() - 8) * sz[groups, :, 0].T + sz[groups, :, 1].T
        return weight, scales_and_zeros, reference

    def bytes_floor(self, batch: int, method: str) -> int:
        "Bytes a kernel must read (weight, scales, x) and write (y) for this layer."
        n, k = self.n, self.k
        io = 2 * batch * (n + k)
        if method == 'fp16': return 2 * n * k + io
        if method == 'int4': return n * k // 2 + 3 * n * (k // GROUP) + io   # float16 scale + byte zero
        if method == 'int8': return n * k + 4 * n + io   # codes + a float32 absmax per row
        if method == 'nf4':
            blocks = n * k // BLOCKSIZE
            return n * k // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + io
        raise ValueError(method)


def methods(layer: Layer, part: str) -> dict:
    "name -> (make(x) -> output, reference weight float32, activation dtype, tolerance)."
    out = {'cuBLAS fp16 F.linear': (lambda x: F.linear(x, layer.fp16), layer.fp16.float(), torch.float16,
                                    TOLERANCE[torch.float16])}
    if part in ('correctness', 'int4'):
        out['ours int4 g128'] = (lambda x: int4_matmul(x, layer.int4), layer.int4_ref, torch.float16,
                                 TOLERANCE[torch.float16])
        out['ours int4 g128 act-order'] = (lambda x: int4_matmul(x, layer.int4_perm), layer.int4_perm_ref,
                                           torch.float16, TOLERANCE[torch.float16])
        if part == 'correctness':
            out['ours int4 g128 bf16'] = (lambda x: int4_matmul(x, layer.int4), layer.int4_ref, torch.bfloat16,
                                          TOLERANCE[torch.bfloat16])
            out['ours int4 g128 act-order bf16'] = (lambda x: int4_matmul(x, layer.int4_perm), layer.int4_perm_ref,
                                                    torch.bfloat16, TOLERANCE[torch.bfloat16])
        if layer.device == 'cuda':
            try:
                weight, sz, reference = layer.tinygemm()
                out['torch tinygemm int4 g128'] = (lambda x: torch._weight_int4pack_mm(x, weight, GROUP, sz),
                                                   reference, torch.bfloat16, LIBRARY_TOLERANCE)
            except Exception as error:  # recorded, the rest goes on
                out['torch tinygemm int4 g128'] = f"{type(error).__name__}: {error}"[:300]
    if part in ('correctness', 'int8'):
        out['ours int8 w8a16'] = (lambda x: w8a16_matmul(x, layer.int8), layer.int8_ref, torch.float16,
                                  TOLERANCE[torch.float16])
        if part == 'correctness':
            out['ours int8 w8a16 bf16'] = (lambda x: w8a16_matmul(x, layer.int8), layer.int8_ref,
                                           torch.bfloat16, TOLERANCE[torch.bfloat16])
    if part in ('correctness', 'nf4'):
        if layer.bnb is not None:
            packed, state = layer.bnb
            out['bitsandbytes matmul_4bit nf4-dq'] = (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state),
                                                      layer.nf4_ref, torch.float16, LIBRARY_TOLERANCE)
        out['ours nf4-dq'] = (lambda x: nf4_matmul(x, layer.nf4), layer.nf4_ref, torch.float16,
                              TOLERANCE[torch.float16])
        if part == 'correctness':
            out['ours nf4-dq bf16'] = (lambda x: nf4_matmul(x, layer.nf4), layer.nf4_ref, torch.bfloat16,
                                       TOLERANCE[torch.bfloat16])
    return out


def check(fn, reference_weight, dtype, tolerance, batch, k, device, seed=1) -> dict:
    "Relative error of fn(x) against float32 x @ W.T, for a random x of `batch` rows."
    x = torch.randn(batch, k, generator=torch.Generator(device=device).manual_seed(seed), device=device).to(dtype)
    reference = x.float() @ reference_weight.T
    output = fn(x)
    error = relative_error(output.float(), reference)
    return dict(relative_error=error, tolerance=tolerance, passed=bool(error < tolerance),
                finite=bool(torch.isfinite(output.float()).all()))


# ---------------------------------------------------------------- timing
def do_bench_us(fn, device: str = 'cuda') -> float:
    "Median microseconds per call, L2 flushed before each (triton.testing.do_bench); on a CPU (--quick) a stopwatch."
    if device == 'cuda': return 1000 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
    times = []
    for _ in range(3):
        start = time.perf_counter(); fn(); times.append(1e6 * (time.perf_counter() - start))
    return statistics.median(times)


def graph_us(make_calls) -> float|None:
    "Median microseconds per call of a CUDA graph of GRAPH_CALLS calls on rotating weights; None if capture fails."
    calls = make_calls()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls: call()   # warm up (compiles) outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls: call()
    except Exception as error:
        log(f"    CUDA graph capture failed: {type(error).__name__}: {str(error)[:200]}")
        return None
    graph.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(GRAPH_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); graph.replay(); end.record(); torch.cuda.synchronize()
        times.append(1000 * start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def copy_gb_per_s(n_bytes: int = 2**30, device: str = 'cuda') -> float:
    "Bytes read + written per second by a device-to-device copy, GB/s."
    src, dst = (torch.empty(n_bytes, dtype=torch.uint8, device=device) for _ in range(2))
    return 2 * n_bytes / do_bench_us(lambda: dst.copy_(src), device) / 1e3


def rotating_copies(weight_bytes: int) -> int:
    "How many copies of a weight the graph cycles through: >= 256 MB in all (2 to GRAPH_CALLS)."
    return max(2, min(GRAPH_CALLS, math.ceil(L2_FLUSH / weight_bytes)))


# ---------------------------------------------------------------- parts
def part_ceilings(quick: bool) -> dict:
    n = 2048 if quick else 8192
    out = dict(copy_gb_per_s=copy_gb_per_s(2**26 if quick else 2**30), matmul_size=n)
    a, b = torch.randn(n, n, device='cuda'), torch.randn(n, n, device='cuda')
    flops = 2 * n ** 3
    for name, make in [('fp16', lambda: (a.half(), b.half(), lambda x, y: x @ y)),
                       ('bf16', lambda: (a.bfloat16(), b.bfloat16(), lambda x, y: x @ y)),
                       ('int8 torch._int_mm', lambda: ((a * 20).clamp(-127, 127).to(torch.int8),
                                                       (b * 20).clamp(-127, 127).to(torch.int8), torch._int_mm)),
                       ('fp8 e4m3 torch._scaled_mm', lambda: (
                           a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T.contiguous().T,
                           lambda x, y: torch._scaled_mm(x, y, torch.tensor(1.0, device='cuda'),
                                                         torch.tensor(1.0, device='cuda'), out_dtype=torch.bfloat16)))]:
        try:
            x, y, fn = make()
            out[f'{name} tflops'] = flops / do_bench_us(lambda: fn(x, y)) / 1e6
        except Exception as error: out[f'{name} error'] = f"{type(error).__name__}: {error}"[:300]
        log(f"  {name}: {out.get(f'{name} tflops', out.get(f'{name} error'))}")
    out['ridge_fp16_flops_per_byte'] = out.get('fp16 tflops', float('nan')) * 1e12 / (out['copy_gb_per_s'] * 1e9)
    return out


def part_correctness(shapes: dict, device: str) -> dict:
    rows = []
    for index, (label, (n, k)) in enumerate(shapes.items()):
        t = time.perf_counter()
        layer = Layer(n, k, device)
        batches = CHECK_BATCHES if index < 2 or device == 'cpu' else BATCHES
        for name, entry in methods(layer, 'correctness').items():
            if isinstance(entry, str):
                rows.append(dict(shape=label, method=name, error=entry)); continue
            fn, reference, dtype, tolerance = entry
            for batch in batches:
                try: row = check(fn, reference, dtype, tolerance, batch, k, device)
                except Exception as error:
                    row = dict(passed=False, error=f"{type(error).__name__}: {error}"[:300])
                rows.append(dict(shape=label, batch=batch, method=name, dtype=str(dtype)[6:], **row))
                log(f"  {label} batch {batch:>2} {name:<34} {row.get('relative_error', float('nan')):.2e} "
                    f"{'ok' if row['passed'] else 'FAILED ' + row.get('error', '')}")
        del layer; torch.cuda.empty_cache() if device == 'cuda' else None
        log(f"  {label}: {time.perf_counter() - t:.0f} s")
    w8a8_shapes = QUICK_W8A8_SHAPES if device == 'cpu' else W8A8_SHAPES
    for label, (n, k) in w8a8_shapes.items():
        layer = W8A8Layer(n, k, device)
        for tokens in (QUICK_W8A8_CHECK_TOKENS if device == 'cpu' else W8A8_CHECK_TOKENS):
            x = w8a8_input(tokens, k, device)
            for name, entry in w8a8_methods(layer, x).items():
                if isinstance(entry, str):
                    rows.append(dict(shape=label, method=name, error=entry)); continue
                row = w8a8_check(*entry)
                rows.append(dict(shape=label, batch=tokens, method=name, dtype='bfloat16', **row))
                log(f"  {label} tokens {tokens:>4} {name:<40} {row.get('relative_error', float('nan')):.2e} "
                    f"{'ok' if row['passed'] else 'FAILED ' + row.get('error', '')}")
        del layer
        if device == 'cuda': torch.cuda.empty_cache()
    return dict(checks=rows, all_passed=all(r['passed'] for r in rows if 'batch' in r),
                unavailable=[r for r in rows if 'batch' not in r])


def part_timing(part: str, shapes: dict, device: str = 'cuda') -> dict:
    copy = copy_gb_per_s(2**30 if device == 'cuda' else 2**24, device)
    rows = []
    for label, (n, k) in shapes.items():
        weight_bytes = n * k if part == 'int8' else n * k // 2
        layers = [Layer(n, k, device, seed, references=seed == 0) for seed in range(rotating_copies(weight_bytes))]
        fp16_copies = rotating_copies(2 * n * k)
        for batch in BATCHES:
            x16 = torch.randn(batch, k, device=device).half()
            for name, entry in methods(layers[0], part).items():
                if isinstance(entry, str): rows.append(dict(shape=label, batch=batch, method=name, error=entry)); continue
                fn, reference, dtype, tolerance = entry
                checked = check(fn, reference, dtype, tolerance, batch, k, device)
                if not checked['passed']:
                    rows.append(dict(shape=label, batch=batch, method=name, not_timed='failed the check', **checked))
                    log(f"  {label} batch {batch} {name}: FAILED the check, not timed"); continue
                x = x16.to(dtype)
                used = layers[:fp16_copies] if name.startswith('cuBLAS') else layers
                calls = [(lambda f=methods(l, part)[name][0]: f(x)) for l in used]
                us = do_bench_us(lambda: fn(x), device)
                us_graph = graph_us(lambda: calls) if device == 'cuda' else None
                kind = 'fp16' if name.startswith('cuBLAS') else next(k for k in ('nf4', 'int8', 'int4') if k in name)
                floor_us = layers[0].bytes_floor(batch, kind) / (copy * 1e3)
                rows.append(dict(shape=label, batch=batch, method=name, us=us, us_graph=us_graph,
                                 bytes_floor_us=floor_us, gb_per_s=layers[0].bytes_floor(batch, kind) / us / 1e3,
                                 relative_error=checked['relative_error']))
                log(f"  {label} batch {batch:>2} {name:<34} {us:8.1f} us (graph {us_graph or float('nan'):8.1f}); "
                    f"floor {floor_us:6.1f} us")
        del layers
        if device == 'cuda': torch.cuda.empty_cache()
    fp16 = {(r['shape'], r['batch']): r.get('us_graph') or r.get('us') for r in rows if r['method'].startswith('cuBLAS')}
    for r in rows:
        base = fp16.get((r['shape'], r['batch']))
        if 'us' in r and base: r['speedup_vs_fp16'] = base / (r.get('us_graph') or r['us'])
    for label, (n, k) in shapes.items():   # the bytes floors themselves, as rows of the table
        layer_bytes = dict(fp16=2 * n * k, int4=n * k // 2 + 3 * n * (k // GROUP), int8=n * k + 4 * n,
                           nf4=n * k // 2 + n * k // BLOCKSIZE + 4 * math.ceil(n * k / BLOCKSIZE / 256))
        for batch in BATCHES:
            for kind, nbytes in layer_bytes.items():
                if kind == 'fp16' or kind == part:
                    rows.append(dict(shape=label, batch=batch, method=f'bytes floor {kind}',
                                     us=(nbytes + 2 * batch * (n + k)) / (copy * 1e3)))
    return dict(copy_gb_per_s=copy, timings=rows, bitsandbytes=getattr(bnb, '__version__', None),
                gemlite=getattr(gemlite, '__version__', None), gemlite_timed=False)


# ---------------------------------------------------------------- W8A8: many tokens
class W8A8Layer:
    "One random weight as bfloat16, chapter 03's W8A8Linear, our int8 rows (its codes) and FP8 E4M3 rows."
    def __init__(self, n: int, k: int, device: str, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        w = torch.randn(n, k, generator=g, device=device) * 0.02
        self.n, self.k = n, k
        self.bf16 = w.bfloat16()
        linear = torch.nn.Linear(k, n, bias=False, device=device)
        with torch.no_grad(): linear.weight.copy_(w)
        self.eager = W8A8Linear.from_linear(linear)
        self.int8 = prepare_int8(self.eager)            # the same codes, read by our kernel
        self.fp8 = quantize_fp8_weight(w)


def w8a8_input(tokens: int, k: int, device: str, seed: int = 1) -> torch.Tensor:
    "Random bfloat16 activations, a few channels 20x louder (as chapter 03 found in real models)."
    x = torch.randn(tokens, k, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    x[:, :8] *= 20
    return x.bfloat16()


def w8a8_methods(layer: W8A8Layer, x: torch.Tensor) -> dict:
    "name -> (fn() -> output, float32 reference, tolerance), or an error string if it cannot be set up."
    bf16 = TOLERANCE[torch.bfloat16]
    int8_codes, int8_scale = quantize_activations(x, 'token')
    fp8_codes, fp8_scale = quantize_fp8_rows(x)
    w8, w_fp8 = layer.int8, layer.fp8
    int_product = int8_codes.float() @ w8.codes.float().T     # exact integers up to rounding in float32
    fp8_product = fp8_codes.float() @ w_fp8.codes.float().T
    int8_ref = int_product * int8_scale * (w8.absmax / 127)
    fp8_ref = fp8_product * fp8_scale[:, None] * w_fp8.scale
    out = {'cuBLAS bf16 F.linear': (lambda: F.linear(x, layer.bf16), x.float() @ layer.bf16.float().T, bf16)}
    scaled_mm = lambda codes, scale: torch._scaled_mm(codes, w_fp8.codes.t(), scale_a=scale[:, None],
                                                      scale_b=w_fp8.scale[None, :], out_dtype=torch.bfloat16)
    candidates = {
        'torch._int_mm alone (codes given)': (lambda: torch._int_mm(int8_codes, w8.codes.t()), int_product,
                                              EXACT_TOLERANCE),
        'torch._scaled_mm fp8 rowwise alone (codes given)': (lambda: scaled_mm(fp8_codes, fp8_scale), fp8_ref, bf16),
        'eager int8: W8A8Linear (quantize + _int_mm + scales)': (lambda: layer.eager.compute(x), int8_ref, bf16),
        'eager fp8: quantize_fp8_rows + _scaled_mm': (lambda: scaled_mm(*quantize_fp8_rows(x)), fp8_ref, bf16),
        'ours fused int8': (lambda: w8a8_matmul(x, w8, route='fused'), int8_ref, bf16),
        'ours fused fp8': (lambda: w8a8_matmul(x, w_fp8, route='fused'), fp8_ref, bf16),
        'ours fused fp8 fast-accum': (lambda: w8a8_matmul(x, w_fp8, config=dict(FAST_ACCUM=True), route='fused'),
                                      fp8_ref, bf16),
        'ours quantize_tokens alone int8': (lambda: quantize_tokens(x)[0], int8_codes.float(), EXACT_TOLERANCE),
        'ours quantize_tokens alone fp8': (lambda: quantize_tokens(x, True)[0], fp8_codes.float(), EXACT_TOLERANCE),
        'ours torch route int8: quantize_tokens + torch._int_mm + scales': (
            lambda: w8a8_matmul(x, w8, route='torch'), int8_ref, bf16),
        'ours torch route fp8: quantize_tokens + torch._scaled_mm': (
            lambda: w8a8_matmul(x, w_fp8, route='torch'), fp8_ref, bf16)}
    for tiles, config in TWO_PASS_CONFIGS.items():   # our GEMM on codes made by quantize_tokens
        candidates[f'ours two-pass int8 {tiles}'] = (
            lambda config=config: w8a8_matmul(x, w8, config=config, route='two-pass'), int8_ref, bf16)
        for accum, fast in (('', False), (' fast-accum', True)):
            candidates[f'ours two-pass fp8{accum} {tiles}'] = (
                lambda config=config, fast=fast: w8a8_matmul(x, w_fp8, config=config | dict(FAST_ACCUM=fast),
                                                             route='two-pass'), fp8_ref, bf16)
    for name, entry in candidates.items():
        try:
            entry[0]()                 # can it run here at all (CPU builds lack some of these)?
            out[name] = entry
        except Exception as error: out[name] = f"{type(error).__name__}: {error}"[:300]
    return out


def w8a8_check(fn, reference, tolerance) -> dict:
    "Relative error of fn() against its float32 reference."
    try: output = fn()
    except Exception as error: return dict(passed=False, error=f"{type(error).__name__}: {error}"[:300])
    error = relative_error(output.float(), reference)
    return dict(relative_error=error, tolerance=tolerance, passed=bool(error < tolerance),
                finite=bool(torch.isfinite(output.float()).all()))


# `w8a8_config`'s tiles (128x128, 3 stages), then wider output tiles and deeper pipelines, as Hopper's 8-bit GEMMs use
TWO_PASS_CONFIGS = {'128x128 s3': {}, '128x256 s3': dict(BLOCK_N=256), '128x256 s4': dict(BLOCK_N=256, num_stages=4),
                    '256x128 s3': dict(BLOCK_M=256, num_stages=3)}
NO_GRAPH = ('eager int8',)   # W8A8Linear checks its input for NaN (a host sync), which a CUDA graph cannot hold


def part_w8a8(shapes: dict, tokens_list: tuple, device: str = 'cuda') -> dict:
    rows = []
    for label, (n, k) in shapes.items():
        layer = W8A8Layer(n, k, device)
        for tokens in tokens_list:
            x = w8a8_input(tokens, k, device)
            flops = 2 * tokens * n * k
            for name, entry in w8a8_methods(layer, x).items():
                if isinstance(entry, str):
                    rows.append(dict(shape=label, tokens=tokens, method=name, error=entry))
                    log(f"  {label} tokens {tokens} {name}: unavailable ({entry[:80]})"); continue
                fn, reference, tolerance = entry
                checked = w8a8_check(fn, reference, tolerance)
                del reference
                if not checked['passed']:
                    rows.append(dict(shape=label, tokens=tokens, method=name, not_timed='failed the check', **checked))
                    log(f"  {label} tokens {tokens} {name}: FAILED the check, not timed"); continue
                us = do_bench_us(fn, device)
                graphed = device == 'cuda' and not name.startswith(NO_GRAPH)
                us_graph = graph_us(lambda: [fn] * 4) if graphed else None
                rows.append(dict(shape=label, tokens=tokens, method=name, us=us, us_graph=us_graph,
                                 tflops=flops / us / 1e6, tflops_graph=us_graph and flops / us_graph / 1e6,
                                 relative_error=checked['relative_error']))
                log(f"  {label} tokens {tokens} {name:<50} {us:9.1f} us (graph {us_graph or float('nan'):9.1f}) "
                    f"{flops / us / 1e6:7.1f} TFLOP/s")
        del layer
        if device == 'cuda': torch.cuda.empty_cache()
    base = {(r['shape'], r['tokens']): r['us'] for r in rows if r['method'].startswith('cuBLAS') and 'us' in r}
    for r in rows:
        if 'us' in r and (r['shape'], r['tokens']) in base:
            r['speedup_vs_bf16'] = base[(r['shape'], r['tokens'])] / r['us']
    return dict(timings=rows, tokens=list(tokens_list), shapes=list(shapes))


# The tuning grid, searched one setting at a time (coordinate descent) from the library's default
GEMV_SPACE = dict(BLOCK_N=(4, 8, 16, 32, 64), GROUPS=(1, 2, 4, 8), SPLIT_K=(1, 2, 4, 8, 16), num_warps=(1, 2, 4, 8),
                  num_stages=(1, 2, 3, 4), SCALE_EACH=(False, True))
TILE_SPACE = dict(BLOCK_N=(16, 32, 64, 128, 256), BLOCK_K=(32, 64, 128), SPLIT_K=(1, 2, 4, 8, 16), num_warps=(2, 4, 8),
                  num_stages=(1, 2, 3, 4, 5))
TUNE_SHAPES = {'1024x4096': (1024, 4096), **SHAPES}   # Llama-3-8B's k_proj / v_proj too (decode_gpu uses it)


def random_int4(n: int, k: int, device: str, seed: int):
    "An Int4Weight of random codes, scales and zero-points (g128): what the kernel reads, without quantizing."
    from quantcourse.kernels import Int4Weight
    g = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, device=device, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=g, device=device) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=g, device=device, dtype=torch.uint8)
    return Int4Weight(packed, scales, zeros, None, GROUP)


def descend(start: dict, space: dict, measure, deadline: float, rounds: int = 2):
    "Coordinate descent from `start`: each setting in turn over its values, the others held; `measure` -> us|None."
    key = lambda c: json.dumps(c, sort_keys=True)
    best, best_us = dict(start), measure(start)
    seen = {key(best): best_us}
    if best_us is None: best_us = float('inf')
    for _ in range(rounds):
        improved = False
        for name, values in space.items():
            for value in values:
                config = best | {name: value}
                if key(config) in seen: continue
                if time.perf_counter() > deadline: return best, best_us, seen
                us = seen[key(config)] = measure(config)
                if us is not None and us < best_us: best, best_us, improved = config, us, True
        if not improved: break
    return best, best_us, seen


def part_tune(shapes: dict, kernel: str, seconds: float, device: str = 'cuda') -> dict:
    """Our int4 kernel's settings per shape and batch: each candidate checked against float32 first, then timed
    as a CUDA graph over rotating weight copies (the decoding loop's conditions); batch 1 searches the GEMV
    kernel's space from `int4_config`, batch 16 the tensor-core tiles from `pick_config`."""
    from quantcourse.kernels import gemv_config
    if kernel != 'int4': raise SystemExit("tune: only --tune-kernel int4 is searched this way")
    results, start = [], time.perf_counter()
    cases = [(label, n, k, batch) for label, (n, k) in shapes.items() for batch in BATCHES]
    for index, (label, n, k, batch) in enumerate(cases):
        deadline = start + seconds * (index + 1) / len(cases)   # an even share of the time per case
        weights = [random_int4(n, k, device, seed) for seed in range(rotating_copies(n * k // 2))]
        reference = weights[0].dequantize(torch.float32)
        x = torch.randn(batch, k, device=device).half()
        def measure(config):
            try:
                if not check(lambda x_: int4_matmul(x_, weights[0], config=config), reference, torch.float16,
                             TOLERANCE[torch.float16], batch, k, device)['passed']:
                    log(f"    {config}: FAILED the check"); return None
                if device != 'cuda': return do_bench_us(lambda: int4_matmul(x, weights[0], config=config), device)
                return graph_us(lambda: [(lambda w=w: int4_matmul(x, w, config=config)) for w in weights])
            except Exception as error:
                log(f"    {config}: {type(error).__name__}: {str(error)[:160]}"); return None
        default = gemv_config(n, k, GROUP) if batch == 1 else pick_config(batch, n, k, GROUP)
        space = GEMV_SPACE if 'GROUPS' in default else TILE_SPACE
        best, best_us, seen = descend(default, space, measure, deadline)
        row = dict(shape=label, batch=batch, kernel=kernel, default_config=default,
                   default_us=seen[json.dumps(default, sort_keys=True)], config=best, us=best_us, tried=len(seen),
                   timed=[dict(config=json.loads(c), us=us) for c, us in seen.items()])
        if batch == 1:   # the general kernel's default at batch 1: kept if it beats the GEMV kernel's best
            tiles = pick_config(1, n, k, GROUP)
            row['tiles_default_us'] = measure(tiles)
            if row['tiles_default_us'] is not None and row['tiles_default_us'] < best_us:
                row.update(config=tiles, us=row['tiles_default_us'])
        results.append(row)
        log(f"  {label} batch {batch:>2}: default {row['default_us']} us, best {row['us']:.1f} us with {row['config']} "
            f"({len(seen)} tried)")
        del weights, reference
        if device == 'cuda': torch.cuda.empty_cache()
    return dict(kernel=kernel, results=results, timing='CUDA graph over rotating copies (graph_us)',
                shapes=list(shapes))


def tuned_table(path: Path) -> dict:
    "{(rows, out_features, in_features): config} from a JSON the `tune` part wrote."
    results = json.loads(Path(path).read_text())['parts']['tune']['results']
    return {(r['batch'], *map(int, r['shape'].split('x'))): r['config'] for r in results}


def use_tuned_configs(path: Path) -> dict:
    "Make the library's `int4_config` answer from a tune's table for g128 (else its own rule); the table."
    import quantcourse.kernels as kernels
    table, rule = tuned_table(path), kernels.int4_config
    def tuned(M, N, K, group_size, processors=None):
        found = table.get((M, N, K)) if group_size == GROUP else None
        return dict(found) if found else rule(M, N, K, group_size, processors)
    kernels.int4_config = tuned
    log(f"int4 configs from {path}: {len(table)} shapes and batches")
    return {f"{m} {n}x{k}": c for (m, n, k), c in table.items()}


# ---------------------------------------------------------------- the run
def write(out: Path, parts: dict, device: str|None):
    "Put `parts` into the JSON at `out` (its other parts kept); `device` None: keep the metadata (a merge)."
    data = json.loads(out.read_text()) if out.exists() else dict(benchmark='kernels_gpu', parts={})
    if device is not None: data.update(run_metadata(device))
    data['parts'].update(parts)
    data['timings'] = [r for name in ('int4', 'nf4', 'int8') for r in data['parts'].get(name, {}).get('timings', [])]
    copies = [data['parts'][p]['copy_gb_per_s'] for p in ('ceilings', 'int4', 'nf4', 'int8') if p in data['parts']]
    if copies: data['copy_gb_per_s'] = max(copies)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + '\n')
    log(f"wrote {out} (parts: {sorted(data['parts'])})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='+', choices=PARTS, default=['ceilings', 'correctness', 'int4', 'nf4', 'int8', 'w8a8'],
                        help='the parts to run (default: all but tune)')
    parser.add_argument('--out', type=Path, default=None, help=f'JSON to write (default on a GPU: {DEFAULT_OUT})')
    parser.add_argument('--quick', action='store_true', help='tiny shapes; without CUDA: correctness in the interpreter')
    parser.add_argument('--shapes', nargs='+', default=None, help='a subset of the shapes, e.g. 4096x4096')
    parser.add_argument('--tune-kernel', choices=('int4', 'nf4'), default='int4')
    parser.add_argument('--tune-seconds', type=float, default=420)
    parser.add_argument('--int4-configs', type=Path, default=None,
                        help="a JSON written by the tune part: int4_matmul takes its configs (recorded in each part)")
    parser.add_argument('--merge', nargs='+', type=Path, default=None,
                        help='join the parts of these result files into --out (later files win) and exit')
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None: parser.error('--merge needs --out')
        for path in args.merge:
            data = json.loads(path.read_text())
            if not (args.out.exists() and json.loads(args.out.read_text()).get('recorded')):
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({k: v for k, v in data.items() if k != 'parts'} | {'parts': {}}))
            write(args.out, data['parts'], None)
        return
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.only == ['tune'] and not args.quick: shapes = TUNE_SHAPES
    if args.shapes: shapes = {s: shapes[s] for s in args.shapes}
    configs = use_tuned_configs(args.int4_configs) if args.int4_configs else None
    if device == 'cpu' and not interpreted():
        raise SystemExit("no CUDA and the kernels are not interpreted: run with --quick (it sets TRITON_INTERPRET=1)")
    only = [p for p in args.only if device == 'cuda' or p != 'ceilings']
    if device == 'cpu':
        log("no CUDA: our kernels in Triton's interpreter, others on the CPU; the times mean nothing")
    torch.backends.cuda.matmul.allow_tf32 = False   # float32 references in float32
    parts = {}
    for part in only:
        t = time.perf_counter()
        if device == 'cuda': torch.cuda.reset_peak_memory_stats()
        log(f"part {part}")
        if part == 'ceilings': parts[part] = part_ceilings(args.quick)
        elif part == 'correctness': parts[part] = part_correctness(shapes, device)
        elif part in ('int4', 'nf4', 'int8'): parts[part] = part_timing(part, shapes, device)
        elif part == 'w8a8':
            w8a8_shapes = QUICK_W8A8_SHAPES if args.quick else W8A8_SHAPES
            if args.shapes: w8a8_shapes = {s: w8a8_shapes[s] for s in args.shapes if s in w8a8_shapes}
            parts[part] = part_w8a8(w8a8_shapes, QUICK_W8A8_TOKENS if args.quick else W8A8_TOKENS, device)
        else: parts[part] = part_tune(shapes, args.tune_kernel,
                                      min(args.tune_seconds, 15) if args.quick else args.tune_seconds, device)
        meta = run_metadata(device)  # each part names its own run: merged files keep the first file's header
        parts[part]['run'] = {key: meta[key] for key in ('device', 'commit', 'dirty', 'recorded')}
        parts[part].update(seconds=time.perf_counter() - t, quick=args.quick,
                           shapes=parts[part].get('shapes', list(shapes)))
        if configs and part != 'tune': parts[part]['int4_configs'] = dict(file=args.int4_configs.name, table=configs)
        if device == 'cuda': parts[part]['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
        log(f"part {part}: {parts[part]['seconds']:.0f} s")
    out = args.out or (DEFAULT_OUT if device == 'cuda' else None)
    if out is not None: write(out, parts, device)
    else: log("no CUDA: nothing written (pass --out to keep the checks)")
    failed = [r for r in parts.get('correctness', {}).get('checks', []) if r.get('passed') is False]
    if failed: raise SystemExit(f"{len(failed)} correctness check(s) failed: {[(r['shape'], r.get('batch'), r['method']) for r in failed]}")


if __name__ == '__main__':
    main()
