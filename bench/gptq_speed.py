"""GPTQ speed on a GPU: two large layers phase by phase, and the whole course model end to end.

Checks correctness on the device first (the fast GPTQ against the slow column-by-column reference), then:
- quantizes one 4096 x 4096 and one 14336 x 4096 layer (out x in) from the Hessian of 128 x 2048 calibration
  tokens, timing the Hessian, the Cholesky factorization and the column loop separately. The activations are
  SYNTHETIC (Gaussian, with a few channels of much higher energy, like an LLM's): only their shape matters for time;
- quantizes the whole course model end to end (4 bits, groups of 64, activation order), and with round-to-nearest
  for comparison, and evaluates both on the evaluation text under the budget of the machine ('full' on CUDA).
  (Every setting, beside the reference implementation, is bench/gptq_table.py's job.)
Writes a JSON naming the card, the commit and the time (benchmeta.run_metadata) to --out
(default bench/results/gptq_speed.json).
`--quick` runs tiny sizes (on a CPU too) to show the script works; its numbers mean nothing.
"""
import argparse, copy, json, tempfile, time
from pathlib import Path
import torch
from quantcourse.core import Budget, load_model, get_budget, calibration_samples, evaluate, default_device
from quantcourse.gptq import Hessian, damped_inverse_cholesky, gptq_quantize, naive_gptq
from quantcourse.api import quantize_model

from benchmeta import run_metadata, sync


def check_correctness(device):
    "The fast version must give the slow version's codes on this device (float64, small random layers); gptq_table.py and gptq_ablation.py use it too."
    gen = torch.Generator().manual_seed(0)
    cases = [dict(group_size='channel'), dict(group_size=32, symmetric=True), dict(group_size=32, bits=3, act_order=True),
             dict(group_size='channel', act_order=True), dict(group_size=32, act_order=True, static_groups=True, symmetric=True)]
    for kw in cases:
        W = torch.randn(64, 256, generator=gen, dtype=torch.float64).to(device)
        X = (torch.randn(1024, 256, generator=gen, dtype=torch.float64) * (0.1 + 3 * torch.rand(256, generator=gen, dtype=torch.float64))).to(device)
        H = Hessian(256, device, torch.float64).add(X).value()
        fast, slow = gptq_quantize(W, H, block_size=64, **kw), naive_gptq(W, H, **kw)
        if not torch.equal(fast.quantized.codes, slow.quantized.codes): raise AssertionError(f"fast and slow GPTQ disagree on {device} for {kw}")
    return f'fast GPTQ equals the slow reference, code for code (float64, 64 x 256 layers, {len(cases)} settings)'


def synthetic_activations(n_tokens, width, device, seed=0):
    "Gaussian activations, (n_tokens, width), with 1% of the channels 20x larger (outlier channels)."
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n_tokens, width, generator=gen, device=device)
    x[:, torch.randperm(width, generator=gen, device=device)[:max(1, width // 100)]] *= 20
    return x


def time_layer(out_features, in_features, n_samples, seq_len, device, settings):
    "Seconds spent on the Hessian, the Cholesky factor and the column loop for one layer."
    x = synthetic_activations(n_samples * seq_len, in_features, device)
    W = torch.randn(out_features, in_features, device=device) * 0.02
    gptq_quantize(W[:256], Hessian(in_features, device).add(x[:4096]).value(), **settings)  # warm-up
    sync(device); start = time.perf_counter()
    acc = Hessian(in_features, device)
    for batch in x.split(8 * seq_len): acc.add(batch)  # 8 sequences at a time, as a model would deliver them
    H = acc.value()
    sync(device); hessian_s = time.perf_counter() - start
    start = time.perf_counter(); damped_inverse_cholesky(H); sync(device); cholesky_s = time.perf_counter() - start
    start = time.perf_counter(); gptq_quantize(W, H, **settings); sync(device); total_s = time.perf_counter() - start
    return dict(shape_label=f'{out_features} x {in_features}', out_features=out_features, in_features=in_features,
                hessian_s=hessian_s, cholesky_s=cholesky_s, column_loop_s=max(total_s - cholesky_s, 0.0), gptq_total_s=total_s,
                settings={k: v for k, v in settings.items()})


def model_table(device, budget, settings_list):
    "Quantize the course model in each setting, time it, evaluate it."
    model, tokenizer = load_model(device=device)
    calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=0)
    ref = evaluate(model, tokenizer, budget, progress=False)
    rows = [dict(method='reference', bits=32, group='-', act_order='-', quantize_s=0.0, perplexity=ref['perplexity'])]
    for bits, group in dict.fromkeys((b, g) for b, g, _ in settings_list):
        q = copy.deepcopy(model); sync(device); start = time.perf_counter()
        quantize_model(q, 'rtn', bits=bits, group_size=group, symmetric=False, progress=False); sync(device)
        rows.append(dict(method='RTN', bits=bits, group=group, act_order='-', quantize_s=time.perf_counter() - start,
                         perplexity=evaluate(q, tokenizer, budget, progress=False)['perplexity']))
        del q
    for bits, group, act in settings_list:
        q = copy.deepcopy(model); sync(device); start = time.perf_counter()
        quantize_model(q, 'gptq', calibration=calibration, bits=bits, group_size=group, act_order=act, progress=False); sync(device)
        rows.append(dict(method='GPTQ', bits=bits, group=group, act_order=act, quantize_s=time.perf_counter() - start,
                         perplexity=evaluate(q, tokenizer, budget, progress=False)['perplexity']))
        del q
        if device.type == 'cuda': torch.cuda.empty_cache()
    for r in rows: r.update(tokens=ref['tokens'], context=ref['context'], text=ref['text'])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help="default: bench/results/gptq_speed.json; with --quick, gptq_speed.quick.json in the temporary folder")
    parser.add_argument('--budget', choices=['small', 'full'], help="budget of the whole-model run; default: get_budget() ('full' on CUDA)")
    parser.add_argument('--quick', action='store_true', help='tiny sizes, to check that the script runs (numbers mean nothing)')
    args = parser.parse_args()
    args.out = args.out or str(Path(tempfile.gettempdir())/'gptq_speed.quick.json' if args.quick else Path(__file__).resolve().parent/'results'/'gptq_speed.json')
    device = default_device()
    if device.type == 'cpu': torch.set_num_threads(1)  # small linear algebra is faster on one thread of a shared CPU
    correctness = check_correctness(device)
    print(correctness, flush=True)
    settings = dict(bits=4, group_size=128, act_order=True)
    if args.quick:
        shapes, n_samples, seq_len = [(96, 64), (160, 64)], 4, 64
        budget = Budget('quick', calib_samples=2, calib_seq_len=32, eval_tokens=256, context=128)
        settings = dict(bits=4, group_size=32, act_order=True)
    else:
        shapes, n_samples, seq_len = [(4096, 4096), (14336, 4096)], 128, 2048
        budget = get_budget(args.budget)
    settings_list = [(4, 64, True)]
    layers = []
    for out_features, in_features in shapes:
        layers.append(time_layer(out_features, in_features, n_samples, seq_len, device, settings))
        print(layers[-1], flush=True)
    model_rows = model_table(device, budget, settings_list)
    for r in model_rows: print(r, flush=True)
    result = dict(**run_metadata(device), quick=args.quick, correctness=correctness,
                  calibration_tokens=n_samples * seq_len, synthetic_activations=True, budget=str(budget), layers=layers,
                  model=model_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {args.out}")


if __name__ == '__main__': main()
