"""Chapter 11 on the GPU: perplexity below four bits on the whole course model (all 30 blocks, budget 'full'),
and the storage and dequantization cost of MXFP4 and NVFP4 on Llama-3-8B's weight shapes.

Parts, chosen with --only (each well under 9 minutes on one H100; see bench/README.md for the estimates):
- check: on the device, before anything is measured: `fwht` equals the product with Sylvester's Hadamard
  matrix; `rotate_residual` leaves the float model's logits unchanged (relative difference recorded); the
  rotated Hessian that `gptq_rot` uses equals the Hessian of the rotated inputs; HQQ, RTN and GPTQ with
  rotations, MXFP4 and NVFP4 give on this device the codes they give on the CPU (differences counted).
- plain: the float model; RTN, GPTQ (activation order, static groups: chapter 04's best) and HQQ at 4, 3, 2
  bits, groups of 64, asymmetric.
- rot: the same three after random Hadamard rotations of both sides of every weight (rtn_rot, gptq_rot,
  hqq_rot: incoherence processing, as QuIP/QuIP#).
- quarot: the same three on the model with its residual stream rotated (fuse_norms + rotate_residual).
- act: chapter 03's W8A8 (per token), W4A4 as is, with every input rotated online, and on the model with its
  residual stream rotated plus down_proj's input rotated online (QuaRot's recipe).
- formats: MXFP4, NVFP4, NF4 (blocks of 64) and INT4 (RTN, symmetric, groups of 32): about 4.25-4.5 bits.
- fp4: MXFP4 and NVFP4 on 4096x4096, 14336x4096 and 4096x14336 random weights: stored bytes, then the
  library's torch dequantizer to bfloat16 (and the same through torch.compile) checked against the CPU's
  bytes and values, then timed (triton.testing.do_bench, median) against a device-to-device copy of the same
  run. The H100/H200 have no FP4 tensor cores: FP4 there saves memory, and the weights are dequantized.
Every perplexity row records its stored bits per weight, the quantization seconds (the device synchronized;
the residual rotation timed apart) and the peak GPU memory. Evaluation: the whole evaluation novel at context
1024 (chapter 04's table), through the quantized layers themselves; float32 matrix products (TF32 off, as
chapter 04's runs).

The JSON (--out, default bench/results/below4_gpu.json) is rewritten after every row and merged with the
rows already there when the card and the budget are the same, so that parts can run in separate calls.
`--quick` runs every part on a two-block model with tiny data and small shapes, on a CPU too, to show that the
script works (its numbers mean nothing); it writes below4_gpu.quick.json in the temporary folder.
"""
from __future__ import annotations
import argparse, copy, json, math, sys, tempfile, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from quantcourse.core import (Budget, load_model, get_budget, calibration_samples, evaluate, eval_tokens,
                              default_device, model_bits, decoder_blocks, linear_names)
from quantcourse.api import quantize_model
from quantcourse.gptq import Hessian
from quantcourse.below4 import (fwht, sylvester, rotate, incoherent, hadamard_block, random_signs,
                                rotate_residual, hqq_quantize, RotatedLinear, mxfp4_blocks, MXFP4Weight,
                                nvfp4_quantize, NVFP4Weight)
from benchmeta import run_metadata, sync

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'below4_gpu.json'
PARTS = ['check', 'plain', 'rot', 'quarot', 'act', 'formats', 'fp4']
BITS = (4, 3, 2)
G64 = dict(group_size=64)
GPTQ_BEST = dict(act_order=True, static_groups=True)  # chapter 04's best setting
SHAPES = {'4096x4096 (q_proj)': (4096, 4096), '14336x4096 (gate/up_proj)': (14336, 4096),
          '4096x14336 (down_proj)': (4096, 14336)}
QUICK_SHAPES = {'256x256': (256, 256), '896x256': (896, 256), '256x896': (256, 896)}


