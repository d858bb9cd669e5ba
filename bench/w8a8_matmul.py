"""W8A8 linear layer with a real INT8 matmul (`torch._int_mm`) against a float16 `nn.Linear`.

Correctness first, on the very tensors that are then timed, for every (shape, batch) before it is timed:
- the int32 product of the INT8 codes (`int8_matmul`, i.e. `torch._int_mm` on CUDA) must equal the float64
  product of the same codes exactly (float64 is exact here: every partial sum is an integer of magnitude at most
  127 * 128 * in_features < 2**31 < 2**53, so no summation order rounds);
- `W8A8Linear`'s output must match its fake-quantized float64 reference (the same activation codes and scales
  times the dequantized weight, in float64) to a relative error below TOLERANCE, both as max |out - ref| / max |ref|
  and as ||out - ref|| / ||ref||: the layer works in float32 and rounds its output once to the input dtype
  (float16 on CUDA: at most 2**-11 = 4.9e-4 relative);
- the float16 `nn.Linear` baseline is compared with the float64 product of its own inputs, for the record.
A failed check stops the script before that shape is timed. The JSON's `correctness` says what was checked and
each row carries its check results. Then timings at batches of 32 to 4096 tokens, on SmolLM2-135M's layer shapes
and on Llama-3-8B's. The JSON also names the card, the commit and the time (benchmeta.run_metadata).

    python bench/w8a8_matmul.py            # on a CUDA machine: writes bench/results/w8a8_matmul.json
    python bench/w8a8_matmul.py --quick    # anywhere: small shapes, correctness and CPU timings, prints only
"""
import argparse, json, statistics, time
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from quantcourse.outliers import W8A8Linear, int8_matmul, quantize_activations
from benchmeta import run_metadata

# (in_features, out_features) of the linear layers
SHAPES = {'SmolLM2 q/o_proj 576x576': (576, 576), 'SmolLM2 k/v_proj 576x192': (576, 192),
          'SmolLM2 gate/up_proj 576x1536': (576, 1536), 'SmolLM2 down_proj 1536x576': (1536, 576),
          'Llama-3-8B q/o_proj 4096x4096': (4096, 4096), 'Llama-3-8B gate/up_proj 4096x14336': (4096, 14336),
          'Llama-3-8B down_proj 14336x4096': (14336, 4096)}
BATCHES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
TOLERANCE = 1e-3  # W8A8Linear vs its fake-quantized float64 reference, both error measures


def timed_ms(fn, device, min_seconds: float = 0.2) -> float:
    "Median milliseconds per call of `fn()`, after a warm-up, synchronizing the device."
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(3 if min_seconds > 0.05 else 1): fn()
    sync(); start = time.perf_counter(); fn(); sync()
    once = max(time.perf_counter() - start, 1e-6)
    per_repeat = max(1, int(min(0.02, min_seconds) / once))  # each measured repeat lasts about 20 ms
    times, spent = [], 0.0
    while spent < min_seconds or len(times) < 3:
        sync(); start = time.perf_counter()
        for _ in range(per_repeat): fn()
        sync(); elapsed = time.perf_counter() - start
        times.append(elapsed / per_repeat); spent += elapsed
    return 1000 * statistics.median(times)


