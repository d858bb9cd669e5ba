"""NF4 dequantization throughput (chapter 07): our torch code, the same through torch.compile, a fused
Triton kernel, and bitsandbytes' CUDA kernel, on Llama-3-8B's weight shapes, against the card's
device-to-device copy bandwidth.

Correctness first: every path must give bitsandbytes' dequantized bfloat16 weight (bit for bit, or
within one bfloat16 rounding, and the JSON says which); only then is anything timed.

    python bench/nf4_dequant.py [--out bench/results/nf4_dequant.json] [--quick]

`--quick` uses small shapes and short timings. Without CUDA it runs only the correctness checks, on
the CPU against bitsandbytes' CPU kernel (and checks the Triton kernel too when triton is installed and
TRITON_INTERPRET=1), prints them, and writes JSON only if `--out` is given.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
import bitsandbytes
import bitsandbytes.functional as bnbF
from quantcourse.nf4 import Weight4bit, code_book, quantize_4bit, same_bits, unpack_nibbles
from benchmeta import run_metadata

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU images have no triton; the GPU image does
    triton = None

SHAPES = {'4096x4096 (q_proj)': (4096, 4096), '4096x14336 (down_proj)': (4096, 14336),
          '14336x4096 (gate/up_proj)': (14336, 4096)}
QUICK_SHAPES = {'256x256': (256, 256), '256x896': (256, 896), '896x256': (896, 256)}
BLOCKSIZE, DTYPE = 64, torch.bfloat16
DEFAULT_OUT = Path(__file__).resolve().parent / 'results' / 'nf4_dequant.json'

# ---------------------------------------------------------------- the fused Triton kernel
if triton is not None:
    @triton.jit
    def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, n_values,
                                BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):
        "Each program reads BYTES packed bytes and writes 2*BYTES values: code[nibble] * absmax[block]."
        start = tl.program_id(0) * BYTES
        offsets = start + tl.arange(0, BYTES)
        byte = tl.load(packed_ptr + offsets, mask=offsets < n_bytes, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (2 * offsets) // BLOCKSIZE, mask=offsets < n_bytes, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * scale   # the first value of a pair is the high nibble
        low = tl.load(code_ptr + (byte & 15)) * scale
        values = tl.interleave(high, low)                # float32, rounded once (to nearest even) below;
        # note: triton's CPU interpreter (TRITON_INTERPRET=1) truncates float32 -> bfloat16 instead
        out_offsets = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty, fp_downcast_rounding='rtne'), mask=out_offsets < n_values)


def triton_dequantize(w: Weight4bit, dtype=DTYPE, bytes_per_program: int = 1024) -> torch.Tensor:
    "Dequantize `w` (plain, not double-quantized) with the fused Triton kernel."
    if triton is None: raise RuntimeError("triton is not installed")
    if w.double_quant: raise ValueError("the Triton kernel takes float32 block scales; dequantize nested scales first")
    out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    n_bytes = w.packed.numel()
    _dequantize_4bit_kernel[(triton.cdiv(n_bytes, bytes_per_program),)](
        w.packed, w.absmax, code_book(w.quant_type, w.packed.device), out, n_bytes, w.numel,
        BLOCKSIZE=w.blocksize, BYTES=bytes_per_program)
    return out


# ---------------------------------------------------------------- helpers
def bnb_dequantize(w: Weight4bit, dtype=DTYPE) -> torch.Tensor:
    "bitsandbytes' dequantization of the same bytes (its CUDA kernel on a GPU, its CPU kernel on a CPU)."
    state = bnbF.QuantState(absmax=w.absmax, shape=torch.Size(w.shape), code=code_book(w.quant_type, w.packed.device),
                            blocksize=w.blocksize, quant_type=w.quant_type, dtype=dtype)
    return bnbF.dequantize_4bit(w.packed.view(-1, 1), state)


def compare(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    "Bitwise equal? If not: the largest difference, and whether every value is within one bfloat16 step."
    ours = ours.reshape(reference.shape)
    if same_bits(ours, reference): return dict(bitwise=True, within_one_rounding=True, max_abs_diff=0.0)
    diff = (ours.float() - reference.float()).abs()
    step = reference.float().abs() * 2.0 ** -7 + 1e-30  # one bfloat16 step (8 significant bits) at each value
    return dict(bitwise=False, within_one_rounding=bool((diff <= step).all()), max_abs_diff=diff.max().item())


def time_ms(fn, quick: bool) -> float:
    "Median milliseconds per call on the GPU: triton.testing.do_bench if available, else CUDA events."
    if triton is not None:
        return triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=20 if quick else 200, return_mode='median')
    for _ in range(5): fn()
    times = []
    for _ in range(10 if quick else 100):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(quick: bool) -> float:
    "GB/s of a large device-to-device copy (bytes read + bytes written)."
    n_bytes = (64 if quick else 1024) * 2**20
    src, dst = torch.empty(n_bytes, dtype=torch.uint8, device='cuda'), torch.empty(n_bytes, dtype=torch.uint8, device='cuda')
    return 2 * n_bytes / time_ms(lambda: dst.copy_(src), quick) / 1e6


def useful_bytes(w: Weight4bit, dtype=DTYPE) -> int:
    "Bytes a dequantization must move: packed codes and float32 scales read, the output written."
    return w.packed.numel() + 4 * w.absmax.numel() + w.numel * torch.empty((), dtype=dtype).element_size()


def methods(device: str) -> dict:
    "The dequantization paths available on this device."
    paths = {'torch ops (ours)': lambda w: w.dequantize(DTYPE)}
    if device == 'cuda':
        paths['torch.compile (ours)'] = torch.compile(lambda w: w.dequantize(DTYPE))
    if triton is not None and (device == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'):
        paths['Triton fused (ours)'] = triton_dequantize
    paths['bitsandbytes ' + ('CUDA' if device == 'cuda' else 'CPU')] = bnb_dequantize
    return paths


# ---------------------------------------------------------------- the run
def run(quick: bool = False) -> dict:
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    shapes = QUICK_SHAPES if quick or device == 'cpu' else SHAPES
    paths, generator = methods(device), torch.Generator().manual_seed(0)
    reference_name = [name for name in paths if name.startswith('bitsandbytes')][0]
    checks, timings, weights = [], [], {}
    for label, shape in shapes.items():
        weight = (torch.randn(shape, generator=generator) * 0.02).to(DTYPE).to(device)
        packed, state = bnbF.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type='nf4')
        w = Weight4bit(packed.view(-1), state.absmax, tuple(shape), DTYPE, BLOCKSIZE, 'nf4')
        mine = quantize_4bit(weight, BLOCKSIZE, 'nf4')   # our quantizer on the same device, compared code by code
        codes_differ = (unpack_nibbles(mine.packed, w.numel) != unpack_nibbles(w.packed, w.numel)).sum().item()
        checks.append(dict(shape=label, method='quantize_4bit (ours) vs bitsandbytes', codes_differ=codes_differ,
                           absmax_bitwise=same_bits(mine.absmax, state.absmax)))
        reference = paths[reference_name](w)
        for name, fn in list(paths.items()):
            if name == reference_name: continue
            try: output = fn(w)
            except Exception as error:  # torch.compile is optional: record why it failed and time the rest
                if name != 'torch.compile (ours)': raise
                checks.append(dict(shape=label, method=name, error=f"{type(error).__name__}: {error}"[:300]))
                del paths[name]; continue
            result = compare(output, reference)
            checks.append(dict(shape=label, method=name, **result))
            if not result['within_one_rounding']:
                raise SystemExit(f"{name} disagrees with {reference_name} on {label}: {result}; not timing anything")
        weights[label] = w
    result = dict(benchmark='nf4_dequant', **run_metadata(device), bitsandbytes=bitsandbytes.__version__,
                  dtype='bfloat16', blocksize=BLOCKSIZE, quick=quick, timed=device == 'cuda', correctness=checks)
    if device != 'cuda': return result
    result['copy_gb_per_s'] = copy = copy_bandwidth(quick)
    for label, w in weights.items():
        for name, fn in paths.items():
            ms = time_ms(lambda: fn(w), quick)
            gbs = useful_bytes(w) / ms / 1e6
            timings.append(dict(shape=label, method=name, ms=ms, gb_per_s=gbs, fraction_of_copy=gbs / copy))
    result['timings'] = timings
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=None, help=f'JSON to write (default on a GPU: {DEFAULT_OUT})')
    parser.add_argument('--quick', action='store_true', help='small shapes, short timings; on a CPU only the correctness checks')
    args = parser.parse_args(argv)
    result = run(args.quick)
    for check in result['correctness']: print(json.dumps(check))
    for timing in result.get('timings', []):
        print(f"{timing['shape']:>28}  {timing['method']:<22} {timing['ms']:8.3f} ms  {timing['gb_per_s']:7.0f} GB/s  "
              f"({timing['fraction_of_copy']:.0%} of copy)")
    if 'copy_gb_per_s' in result: print(f"device-to-device copy: {result['copy_gb_per_s']:.0f} GB/s on {result['device']}")
    out = args.out or (DEFAULT_OUT if torch.cuda.is_available() else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + '\n')
        print(f"wrote {out}")
    else: print("no CUDA: correctness checked on the CPU, nothing timed, nothing written")


if __name__ == '__main__':
    main()