# ---------------------------------------------------------------- correctness on the device
def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    "||a - b|| / ||b||, in float64."
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def check(model, tokenizer, calibration, device, quick: bool) -> dict:
    "Every claim the perplexity rows rest on, on this device; raises if one fails."
    out = {}
    # the fast transform is the product with the explicit matrix (float64, then float32)
    worst64, worst32 = 0.0, 0.0
    for n in (2, 64, 512) if quick else (2, 64, 512, 4096):
        x = torch.randn(16, n, dtype=torch.float64, device=device)
        H = sylvester(n).double().to(device)
        worst64 = max(worst64, relative(fwht(x), x @ H))
        worst32 = max(worst32, relative(fwht(x.float()), (x @ H).float()))
    out['fwht_vs_matrix'] = dict(float64=worst64, float32=worst32)
    if worst64 > 1e-12 or worst32 > 1e-5: raise AssertionError(f"fwht differs from x @ H: {out['fwht_vs_matrix']}")
    # QuaRot's folded rotation leaves the float function unchanged
    probe = eval_tokens(tokenizer, 1024 if not quick else 128)[None].to(device)
    rotated = rotate_residual(copy.deepcopy(model))
    before, after = model(probe).logits, rotated(probe).logits
    out['rotate_residual_logits'] = dict(relative=relative(after, before),
                                         max_abs=(after - before).abs().max().item(),
                                         largest_logit=before.abs().max().item(), tokens=probe.shape[1])
    del rotated
    if out['rotate_residual_logits']['relative'] > 1e-4:
        raise AssertionError(f"rotate_residual changed the float logits: {out['rotate_residual_logits']}")
    # gptq_rot's Hessian: R_in H R_in^T is the Hessian of the rotated inputs
    x = torch.randn(4096, 576, device=device) * torch.linspace(0.2, 3, 576, device=device)
    signs = random_signs(576, 1).to(device)
    rotated_x = rotate(x, signs, hadamard_block(576))
    H = Hessian(576, device).add(x).value()
    out['rotated_hessian'] = relative(incoherent(H, signs, signs), Hessian(576, device).add(rotated_x).value())
    if out['rotated_hessian'] > 1e-4: raise AssertionError(f"rotated Hessian off by {out['rotated_hessian']:.2e}")
    # the same codes on this device as on the CPU: exact for MXFP4/NVFP4 (no float arithmetic to reorder); the others
    # may move a rare tie (GPTQ then carries it on), so their output error on the Hessian must agree within 2%
    linear = decoder_blocks(model)[1][1].mlp.down_proj
    cpu_linear = copy.deepcopy(linear).cpu()
    hessian = Hessian(linear.in_features, device).add(torch.randn(2048, linear.in_features, device=device)).value()
    def rotated(base):
        def make(l, h):
            layer = RotatedLinear.from_linear(l, base, 3, hessian=h) if base == 'gptq' else RotatedLinear.from_linear(l, base, 3)
            return layer.qweight, layer.weight().dequantize()
        return make
    def stored(q, name): return getattr(q, name), q.dequantize()
    makers = {'hqq 3-bit': lambda l, h: stored(hqq_quantize(l.weight, 3, 64), 'codes'),
              'rtn_rot 3-bit': rotated('rtn'), 'hqq_rot 3-bit': rotated('hqq'), 'gptq_rot 3-bit': rotated('gptq'),
              'mxfp4': lambda l, h: stored(MXFP4Weight(mxfp4_blocks(l.weight), tuple(l.weight.shape)), 'blocks'),
              'nvfp4': lambda l, h: stored(nvfp4_quantize(l.weight), 'qweight')}
    def output_error(W, H):  # tr(D H D^T) / tr(W H W^T), D = W - W_original
        D = (W.double() - linear.weight.double().to(W.device)); H = H.double().to(W.device)
        Wo = linear.weight.double().to(W.device)
        return (((D @ H) * D).sum() / ((Wo @ H) * Wo).sum()).item()
    parity = {}
    for name, make in makers.items():
        (here, w_here), (there, w_there) = make(linear, hessian), make(cpu_linear, hessian.cpu())
        e_here, e_there = output_error(w_here, hessian), output_error(w_there, hessian)
        parity[name] = dict(device=str(here.device), bytes_differ=(here.cpu() != there).sum().item(),
                            bytes=here.numel(), output_error_device=e_here, output_error_cpu=e_there)
        exact = name in ('mxfp4', 'nvfp4')
        if (exact and parity[name]['bytes_differ']) or abs(e_here / e_there - 1) > 0.02:
            raise AssertionError(f"{name} on {device} is not the CPU's: {parity[name]}")
    out['device_vs_cpu'] = parity
    return out


