"""W8A8 linear layer with a real INT8 matmul (`torch._int_mm`) against a float16 `nn.Linear`.

Correctness first: the int32 product of the INT8 codes must equal a float64 product of the same codes
(exactly), and `W8A8Linear`'s output must match its fake-quantized float64 reference. Then timings at
batches of 32 to 4096 tokens, on SmolLM2-135M's layer shapes and on Llama-3-8B's.

    python bench/w8a8_matmul.py            # on a CUDA machine: writes bench/results/w8a8_matmul.json
    python bench/w8a8_matmul.py --quick    # anywhere: small shapes, correctness and CPU timings, prints only
"""
import argparse, json, platform, statistics, time
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from quantcourse.outliers import W8A8Linear, int8_matmul, quantize_activations

# (in_features, out_features) of the linear layers
SHAPES = {'SmolLM2 q/o_proj 576x576': (576, 576), 'SmolLM2 k/v_proj 576x192': (576, 192),
          'SmolLM2 gate/up_proj 576x1536': (576, 1536), 'SmolLM2 down_proj 1536x576': (1536, 576),
          'Llama-3-8B q/o_proj 4096x4096': (4096, 4096), 'Llama-3-8B gate/up_proj 4096x14336': (4096, 14336),
          'Llama-3-8B down_proj 14336x4096': (14336, 4096)}
BATCHES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


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


def check(layer: W8A8Linear, x: torch.Tensor) -> dict:
    "Integer product vs float64 product of the same codes, and the layer vs its fake-quantized reference."
    codes, scale = quantize_activations(x, layer.granularity)
    accumulated = int8_matmul(codes, layer.weight_codes)
    exact = codes.double() @ layer.weight_codes.double().T  # float64 holds these integers exactly (|sum| < 2**53)
    reference = (codes.double() * scale.double()) @ layer.quantized().dequantize(torch.float64).T
    if layer.bias is not None: reference = reference + layer.bias.double()
    out = layer(x).double()
    return dict(int32_exact=bool(torch.equal(accumulated.double(), exact)),
                max_rel_error_vs_float64=((out - reference).abs().max() / reference.abs().max()).item(),
                used_int_mm=bool(x.is_cuda and codes.shape[0] > 16 and codes.shape[1] % 8 == 0 and layer.out_features % 8 == 0))


def run(shapes: dict, batches: list, device: torch.device, dtype: torch.dtype, min_seconds: float = 0.2) -> list:
    "Check and time every (shape, batch) pair."
    rows, g = [], torch.Generator().manual_seed(0)
    for name, (in_features, out_features) in shapes.items():
        linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.normal_(linear.weight, std=in_features ** -0.5, generator=g)
        layer = W8A8Linear.from_linear(linear, 'token').to(device)
        weight = linear.weight.detach().to(device, dtype)
        for batch in batches:
            x = torch.randn(batch, in_features, generator=g).to(device, dtype)
            x[:, 7] *= 20  # one outlier channel, as in real activations
            row = dict(shape=name, in_features=in_features, out_features=out_features, batch=batch, **check(layer, x.float()))
            codes, _ = quantize_activations(x, 'token')
            row['fp16_ms'] = timed_ms(lambda: F.linear(x, weight), device, min_seconds)
            row['int8_mm_ms'] = timed_ms(lambda: int8_matmul(codes, layer.weight_codes), device, min_seconds)
            row['w8a8_layer_ms'] = timed_ms(lambda: layer(x), device, min_seconds)
            flops = 2 * batch * in_features * out_features
            row.update(fp16_tflops=flops / row['fp16_ms'] / 1e9, int8_tops=flops / row['int8_mm_ms'] / 1e9)
            print(f"{name:36s} batch {batch:5d}: fp16 {row['fp16_ms']:.3f} ms, int8 mm {row['int8_mm_ms']:.3f} ms, "
                  f"W8A8 layer {row['w8a8_layer_ms']:.3f} ms, exact {row['int32_exact']}, rel err {row['max_rel_error_vs_float64']:.1e}", flush=True)
            rows.append(row)
    return rows


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
    rows = run(shapes, batches, device, dtype, min_seconds=0.01 if args.quick else 0.2)
    assert all(r['int32_exact'] for r in rows), "the int32 product differs from the float64 product of the same codes"
    assert all(r['max_rel_error_vs_float64'] < 1e-3 for r in rows), "W8A8Linear differs from its fake-quantized reference"
    out = args.out or (None if args.quick else Path(__file__).parent/'results'/'w8a8_matmul.json')
    if out is None: return
    result = dict(device=torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu',
                  torch=torch.__version__, cuda=torch.version.cuda, dtype=str(dtype), quick=args.quick,
                  activations='INT8 per-token (dynamic)', weights='INT8 per-output-channel', results=rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {out}")


if __name__ == '__main__': main()
