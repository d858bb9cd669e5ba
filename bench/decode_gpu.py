"""End-to-end decoding through the library's layers (chapter 09): a Llama-3-8B-shaped decoder in plain torch, bfloat16
against the same model quantized by the course's layers, which run chapter 09's Triton kernels on CUDA.

Parts, chosen with --only:
- check: the contract's kernel hook on the card. For each layer kind the kernels are registered for (RTN/AWQ's
  `QuantLinear` int4 g128 asymmetric and symmetric, `GPTQLinear` in a random column order, `NF4Linear` with double
  quantization and a bfloat16 compute dtype, per-token `W8A8Linear`), on two of Llama-3-8B's shapes (4096x4096 and
  14336x4096), float16 and bfloat16, 1, 16 and 64 rows (W8A8 also 2048): the layer's output with the kernels
  (`kernel_output`, which must not be None) against the same layer inside `use_kernels(False)` (its `compute`,
  dequantize-then-`F.linear`); the relative error must be under 2e-3 (float16) / 1.5e-2 (bfloat16), by the dtype
  the layer computes in (NF4's compute dtype, else x's). Also the
  whole decoder's logits for one step with and without the kernels. Then the time of one layer's forward both ways.
- decode: greedy decoding tokens/s of the decoder (Llama-3-8B's shapes: 32 blocks, hidden 4096, MLP 14336, 32 query
  and 8 key/value heads of 128, vocabulary 128,256; random weights; a static KV cache of 1,024 positions; one
  step captured in a CUDA graph and replayed), at batch 1 and 16, for: bfloat16 (`nn.Linear`, cuBLAS); int4 g128
  (`QuantLinear`, our int4 kernel); the same int4 model with the kernels switched off (dequantize in every step,
  the reference path); NF4 with double quantization (`NF4Linear`, our NF4 kernel). The lm_head stays bfloat16 in
  every variant. Recorded per row: tokens/s, the step's milliseconds, the bytes of weights one step reads and the
  bandwidth that implies, and a breakdown of one eager step's CUDA time (torch.profiler) into the quantized
  layers' kernels, cuBLAS, attention and the rest.

The model is built here rather than taken from transformers so that one step is a fixed sequence of kernels a CUDA
graph can hold (position and mask live on the device; the greedy token is written back inside the graph).
`--quick` runs both parts on a tiny decoder on the CPU (no graph, no kernels: the reference path) to show that the
script works. The JSON (--out, default bench/results/decode_gpu.json) is rewritten after every row.
"""
from __future__ import annotations
import argparse, json, math, sys, tempfile, time
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from quantcourse.core import QuantizedLinear, kernel_output, use_kernels, replace_linears
from quantcourse.scales import QuantLinear, quantize_weight
from quantcourse.gptq import GPTQLinear, GPTQWeight
from quantcourse.nf4 import NF4Linear
from quantcourse.outliers import W8A8Linear
from quantcourse.kernels import relative_error  # importing it registers the kernels
from benchmeta import run_metadata, sync

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'decode_gpu.json'
LLAMA3_8B = dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
TINY = dict(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=512)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rms_norm(x, weight, eps=1e-5):
    "Llama's RMSNorm, in float32."
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x, cos, sin):
    "Rotary position embedding (the half-split form Llama uses) of x (batch, heads, 1, head_dim)."
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


