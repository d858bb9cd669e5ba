"""Quantizing a model larger than the GPU: Llama-3-70B's blocks, one at a time on the GPU, the rest in CPU memory.

`quantize_model(model, method, ..., device='cuda')` copies one decoder block at a time to the GPU (its weights
loaded by accelerate's hooks if the model is offloaded), moves that block's calibration activations there,
quantizes, and brings the quantized block and its output activations back to the CPU. This script measures what
that costs on one GPU for stacks with Llama-3-70B's layer shapes: hidden size 8192, MLP 28672, 64 attention heads
of which 8 are key/value heads (head_dim 128), random weights built in CPU memory (a 1024-token vocabulary, so the
stack is its blocks: 0.86 B weights each, 1.7 GB in bfloat16), sdpa attention.

Parts, chosen with --only (each well under 9 minutes on one H100 80GB; estimates, not yet measured):
- check: a small stack (hidden 1024, MLP 3584, 8 heads / 2 KV heads, 2 blocks; the dtypes below): GPTQ and AWQ on the
  model on the GPU whole (device=None) against the same model offloaded by accelerate's `cpu_offload` with
  execution device cuda and `quantize_model(..., device='cuda')`: every tensor of every quantized layer must be
  equal (recorded with the share of equal codes; a warning is printed if not, and the timing goes on). Also
  recorded, not required: the share of equal codes when the model sits plain in CPU memory (its embeddings and
  rotary tables then run on the CPU, whose float rounding may differ from the GPU's). About 1 minute, under 2 GB of GPU memory.
- gptq2, gptq4, gptq8: GPTQ (4 bits, groups of 128, asymmetric) on 2, 4, 8 blocks, 16 x 2048 random calibration
  tokens. Expected per block about 10-30 s (seven Hessians and solves, the largest 28672 x 28672, plus the
  block's forward passes and two 1.7 GB copies over PCIe), plus ~3-5 s per block to build the random stack on
  the host: gptq8 about 2-5 minutes. Peak GPU memory expected about 10-15 GB (one bfloat16 block 1.7 GB, the
  float32 Hessian of down_proj 3.3 GB, activations 0.5 GB per 16 x 2048 x 8192 tensor and 1.9 GB in the MLP),
  and the same for 2, 4 and 8 blocks: that is the point.
- awq2, awq4, awq8: AWQ (4 bits, groups of 128, its grid of 20 scales per group of linears) likewise, on
  bfloat16 stacks. Its search holds every candidate weight of a group at once: for gate_proj and up_proj
  together, 20 x 0.94 GB = 19 GB in bfloat16; with the block's copies and its activations (0.5 GB per
  16 x 2048 x 8192 tensor, 1.9 GB in the MLP) the peak is expected at about 25-40 GB, the same for 2, 4 and 8
  blocks. If it runs out of memory, pass --awq-grid 10 (recorded in each row). Expected per block about
  10-40 s; awq8 about 2-6 minutes.
Every row records the seconds (device synchronized), the seconds to build the stack, and
`torch.cuda.max_memory_allocated` over the quantization. After each row the script fits seconds = a + b x blocks
by least squares over the rows of that method and prints the extrapolation to 80 blocks (Llama-3-70B's depth),
beside the GPTQ paper's "about four GPU hours" for 175 B weights (one A100 80GB, their abstract);
the peak memory is fitted the same way (GiB per added block: near 0 if the peak does not grow with the depth).

The JSON (--out, default bench/results/offload_gpu.json) is rewritten after every row and merged with the rows
already there when the card is the same, so that parts can run in separate calls:
    python bench/offload_gpu.py --only check gptq2 gptq4
    python bench/offload_gpu.py --only gptq8
    python bench/offload_gpu.py --only awq2 awq4
    python bench/offload_gpu.py --only awq8
`--quick` runs every part on tiny shapes on the CPU (device='cpu': the path is the same, no GPU memory to
measure) to show that the script works; it writes offload_gpu.quick.json in the temporary folder.
"""
from __future__ import annotations
import argparse, copy, json, os, sys, tempfile, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from transformers import LlamaConfig, LlamaForCausalLM
from accelerate import cpu_offload
from quantcourse.core import QuantizedLinear
from quantcourse.api import quantize_model
from benchmeta import run_metadata, sync

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'offload_gpu.json'
PARTS = ['check', 'gptq2', 'gptq4', 'gptq8', 'awq2', 'awq4', 'awq8']
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  head_dim=128, vocab_size=1024)
SMALL = dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             vocab_size=1024)
TINY = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=256)
SETTINGS = dict(bits=4, group_size=128, symmetric=False)
DTYPES = dict(gptq=torch.bfloat16, awq=torch.bfloat16)
DEPTH = 80  # Llama-3-70B's blocks
PAPER = ('GPTQ paper (Frantar et al. 2022, abstract): GPT models of 175 B weights quantized in about four GPU '
         'hours (one A100 80GB)')


