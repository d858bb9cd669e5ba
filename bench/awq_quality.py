"""AWQ on the course model at the full budget: ours beside RTN, GPTQ and llm-compressor's AWQModifier.

Checks correctness on the device first (AWQ's factors folded into the float model leave its logits unchanged;
the batched grid losses equal one forward per alpha), then, for each calibration seed and for 4 and 3 bits,
groups of 64, asymmetric, quantizes the course model with
- RTN; AWQ (scales only, as llm-awq searches them), AWQ + clip, AWQ with duo scaling, AWQ with o_proj's
  factors tied over the GQA heads and folded into v_proj; GPTQ (act order, static groups); AWQ then GPTQ;
- vllm-project's llm-compressor `AWQModifier` + `QuantizationModifier` (W4/W3 asym g64) on the same
  calibration tokens, duo scaling on (its default) and off, where llmcompressor imports;
and evaluates each on the whole evaluation novel (budget 'full', context 1024) and on its first 20,460 tokens
at context 1024 (where llama.cpp's Q4_K_M mix gives 27.33). The check runs in float32; after it, matrix
products run in TF32 (recorded).
Writes a JSON naming the card, the commit and the time (benchmeta.run_metadata) to --out
(default bench/results/awq_quality.json), after every row, so a run stopped at its limit keeps what it did.
`--quick` runs a tiny budget (on a CPU too) to show the script works; its numbers mean nothing.
"""
import argparse, copy, dataclasses, json, time, traceback, warnings
from pathlib import Path
import torch
from quantcourse.core import (Budget, load_model, get_budget, calibration_samples, evaluate, default_device,
                              decoder_blocks, block_inputs, linear_groups, model_bits)
from quantcourse.api import quantize_model
from quantcourse.awq import awq_model, scale_groups, record_block, search_scale, grid_losses, Replay
from benchmeta import run_metadata, sync

OURS = [('RTN', 'rtn', {}), ('AWQ', 'awq', {}), ('AWQ + clip', 'awq', dict(clip=True)),
        ('AWQ duo', 'awq', dict(duo=True)), ('AWQ tied v->o', 'awq', dict(gqa_v_to_o=True)),
        ('AWQ + clip, tied v->o', 'awq', dict(clip=True, gqa_v_to_o=True)),
        ('GPTQ act order, static groups', 'gptq', dict(act_order=True, static_groups=True)),
        ('AWQ then GPTQ', 'awq_gptq', dict(act_order=True, static_groups=True)),
        ('AWQ tied v->o then GPTQ', 'awq_gptq', dict(act_order=True, static_groups=True, gqa_v_to_o=True))]
Q4_K_M = Budget('q4km', calib_samples=0, calib_seq_len=0, eval_tokens=20460, context=1024)


def check_correctness(model, calibration, device):
    "Folding is exact in float, and the batched losses equal one call per alpha, on this device."
    folded = copy.deepcopy(model)
    awq_model(folded, calibration[:4, :256], progress=False, gqa_v_to_o=True)
    ids = calibration[:2, :128].to(device)
    with torch.no_grad(): a, b = model(ids).logits, folded(ids).logits
    fold = ((a - b).norm() / b.norm()).item()
    _, blocks = decoder_blocks(model)
    hidden, kwargs = block_inputs(model, calibration[:4, :256])
    block = copy.deepcopy(blocks[3])
    groups = scale_groups(block, linear_groups(block, hidden, kwargs[3]))
    inputs, replays = record_block(block, hidden, kwargs[3], [g.names[0] for g in groups], [g.inspect for g in groups])
    worst = 0.0
    for g in groups:
        replay = replays[g.inspect]
        linears = {n.removeprefix(g.inspect).lstrip('.'): block.get_submodule(n) for n in g.names}
        tries = [{n: l.weight * (1 + 0.01 * k) for n, l in linears.items()} for k in range(1, 6)]  # none exact
        batched = grid_losses(replay, linears, tries)
        key = lambda n: f'{n}.weight' if n else 'weight'
        one_by_one = [(replay({key(n): w for n, w in t.items()}).float() - replay.output.float()).pow(2).mean().item()
                      for t in tries]
        worst = max(worst, max(abs(x - y) / max(y, 1e-30) for x, y in zip(batched, one_by_one)))
    if fold > 1e-4 or worst > 1e-3:
        raise AssertionError(f"AWQ on {device}: folded logits differ by {fold:.2e}, batched losses by {worst:.2e}")
    return f'folded float logits within {fold:.1e} (relative); batched grid losses equal one call per alpha within {worst:.1e}'