# ---------------------------------------------------------------- perplexity rows
def rows_of(part: str, bits_list) -> list[tuple]:
    "(label, family, method, settings, base) of a part; base: 'float', 'quarot' (the rotated model)."
    if part == 'plain':
        runs = [('float', 'float', None, {}, 'float')]
        for bits in bits_list:
            runs += [(f'RTN {bits}-bit g64', 'RTN', 'rtn', dict(bits=bits, symmetric=False, **G64), 'float'),
                     (f'GPTQ {bits}-bit g64', 'GPTQ', 'gptq', dict(bits=bits, **G64, **GPTQ_BEST), 'float'),
                     (f'HQQ {bits}-bit g64', 'HQQ', 'hqq', dict(bits=bits, **G64), 'float')]
        return runs
    if part == 'rot':
        return [run for bits in bits_list for run in
                [(f'RTN+rotation {bits}-bit g64', 'RTN+rotation', 'rtn_rot', dict(bits=bits, **G64), 'float'),
                 (f'GPTQ+rotation {bits}-bit g64', 'GPTQ+rotation', 'gptq_rot', dict(bits=bits, **G64, **GPTQ_BEST), 'float'),
                 (f'HQQ+rotation {bits}-bit g64', 'HQQ+rotation', 'hqq_rot', dict(bits=bits, **G64), 'float')]]
    if part == 'quarot':
        return [run for bits in bits_list for run in
                [(f'RTN, residual rotated {bits}-bit g64', 'RTN, residual rotated', 'rtn',
                  dict(bits=bits, symmetric=False, **G64), 'quarot'),
                 (f'GPTQ, residual rotated {bits}-bit g64', 'GPTQ, residual rotated', 'gptq',
                  dict(bits=bits, **G64, **GPTQ_BEST), 'quarot'),
                 (f'HQQ, residual rotated {bits}-bit g64', 'HQQ, residual rotated', 'hqq', dict(bits=bits, **G64), 'quarot')]]
    if part == 'act':
        return [('W8A8 per-token', 'W8A8', 'w8a8', dict(granularity='token'), 'float'),
                ('W4A4', 'W4A4', 'w4a4', {}, 'float'),
                ('W4A4, inputs rotated online', 'W4A4', 'w4a4', dict(rotate_input=True), 'float'),
                ('W4A4, residual rotated (QuaRot)', 'W4A4', 'w4a4_quarot', {}, 'quarot')]
    if part == 'formats':
        return [('MXFP4 (block 32, E8M0)', 'MXFP4', 'mxfp4', {}, 'float'),
                ('NVFP4 (block 16, E4M3 + tensor scale)', 'NVFP4', 'nvfp4', {}, 'float'),
                ('NF4 block 64', 'NF4', 'nf4', {}, 'float'),
                ('INT4 RTN symmetric g32', 'INT4', 'rtn', dict(bits=4, group_size=32, symmetric=True), 'float')]
    raise ValueError(f"unknown part {part!r}")


def quantize(work, method: str, settings: dict, calibration):
    "Quantize `work` in place; the reports (QuaRot's W4A4 is two calls: down_proj's input rotated online)."
    if method == 'w4a4_quarot':
        prefix, blocks = decoder_blocks(work)
        names = [f'{prefix}.{i}.{n}' for i, b in enumerate(blocks) for n in linear_names(b)]
        down = [n for n in names if n.endswith('down_proj')]
        return [quantize_model(work, 'w4a4', names=[n for n in names if n not in down], progress=False),
                quantize_model(work, 'w4a4', names=down, rotate_input=True, progress=False)]
    needs = method in ('gptq', 'gptq_rot')
    return [quantize_model(work, method, calibration=calibration if needs else None, progress=False, **settings)]


def run_row(run, models: dict, tokenizer, calibration, budget, device, meta, rotate_seconds=None) -> dict:
    "Quantize a copy of the run's base model, evaluate it; its row."
    label, family, method, settings, base = run
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    work = copy.deepcopy(models[base])
    sync(device); start = time.perf_counter()
    reports = quantize(work, method, settings, calibration) if method else []
    sync(device); seconds = time.perf_counter() - start
    # the quantized layers themselves (each dequantizes its weight per call; W4A4/W8A8 round their inputs too).
    # Not core's dequantized_copy: it builds bias-free nn.Linear layers on the CPU whatever the model's device
    result = evaluate(work, tokenizer, budget, progress=False)
    row = dict(label=label, family=family, method=method, settings=settings, base_model=base,
               bits=settings.get('bits', {None: 32, 'w8a8': 8}.get(method, 4)), perplexity=result['perplexity'],
               bits_per_weight=model_bits(work) if method else 32.0, quantize_seconds=seconds,
               layer_seconds=sum(r.seconds for r in reports) if reports else 0.0,
               rotate_seconds=rotate_seconds if base == 'quarot' else None,
               eval_seconds=result['seconds'], commit=meta['commit'], dirty=meta['dirty'], recorded=meta['recorded'],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None)
    del work
    if device.type == 'cuda': torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- FP4 storage and dequantization