def stack(shapes: dict, blocks: int, dtype=torch.bfloat16, seed: int = 0) -> LlamaForCausalLM:
    "A Llama of `blocks` blocks with these shapes, random weights (std 0.02, norms 1) of `dtype`, in CPU memory."
    config = LlamaConfig(**shapes, num_hidden_layers=blocks, max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation='sdpa', dtype=dtype)
    with torch.device('meta'): model = LlamaForCausalLM(config)  # no float32 weights on the host first
    model = model.to(dtype).to_empty(device='cpu')  # allocated once, in `dtype`
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name: p.fill_(1.0)
            else: p.normal_(0, 0.02, generator=generator)
        # the rotary tables are buffers computed at construction, left empty by the meta device: rebuild them
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def layer_state(model) -> dict:
    "Every tensor of every quantized layer, on the CPU, by name."
    return {f'{n}.{k}': t.cpu() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for k, t in m.state_dict().items()}


def share(codes: dict, expected: dict) -> float:
    "The share of integer codes in `codes` equal to those in `expected` (0 if none or another set of layers)."
    if not codes or codes.keys() - expected.keys(): return 0.0
    return sum((codes[k] == expected[k]).sum().item() for k in codes) / sum(t.numel() for t in codes.values())


def check(device, quick: bool) -> dict:
    "The offloaded path's layers against those of the model quantized where it sits whole."
    shapes = TINY if quick else SMALL
    tokens = torch.randint(0, shapes['vocab_size'], (2, 32) if quick else (8, 512),
                           generator=torch.Generator().manual_seed(1))
    result = {}
    for method in ('gptq', 'awq'):
        whole = stack(shapes, 2, DTYPES[method]).to(device)
        quantize_model(whole, method, calibration=tokens, progress=False, **SETTINGS)
        expected = layer_state(whole); del whole
        offloaded = cpu_offload(stack(shapes, 2, DTYPES[method]), execution_device=device)
        quantize_model(offloaded, method, calibration=tokens, progress=False, device=device, **SETTINGS)
        got = layer_state(offloaded); del offloaded
        offloaded_codes = {k: t for k, t in got.items() if k.endswith('qweight')}
        plain = stack(shapes, 2, DTYPES[method])  # in CPU memory, no hooks: the parts outside the blocks run on the CPU
        quantize_model(plain, method, calibration=tokens, progress=False, device=device, **SETTINGS)
        codes = {k: t for k, t in layer_state(plain).items() if k.endswith('qweight')}  # the integer codes
        result[method] = dict(
            offloaded_equal=got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected),
            tensors=len(expected),
            offloaded_share_of_equal_codes=share(offloaded_codes, expected),
            plain_cpu_share_of_equal_codes=share(codes, expected))
    return result


def measure(method: str, blocks: int, device, quick: bool, extra: dict) -> dict:
    "Quantize a fresh stack of `blocks` blocks with `device=device`: seconds and peak device memory."
    shapes = TINY if quick else LLAMA3_70B
    tokens = torch.randint(0, shapes['vocab_size'], (2, 32) if quick else (16, 2048),
                           generator=torch.Generator().manual_seed(0))
    start = time.perf_counter(); model = stack(shapes, blocks, DTYPES[method]); built = time.perf_counter() - start
    block_gib = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**30
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    sync(device); start = time.perf_counter()
    report = quantize_model(model, method, calibration=tokens, progress=False, device=device, **SETTINGS,
                            **extra)
    sync(device); seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    return dict(method=method, blocks=blocks, seconds=round(seconds, 2), seconds_per_block=round(seconds / blocks, 2),
                peak_gpu_gib=None if peak is None else round(peak, 3), dtype=str(DTYPES[method]),
                float_block_gib=round(block_gib, 3),
                build_seconds=round(built, 1), calibration=list(tokens.shape), layers=len(report.rows),
                bits_per_weight=round(report.bits_per_weight, 4), settings=report.settings)