def llm_compressor(model, tokenizer, calibration, bits, duo):
    "llm-compressor's AWQModifier then its W{bits} asym g64 QuantizationModifier, on our calibration tokens."
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    scheme = {'targets': ['Linear'], 'weights': dict(num_bits=bits, type='int', symmetric=False, strategy='group',
                                                      group_size=64)}
    recipe = [AWQModifier(duo_scaling=duo, n_grid=20),
              QuantizationModifier(config_groups={'group_0': scheme}, ignore=['lm_head'])]
    dataset = Dataset.from_dict({'input_ids': calibration.tolist(), 'attention_mask': torch.ones_like(calibration).tolist()})
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=calibration.shape[1],
            num_calibration_samples=len(calibration), shuffle_calibration_samples=False, batch_size=1)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'awq_quality.json'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--bits', type=int, nargs='+', default=[4, 3])
    parser.add_argument('--only', nargs='+', default=None, help='labels to run (default: all)')
    parser.add_argument('--peers', action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument('--append', action='store_true', help='add to the rows already in --out')
    parser.add_argument('--calib-samples', type=int, default=None, help='calibration sequences (default: the budget)')
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    device = default_device()
    budget = Budget('quick', 4, 64, 256, 128) if args.quick else get_budget('full')
    if args.calib_samples: budget = dataclasses.replace(budget, calib_samples=args.calib_samples)
    q4km = Budget('quick', 0, 0, 256, 128) if args.quick else Q4_K_M
    model, tokenizer = load_model(device=device)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.append and out.exists() else {}
    result.update(run_metadata(device), budget=str(budget), matmul='tf32', group_size=64, symmetric=False)
    result.setdefault('rows', []); result.setdefault('failures', [])
    result['correctness'] = check_correctness(model, calibration_samples(tokenizer, 4, 256), device)
    print(result['correctness'], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # after the float32 check
    reference = {'perplexity': evaluate(model, tokenizer, budget, progress=False)['perplexity'],
                 'perplexity_20460': evaluate(model, tokenizer, q4km, progress=False)['perplexity']}
    result['reference'] = reference
    print('float32', reference, flush=True)
    def save(): out.write_text(json.dumps(result, indent=1))
    runs = [(label, method, cfg, 'ours') for label, method, cfg in OURS]
    if args.peers:
        runs += [('llm-compressor AWQ (duo)', None, dict(duo=True), 'llm-compressor'),
                 ('llm-compressor AWQ', None, dict(duo=False), 'llm-compressor')]
    for seed in args.seeds:
        calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=seed)
        for bits in args.bits:
            for label, method, cfg, source in runs:
                if args.only and label not in args.only: continue
                work = copy.deepcopy(model)
                sync(device); start = time.perf_counter()
                try:
                    if method is None: llm_compressor(work, tokenizer, calibration, bits, cfg['duo'])
                    else:
                        quantize_model(work, method, calibration=None if method == 'rtn' else calibration,
                                       bits=bits, group_size=64, symmetric=False, progress=False, **cfg)
                except Exception as error:
                    result['failures'].append(dict(label=label, seed=seed, bits=bits, error=repr(error)[:500],
                                                   trace=traceback.format_exc()[-2000:]))
                    print('FAILED', label, bits, seed, repr(error)[:300], flush=True); save(); continue
                sync(device); seconds = time.perf_counter() - start
                row = dict(label=label, source=source, calibration=list(calibration.shape), method=method, settings=cfg, bits=bits, seed=seed,
                           seconds=seconds, seconds_per_block=seconds / len(decoder_blocks(model)[1]),
                           bits_per_weight=model_bits(work) if source == 'ours' else None,
                           perplexity=evaluate(work, tokenizer, budget, progress=False)['perplexity'],
                           perplexity_20460=evaluate(work, tokenizer, q4km, progress=False)['perplexity'])
                result['rows'].append(row); save()
                print(f"{label:34s} {bits}b seed {seed}: {row['perplexity']:.3f} ({row['perplexity_20460']:.3f} "
                      f"on 20,460) in {seconds:.1f} s", flush=True)
                del work; torch.cuda.empty_cache() if device.type == 'cuda' else None
    save()


if __name__ == '__main__':
    main()