def time_ms(fn, quick: bool) -> float:
    "Median milliseconds per call (triton.testing.do_bench)."
    import triton
    return triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=20 if quick else 200, return_mode='median')


def fp4(device, quick: bool, compile_too: bool) -> dict:
    "Stored bytes, then dequantization to bfloat16 checked against the CPU and timed against a copy."
    shapes = QUICK_SHAPES if quick or device.type == 'cpu' else SHAPES
    generator = torch.Generator(device=device).manual_seed(0)
    out = dict(dtype='bfloat16', shapes={}, correctness=[], timings=[],
               note='no FP4 tensor cores on Hopper (H100/H200): the FP4 weights are dequantized and multiplied in '
                    'bfloat16; GB/s counts the bfloat16 output written (useful bytes), copy counts bytes read + written')
    timed = device.type == 'cuda'
    if timed:
        n_bytes = 1024 * 2**20 if not quick else 64 * 2**20
        src, dst = torch.empty(n_bytes, dtype=torch.uint8, device=device), torch.empty(n_bytes, dtype=torch.uint8, device=device)
        out['copy_gb_per_s'] = 2 * n_bytes / time_ms(lambda: dst.copy_(src), quick) / 1e6
        del src, dst
    for label, shape in shapes.items():
        weight = torch.randn(shape, generator=generator, device=device) * 0.02
        cpu_weight = weight.cpu()
        formats = {'MXFP4': (MXFP4Weight(mxfp4_blocks(weight), shape), MXFP4Weight(mxfp4_blocks(cpu_weight), shape)),
                   'NVFP4': (nvfp4_quantize(weight), nvfp4_quantize(cpu_weight))}
        n = math.prod(shape)
        out['shapes'][label] = dict(weights=n, bfloat16_bytes=2 * n, **{
            fmt: dict(bytes=sum(t.numel() * t.element_size() for t in q.tensors().values()),
                      bits_per_weight=q.bits_per_weight) for fmt, (q, _) in formats.items()})
        for fmt, (q, cpu_q) in formats.items():
            # the quantizer: the device's bytes against the CPU's (recorded; `check` asserts it on a model layer)
            bytes_differ = sum((a.cpu() != b).sum().item() for a, b in zip(q.tensors().values(), cpu_q.tensors().values()))
            # the dequantizer: the device's output against the CPU's definition, from the same bytes
            expected = type(q)(*[t.cpu() for t in q.tensors().values()], shape).dequantize(torch.bfloat16)
            paths = {'torch (ours)': lambda q=q: q.dequantize(torch.bfloat16)}
            if compile_too and timed:
                tensors, cls = list(q.tensors().values()), type(q)
                compiled = torch.compile(lambda *t, cls=cls, shape=shape: cls(*t, shape).dequantize(torch.bfloat16))
                paths['torch.compile (ours)'] = lambda compiled=compiled, tensors=tensors: compiled(*tensors)
            for name, fn in list(paths.items()):
                try: output = fn()
                except Exception as error:  # torch.compile is optional: record why and time the rest
                    if name == 'torch (ours)': raise
                    out['correctness'].append(dict(shape=label, format=fmt, path=name, error=repr(error)[:300]))
                    del paths[name]; continue
                same = torch.equal(output.cpu(), expected)
                out['correctness'].append(dict(shape=label, format=fmt, path=name, output_equals_cpu=same,
                                               stored_bytes_differ_from_cpu_quantizer=bytes_differ,
                                               output_dtype=str(output.dtype)))
                if not same:
                    raise AssertionError(f"{fmt} {label} {name}: the dequantized weight is not the CPU's; nothing timed")
                del output
            if timed:
                for name, fn in paths.items():
                    ms = time_ms(fn, quick)
                    gbs = 2 * n / ms / 1e6
                    out['timings'].append(dict(shape=label, format=fmt, path=name, ms=ms, gb_per_s=gbs,
                                               fraction_of_copy=gbs / out['copy_gb_per_s'],
                                               read_gb_per_s=out['shapes'][label][fmt]['bytes'] / ms / 1e6))
        del weight, formats
        if timed: torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- the run