class Block(nn.Module):
    "One Llama block: attention over a static KV cache, then the gated MLP."
    def __init__(self, c, batch, cache_len, dtype):
        super().__init__()
        h, d = c['hidden'], c['head_dim']
        self.heads, self.kv_heads, self.head_dim = c['heads'], c['kv_heads'], d
        lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj = lin(h, c['heads'] * d), lin(h, c['kv_heads'] * d), lin(h, c['kv_heads'] * d)
        self.o_proj = lin(c['heads'] * d, h)
        self.gate_proj, self.up_proj, self.down_proj = lin(h, c['intermediate']), lin(h, c['intermediate']), lin(c['intermediate'], h)
        self.norm1, self.norm2 = nn.Parameter(torch.ones(h, dtype=dtype)), nn.Parameter(torch.ones(h, dtype=dtype))
        self.register_buffer('k_cache', torch.zeros(batch, c['kv_heads'], cache_len, d, dtype=dtype))
        self.register_buffer('v_cache', torch.zeros(batch, c['kv_heads'], cache_len, d, dtype=dtype))

    def forward(self, h, pos, cos, sin, mask):
        b = h.shape[0]
        x = rms_norm(h, self.norm1)
        q = self.q_proj(x).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k); self.v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        h = h + self.o_proj(a.transpose(1, 2).reshape(b, 1, -1))
        x = rms_norm(h, self.norm2)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Decoder(nn.Module):
    "A Llama-shaped decoder that decodes one token per sequence per call; its state (position, token) on the device."
    def __init__(self, c, batch, cache_len, dtype, device):
        super().__init__()
        self.c, self.cache_len = c, cache_len
        self.embed = nn.Embedding(c['vocab'], c['hidden'], dtype=dtype)
        self.layers = nn.ModuleList(Block(c, batch, cache_len, dtype) for _ in range(c['layers']))
        self.norm = nn.Parameter(torch.ones(c['hidden'], dtype=dtype))
        self.lm_head = nn.Linear(c['hidden'], c['vocab'], bias=False, dtype=dtype)
        inv = 1.0 / (500000.0 ** (torch.arange(0, c['head_dim'], 2).float() / c['head_dim']))
        angles = torch.outer(torch.arange(cache_len).float(), inv)
        angles = torch.cat((angles, angles), -1)
        self.register_buffer('cos', angles.cos().to(dtype)); self.register_buffer('sin', angles.sin().to(dtype))
        self.register_buffer('pos', torch.zeros(1, dtype=torch.long))
        self.register_buffer('token', torch.zeros(batch, 1, dtype=torch.long))
        self.to(device)

    def step(self):
        "One greedy step: read `token` at `pos`, write the next token into `token`, advance `pos`. Returns the logits."
        cos, sin = self.cos[self.pos].view(1, 1, 1, -1), self.sin[self.pos].view(1, 1, 1, -1)
        mask = (torch.arange(self.cache_len, device=self.pos.device) <= self.pos).view(1, 1, 1, -1)
        h = self.embed(self.token)
        for layer in self.layers: h = layer(h, self.pos, cos, sin, mask)
        logits = self.lm_head(rms_norm(h, self.norm))
        self.token.copy_(logits.argmax(-1)); self.pos.add_(1)
        return logits

    def reset(self, seed=0):
        "Position 0, a fixed random first token per sequence, empty caches."
        g = torch.Generator().manual_seed(seed)
        self.pos.zero_(); self.token.copy_(torch.randint(0, self.c['vocab'], self.token.shape, generator=g))
        for layer in self.layers: layer.k_cache.zero_(); layer.v_cache.zero_()


def build(c, batch, cache_len, dtype, device, seed=0):
    "The decoder with seeded random weights (std 0.02, as Llama initializes)."
    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(c, batch, cache_len, dtype, device)
        for name, p in model.named_parameters():
            if 'norm' not in name: nn.init.normal_(p, std=0.02)
    return model.eval()


def quantize(model, kind):
    "Replace every block linear (not the lm_head) by the course layer of `kind`."
    make = {'int4': lambda n, l: QuantLinear.from_linear(l, 4, 128),
            'nf4': lambda n, l: NF4Linear.from_linear(l, 64, 'nf4', True, torch.bfloat16)}[kind]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != 'lm_head']
    for name in names:  # one at a time, so the float weights go as the quantized ones come
        replace_linears(model, make, [name])
    return model


def weight_bytes(model) -> float:
    "Bytes of weights one step reads: every linear's stored weight (quantized layers: their buffers), the lm_head."
    total = 0.0
    for m in model.modules():
        if isinstance(m, QuantizedLinear): total += m.bits_per_weight * m.in_features * m.out_features / 8
        elif isinstance(m, nn.Linear): total += m.weight.numel() * m.weight.element_size()
    return total  # the embedding: one row per sequence, negligible


def layer_cases(shapes, device):
    "(label, layer) for each layer kind the kernels are registered for, on each shape."
    cases = []
    for n, k in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False, device=device)
        nn.init.normal_(linear.weight, std=0.02)
        order = torch.randperm(k, device=device).short()
        gptq = GPTQLinear.from_weight(GPTQWeight(quantize_weight(linear.weight.detach(), 4, 128, False), order))
        cases += [(f'int4 g128 {n}x{k}', QuantLinear.from_linear(linear, 4, 128)),
                  (f'int4 g128 symmetric {n}x{k}', QuantLinear.from_linear(linear, 4, 128, True)),
                  (f'GPTQ act order g128 {n}x{k}', gptq),
                  (f'NF4 double quant {n}x{k}', NF4Linear.from_linear(linear, 64, 'nf4', True, torch.bfloat16)),
                  (f'W8A8 per token {n}x{k}', W8A8Linear.from_linear(linear))]
    return cases