def fit(rows: list[dict], key: str) -> tuple[float, float] | None:
    "Least-squares a + b x blocks through the rows' `key`; None with fewer than two block counts."
    points = [(r['blocks'], r[key]) for r in rows if r.get(key) is not None]
    if len({b for b, _ in points}) < 2: return None
    n, sx, sy = len(points), sum(b for b, _ in points), sum(v for _, v in points)
    sxx, sxy = sum(b * b for b, _ in points), sum(b * v for b, v in points)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return (sy - slope * sx) / n, slope


def label(row: dict) -> str:
    "The method and the setting that changes between runs: 'gptq', 'awq', 'awq grid 10'."
    grid = row['settings'].get('grid', 20)
    return row['method'] + ('' if grid == 20 else f' grid {grid}')


def extrapolate(rows: list[dict]) -> dict:
    "Per method (and AWQ grid): the linear fits, and the seconds and peak memory they give for 80 blocks."
    out = {}
    for method in sorted({label(r) for r in rows}):
        mine = [r for r in rows if label(r) == method]
        seconds, memory = fit(mine, 'seconds'), fit(mine, 'peak_gpu_gib')
        if seconds is None: continue
        out[method] = dict(seconds_fit=dict(intercept=round(seconds[0], 2), per_block=round(seconds[1], 2)),
                           blocks=DEPTH, predicted_hours=round((seconds[0] + seconds[1] * DEPTH) / 3600, 3))
        if memory is not None:
            out[method] |= dict(peak_gib_per_added_block=round(memory[1], 4),
                                predicted_peak_gib=round(memory[0] + memory[1] * DEPTH, 2))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', choices=PARTS, default=PARTS, help='parts to run (default: all)')
    parser.add_argument('--out', default=None, help=f'default: {DEFAULT_OUT}; with --quick, the temporary folder')
    parser.add_argument('--quick', action='store_true', help='tiny shapes on the CPU: shows the script works')
    parser.add_argument('--awq-grid', type=int, default=20, help="AWQ's scales tried per group (default 20)")
    args = parser.parse_args(argv)
    out = Path(args.out or (Path(tempfile.gettempdir()) / 'offload_gpu.quick.json' if args.quick else DEFAULT_OUT))
    device = torch.device('cpu' if args.quick else 'cuda')
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit('no CUDA GPU here: run with --quick on a CPU')
    meta = run_metadata(device)
    header = dict(meta, quick=args.quick, shapes=TINY if args.quick else LLAMA3_70B, settings=SETTINGS, paper=PAPER,
                  how="random stack in CPU memory (bfloat16), quantize_model(..., device=...); seconds: the whole call, "
                      "device synchronized; peak: torch.cuda.max_memory_allocated over the call")
    previous = json.loads(out.read_text()) if out.exists() else {}
    same = all(previous.get(k) == header[k] for k in ('device', 'quick'))
    result = {**(previous if same else {}), **header}
    rows = {(label(r), r['blocks']): r for r in result.get('rows', [])}
    def save():
        result['rows'] = sorted(rows.values(), key=lambda r: (label(r), r['blocks']))
        result['extrapolation'] = extrapolate(result['rows'])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + '\n')
    if 'check' in args.only:
        result['check'] = check(device, args.quick); save()
        print('check:', json.dumps(result['check']), flush=True)
        if not all(c['offloaded_equal'] for c in result['check'].values()):  # recorded; the timing goes on
            print('WARNING: the offloaded path gave other layers than the model quantized whole (see the share '
                  'of equal codes in the JSON)', flush=True)
    for part in [p for p in args.only if p != 'check']:
        method, blocks = part.rstrip('0123456789'), int(part.lstrip('gptqaw'))
        extra = dict(grid=args.awq_grid) if method == 'awq' else {}
        row = measure(method, blocks, device, args.quick, extra) | dict(
            commit=meta['commit'], recorded=meta['recorded'],
            allocator=os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))  # e.g. expandable_segments:True
        rows[(label(row), blocks)] = row; save()
        print(f"{method} {blocks} blocks: {row['seconds']:8.1f} s ({row['seconds_per_block']:.1f} s per block), "
              f"peak GPU {row['peak_gpu_gib']} GiB, stack built in {row['build_seconds']} s", flush=True)
    for method, e in result['extrapolation'].items():
        print(f"{method}: {e['blocks']} blocks predicted {e['predicted_hours']:.2f} GPU hours "
              f"(fit {e['seconds_fit']['intercept']} s + {e['seconds_fit']['per_block']} s per block)"
              + (f", peak {e['predicted_peak_gib']} GiB ({e['peak_gib_per_added_block']:+.4f} GiB per block)"
                 if 'predicted_peak_gib' in e else ''))
    print(PAPER)
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