def chapter04_reference() -> dict|None:
    "Chapter 04's GPTQ at 3 bits, g64, act order, static groups (three calibration seeds), if recorded."
    path = HERE / 'results' / 'gptq_ablation.json'
    if not path.exists(): return None
    rows = [r for r in json.loads(path.read_text()).get('rows', []) if r.get('bits') == 3 and r.get('group') == 64
            and r.get('act_order') and str(r.get('variant', '')).startswith('static_groups')]
    return {r['variant']: r['perplexity'] for r in rows} or None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', choices=PARTS, default=PARTS, help='parts to run (default: all)')
    parser.add_argument('--bits', type=int, nargs='+', default=None,
                        help='bit widths of the g64 rows (default 4 3 2; with --quick, 3)')
    parser.add_argument('--labels', nargs='+', default=None, help='run only rows with these labels')
    parser.add_argument('--out', default=None, help=f'default: {DEFAULT_OUT}; with --quick, the temporary folder')
    parser.add_argument('--no-compile', action='store_true', help='fp4: skip torch.compile')
    parser.add_argument('--quick', action='store_true', help='two blocks, tiny data, small shapes: shows the script works')
    args = parser.parse_args(argv)
    out = Path(args.out or (Path(tempfile.gettempdir()) / 'below4_gpu.quick.json' if args.quick else DEFAULT_OUT))
    device = default_device()
    meta = run_metadata(device)
    budget = Budget('quick', 4, 64, 512, 128) if args.quick else get_budget('full')
    header = dict(meta, budget=str(budget), budget_name=budget.name, quick=args.quick, matmul='float32 (TF32 off)',
                  calibration=f'{budget.calib_samples} x {budget.calib_seq_len} tokens of the other five novels, seed 0',
                  model_blocks=2 if args.quick else 'all',
                  how='quantize_model on a copy of the model (GPTQ: act order, static groups, percdamp 0.01; groups of 64, '
                      'asymmetric for RTN/GPTQ/HQQ); seconds: quantization only, device synchronized; evaluation of '
                      'the quantized layers (each dequantizes its weight per call); rows merged over runs, each names its commit and time')
    previous = json.loads(out.read_text()) if out.exists() else {}
    same = all(previous.get(k) == header[k] for k in ('device', 'budget', 'quick'))
    result = {**(previous if same else {}), **header}
    rows = {r['label']: r for r in result.get('rows', [])}
    def save():
        result['rows'] = list(rows.values())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + '\n')

    if 'fp4' in args.only:
        result['fp4'] = fp4(device, args.quick, not args.no_compile)
        for t in result['fp4']['timings']:
            print(f"{t['shape']:>26} {t['format']} {t['path']:<22} {t['ms']:8.3f} ms {t['gb_per_s']:7.0f} GB/s "
                  f"({t['fraction_of_copy']:.0%} of copy)", flush=True)
        print('fp4 checks:', json.dumps(result['fp4']['correctness'][:4]), '...', flush=True)
        save()
    wanted = [p for p in args.only if p not in ('fp4',)]
    if not wanted: return print(f"wrote {out}")
    model, tokenizer = load_model(device=device)
    if args.quick:
        model.model.layers = model.model.layers[:2]; model.config.num_hidden_layers = 2
    calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=0).to(device)
    if 'check' in wanted:
        result['correctness'] = check(model, tokenizer, calibration, device, args.quick)
        print('correctness:', json.dumps(result['correctness']), flush=True)
        save()
    bits = args.bits or ([3] if args.quick else list(BITS))
    runs = [run for part in wanted if part != 'check' for run in rows_of(part, bits)]
    if args.labels: runs = [run for run in runs if run[0] in args.labels]
    models, rotate_seconds = {'float': model}, None
    if any(run[4] == 'quarot' for run in runs):
        sync(device); start = time.perf_counter()
        models['quarot'] = rotate_residual(copy.deepcopy(model))
        sync(device); rotate_seconds = time.perf_counter() - start
    for run in runs:
        row = run_row(run, models, tokenizer, calibration, budget, device, meta, rotate_seconds)
        rows[row['label']] = row
        print(f"{row['label']:40s} {row['bits_per_weight']:6.3f} bits/weight  perplexity {row['perplexity']:9.3f}  "
              f"quantized in {row['quantize_seconds']:6.1f} s", flush=True)
        save()
    result['chapter04_gptq_3bit_g64_static_groups'] = chapter04_reference()
    save()
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