def time_call(fn, device, repeats=50) -> float:
    "Median seconds of fn() (CUDA events on a GPU, perf_counter on the CPU)."
    for _ in range(3): fn()
    sync(device); times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize(); times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def part_check(result, c, device, quick, save):
    shapes = [(64, 256), (128, 256)] if quick else [(4096, 4096), (14336, 4096)]
    rows = []
    for label, layer in layer_cases(shapes, device):
        for dtype in (torch.float16, torch.bfloat16):
            counts = [1, 16, 64] + ([2048] if label.startswith('W8A8') else [])
            for m in counts:
                x = (torch.randn(m, layer.in_features, device=device) * (3 if 'W8A8' in label else 1)).to(dtype)
                with torch.no_grad():
                    out = kernel_output(layer, x)
                    with use_kernels(False): expected = layer(x)
                ran = out is not None
                error = relative_error(out.float(), expected.float()) if ran else None
                # NF4 computes in its compute dtype (bfloat16 here), whatever x's dtype
                compute = getattr(layer, 'compute_dtype', None) or dtype
                ok = ran and error < TOLERANCE[compute]
                row = dict(layer=label, dtype=str(dtype)[6:], rows=m, kernel_ran=ran, relative_error=error, ok=ok)
                if ran and m in (1, 16):
                    with torch.no_grad():
                        row['kernel_us'] = 1e6 * time_call(lambda: layer(x), device)
                        with use_kernels(False): row['compute_us'] = 1e6 * time_call(lambda: layer(x), device)
                rows.append(row)
                print(f"{label:<34} {row['dtype']:<8} {m:>4} rows: kernel {'ran' if ran else 'DID NOT RUN'}, "
                      f"relative error {error if error is None else f'{error:.1e}'}"
                      + (f", {row['kernel_us']:.1f} us vs compute {row['compute_us']:.1f} us" if 'kernel_us' in row else ''))
                if not ok and not quick: print(f"WARNING: {label} {row['dtype']} {m} rows failed the check")
        result['check'] = dict(rows=rows, all_ok=all(r['ok'] for r in rows))
        save()
    # the whole decoder, one step, kernels on and off
    model = quantize(build(c, 1, 64, torch.bfloat16, device), 'int4')
    with torch.no_grad():
        model.reset(); on = model.step().float()
        model.reset()
        with use_kernels(False): off = model.step().float()
    error = relative_error(on, off)
    result['check']['decoder_logits_relative_error'] = error
    result['check']['decoder_same_greedy_tokens'] = bool((on.argmax(-1) == off.argmax(-1)).all())
    print(f"decoder, one step: logits relative error kernels vs compute {error:.1e}")
    save(); del model


def profile_step(model, device) -> dict:
    "CUDA milliseconds of one eager step by kind of kernel: the quantized layers' Triton kernels, cuBLAS, attention, the rest."
    if device.type != 'cuda': return {}
    from torch.profiler import profile, ProfilerActivity
    with torch.no_grad():
        model.step(); sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.step(); sync(device)
    kinds = dict(quantized_layers=0.0, cublas=0.0, attention=0.0, other=0.0)
    for e in prof.key_averages():
        t = getattr(e, 'device_time_total', None) or getattr(e, 'cuda_time_total', 0)
        if e.device_type is not None and str(e.device_type).endswith('CPU'): continue
        name = e.key.lower()
        if any(s in name for s in ('_int4_matmul', '_int4_gemv', '_nf4_matmul', '_w8a8', '_token_scales', '_w8a16', 'dequantize')):
            k = 'quantized_layers'  # before cuBLAS's test: the GEMV kernel's name holds 'gemv'
        elif any(s in name for s in ('gemm', 'gemv', 'cublas', 'cutlass', 'sm90_xmma', 'nvjet')): k = 'cublas'
        elif any(s in name for s in ('flash', 'attention', 'fmha', 'sdpa', 'efficient')): k = 'attention'
        else: k = 'other'
        kinds[k] += t / 1e3
    return {k: round(v, 3) for k, v in kinds.items()}