def rel_errors(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    "max |out - ref| / max |ref| and ||out - ref|| / ||ref||, in float64."
    diff = out.double() - reference
    return (diff.abs().max() / reference.abs().max()).item(), (diff.norm() / reference.norm()).item()


def check(layer: W8A8Linear, x: torch.Tensor, weight: torch.Tensor, codes: torch.Tensor) -> dict:
    "The checks on exactly what is timed: the int32 product of `codes`, `layer(x)`, and the float baseline `F.linear(x, weight)`."
    accumulated = int8_matmul(codes, layer.weight_codes)
    exact = codes.double() @ layer.weight_codes.double().T  # exact in float64 (|partial sums| < 2**31 < 2**53)
    _, scale = quantize_activations(x, layer.granularity)
    reference = (codes.double() * scale.double()) @ layer.weight().dequantize(torch.float64).T
    if layer.bias is not None: reference = reference + layer.bias.double()
    max_rel, rel_l2 = rel_errors(layer(x), reference)
    _, float_rel_l2 = rel_errors(F.linear(x, weight), x.double() @ weight.double().T)
    result = dict(int32_exact=bool(accumulated.dtype == torch.int32 and torch.equal(accumulated.double(), exact)),
                  max_rel_error_vs_float64=max_rel, rel_l2_error_vs_float64=rel_l2, float_linear_rel_l2_error_vs_float64=float_rel_l2,
                  used_int_mm=bool(x.is_cuda and codes.shape[0] > 16 and codes.shape[1] % 8 == 0 and layer.out_features % 8 == 0))
    result['checks_passed'] = result['int32_exact'] and max_rel < TOLERANCE and rel_l2 < TOLERANCE
    return result


def run(shapes: dict, batches: list, device: torch.device, dtype: torch.dtype, min_seconds: float = 0.2) -> list:
    "Check, then time, every (shape, batch) pair; stop at the first failed check."
    rows, g = [], torch.Generator().manual_seed(0)
    for name, (in_features, out_features) in shapes.items():
        linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.normal_(linear.weight, std=in_features ** -0.5, generator=g)
        layer = W8A8Linear.from_linear(linear, 'token').to(device)
        weight = linear.weight.detach().to(device, dtype)
        for batch in batches:
            x = torch.randn(batch, in_features, generator=g).to(device, dtype)
            x[:, 7] *= 20  # one outlier channel, as in real activations
            codes, _ = quantize_activations(x, 'token')
            row = dict(shape=name, in_features=in_features, out_features=out_features, batch=batch, **check(layer, x, weight, codes))
            if not row['checks_passed']:
                raise SystemExit(f"check failed for {name}, batch {batch}: {row}; not timing it (tolerance {TOLERANCE})")
            row['fp16_ms'] = timed_ms(lambda: F.linear(x, weight), device, min_seconds)
            row['int8_mm_ms'] = timed_ms(lambda: int8_matmul(codes, layer.weight_codes), device, min_seconds)
            row['w8a8_layer_ms'] = timed_ms(lambda: layer(x), device, min_seconds)
            flops = 2 * batch * in_features * out_features
            row.update(fp16_tflops=flops / row['fp16_ms'] / 1e9, int8_tops=flops / row['int8_mm_ms'] / 1e9)
            print(f"{name:36s} batch {batch:5d}: fp16 {row['fp16_ms']:.3f} ms, int8 mm {row['int8_mm_ms']:.3f} ms, "
                  f"W8A8 layer {row['w8a8_layer_ms']:.3f} ms, exact {row['int32_exact']}, rel err {row['max_rel_error_vs_float64']:.1e}", flush=True)
            rows.append(row)
    return rows


CORRECTNESS = dict(
    checked_before_timing='every (shape, batch) row, on the same activations, codes and layer that are then timed; a failure stops the run',
    int32_exact="int8_matmul(codes, weight_codes) (torch._int_mm on CUDA) equals codes.double() @ weight_codes.double().T element for "
                "element (float64 is exact: every partial sum is an integer below 127 * 128 * in_features < 2**31 < 2**53)",
    max_rel_error_vs_float64="max |W8A8Linear(x) - ref| / max |ref|, ref = (codes * scales) @ dequantized weight.T in float64",
    rel_l2_error_vs_float64="||W8A8Linear(x) - ref|| / ||ref||, same reference",
    float_linear_rel_l2_error_vs_float64="||F.linear(x, w) - x @ w.T (float64)|| / ||x @ w.T||: the float baseline's own rounding (recorded, not bounded)",
    tolerance=TOLERANCE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='small shapes and batches; runs on the CPU; prints only unless --out is given')
    parser.add_argument('--out', default=None, help='JSON path (default: bench/results/w8a8_matmul.json, or nothing with --quick)')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type != 'cuda' and not args.quick: parser.error("no CUDA device: the timings need a GPU; use --quick for the CPU checks")
    shapes = {k: v for k, v in SHAPES.items() if k.startswith('SmolLM2')} if args.quick else SHAPES
    batches = [32, 64] if args.quick else BATCHES
    dtype = torch.float16 if device.type == 'cuda' else torch.float32  # float16 matmuls are slow on most CPUs
    if args.quick:  # torch's own int8 matmul also exists on the CPU: check it gives the same integers
        a = torch.randint(-128, 128, (40, 576), dtype=torch.int8); b = torch.randint(-128, 128, (64, 576), dtype=torch.int8)
        assert torch.equal(torch._int_mm(a, b.T), int8_matmul(a, b)), "torch._int_mm on the CPU disagrees with int8_matmul"
        cpu_int_mm = True
    rows = run(shapes, batches, device, dtype, min_seconds=0.01 if args.quick else 0.2)
    assert all(r['checks_passed'] for r in rows)  # run() stops at the first failure; this guards the JSON
    print(f"checked before timing: {len(rows)} rows, int32 exact in all, W8A8Linear within {TOLERANCE:g} of float64 "
          f"(worst max-rel {max(r['max_rel_error_vs_float64'] for r in rows):.1e}, worst rel-L2 {max(r['rel_l2_error_vs_float64'] for r in rows):.1e})")
    out = args.out or (None if args.quick else Path(__file__).parent/'results'/'w8a8_matmul.json')
    if out is None: return
    result = dict(**run_metadata(device), dtype=str(dtype), quick=args.quick,
                  activations='INT8 per-token (dynamic)', weights='INT8 per-output-channel',
                  correctness=dict(CORRECTNESS, rows_checked=len(rows), all_passed=True,
                                   cpu_int_mm_agrees=cpu_int_mm if args.quick else None), results=rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {out}")


if __name__ == '__main__': main()