def part_decode(result, c, device, quick, save, steps, cache_len):
    rows = result.setdefault('decode', [])
    variants = [('bfloat16', None, True), ('int4 g128 (our kernel)', 'int4', True),
                ('int4 g128, kernels off (dequantize each step)', 'int4', False),
                ('NF4 + double quant (our kernel)', 'nf4', True)]
    for batch in (1, 16):
        for label, kind, kernels_on in variants:
            if any(r['variant'] == label and r['batch'] == batch for r in rows): continue
            t0 = time.perf_counter()
            model = build(c, batch, cache_len, torch.bfloat16, device)
            if kind: quantize(model, kind)
            built = time.perf_counter() - t0
            with torch.no_grad(), use_kernels(kernels_on):
                model.reset()
                for _ in range(3): model.step()  # warm-up: compiles, prepares the kernels' weights
                sync(device)
                graph = None
                if device.type == 'cuda':
                    try:
                        stream = torch.cuda.Stream(); stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):
                            for _ in range(2): model.step()
                        torch.cuda.current_stream().wait_stream(stream)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph): model.step()
                    except Exception as e:  # recorded: eager timing instead
                        print(f"CUDA graph capture failed ({type(e).__name__}: {e}); timing eager steps")
                        graph = None
                run = graph.replay if graph is not None else model.step
                model.reset(); sync(device)
                start = time.perf_counter()
                for _ in range(steps): run()
                sync(device)
                seconds = time.perf_counter() - start
                breakdown = profile_step(model, device) if not quick else {}
            wbytes = weight_bytes(model)
            row = dict(variant=label, batch=batch, steps=steps, cache_len=cache_len, cuda_graph=graph is not None,
                       tokens_per_s=batch * steps / seconds, step_ms=1e3 * seconds / steps,
                       weight_gb_per_step=wbytes / 1e9, weight_bandwidth_gb_s=wbytes * steps / seconds / 1e9,
                       eager_step_cuda_ms=breakdown, build_s=built)
            rows.append(row); save()
            print(f"batch {batch:>2} {label:<46}: {row['tokens_per_s']:8.1f} tokens/s, {row['step_ms']:.2f} ms/step, "
                  f"{row['weight_gb_per_step']:.2f} GB weights/step -> {row['weight_bandwidth_gb_s']:.0f} GB/s; "
                  f"eager step {breakdown}")
            del model, graph
            if device.type == 'cuda': torch.cuda.empty_cache()
    base = {r['batch']: r['tokens_per_s'] for r in rows if r['variant'] == 'bfloat16'}
    for r in rows:
        if r['batch'] in base: r['speedup_vs_bfloat16'] = r['tokens_per_s'] / base[r['batch']]
    save()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', nargs='+', choices=['check', 'decode'], default=['check', 'decode'])
    p.add_argument('--out', type=Path)
    p.add_argument('--quick', action='store_true', help='a tiny decoder on the CPU: shows the script works')
    p.add_argument('--steps', type=int, default=128)
    p.add_argument('--int4-configs', type=Path, default=None,
                   help="a JSON from kernels_gpu.py's tune part: the int4 kernel takes its configs (recorded)")
    args = p.parse_args()
    device = torch.device('cpu' if args.quick else 'cuda')
    if not args.quick and not torch.cuda.is_available(): sys.exit('no CUDA device; use --quick on the CPU')
    out = args.out or (Path(tempfile.gettempdir()) / 'decode_gpu.quick.json' if args.quick else DEFAULT_OUT)
    c = TINY if args.quick else LLAMA3_8B
    result = json.loads(out.read_text()) if out.exists() and not args.quick else {}
    result['meta'] = run_metadata(device)
    result['config'] = c
    result['int4_configs'] = None
    if args.int4_configs:
        from kernels_gpu import use_tuned_configs
        result['int4_configs'] = dict(file=args.int4_configs.name, table=use_tuned_configs(args.int4_configs))
    save = lambda: out.write_text(json.dumps(result, indent=1))
    if 'check' in args.only: part_check(result, c, device, args.quick, save)
    if 'decode' in args.only: part_decode(result, c, device, args.quick, save, 8 if args.quick else args.steps,
                                          64 if args.quick else 1024)
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
