"""AWQ on the course model at the full budget: ours beside RTN, GPTQ and llm-compressor's AWQModifier.

Checks correctness on the device first (AWQ's factors folded into the float model leave its logits unchanged;
the batched grid losses equal one forward per alpha), then, for each calibration seed and for 4 and 3 bits,
groups of 64, asymmetric, quantizes the course model with
- RTN; AWQ (scales only, as llm-awq searches them), AWQ + clip, AWQ with duo scaling, AWQ with o_proj's
  factors tied over the GQA heads and folded into v_proj; GPTQ (act order, static groups); AWQ then GPTQ;
- vllm-project's llm-compressor `AWQModifier` + `QuantizationModifier` (W4/W3 asym g64) on the same
  calibration tokens, duo scaling on (its default) and off, where llmcompressor imports;
- mit-han-lab's llm-awq (its run_awq, apply_awq and pseudo_quantize_model_weight, scales + clip) from the
  ignored peers/llm-awq (bench/get_llm_awq.sh), through bench/llm_awq_peer.py;
and evaluates each on the whole evaluation novel (budget 'full', context 1024) and on its first 20,460 tokens
at context 1024 (where llama.cpp's Q4_K_M mix gives 27.33). The check runs in float32; after it, matrix
products run in TF32 (recorded).
Writes a JSON naming the card, the commit and the time (benchmeta.run_metadata) to --out
(default bench/results/awq_quality.json), after every row, so a run stopped at its limit keeps what it did.
Tasks run the most wanted first (every seed of the essential rows, then the extras on the first seed);
`--claims FOLDER` lets several processes share one card (bench/awq_parallel.sh), `--done` skips rows
recorded already, `--merge` joins the workers' files.
`--quick` runs a tiny budget (on a CPU too) to show the script works; its numbers mean nothing.
"""
import argparse, copy, dataclasses, json, os, time, traceback, warnings
from pathlib import Path
import torch
from quantcourse.core import (Budget, load_model, get_budget, calibration_samples, evaluate, default_device,
                              decoder_blocks, block_inputs, linear_groups, model_bits)
from quantcourse.api import quantize_model
from quantcourse.core import METHODS, register_method
from quantcourse.awq import awq_model, scale_groups, record_block, search_scale, grid_losses, Replay
from benchmeta import run_metadata, sync

OURS = [('RTN', 'rtn', {}), ('AWQ', 'awq', {}), ('AWQ + clip', 'awq', dict(clip=True)),
        ('AWQ duo', 'awq', dict(duo=True)), ('AWQ tied v->o', 'awq', dict(gqa_v_to_o=True)),
        ('AWQ + clip, tied v->o', 'awq', dict(clip=True, gqa_v_to_o=True)),
        ('GPTQ act order, static groups', 'gptq', dict(act_order=True, static_groups=True)),
        ('AWQ then GPTQ', 'awq_gptq', dict(act_order=True, static_groups=True)),
        ('AWQ tied v->o then GPTQ', 'awq_gptq', dict(act_order=True, static_groups=True, gqa_v_to_o=True)),
        # as llm-compressor's pipeline does: each block searched on the quantized blocks' outputs
        ('AWQ on quantized inputs', 'awq_sequential', {})]
# llm-awq (and our 'awq') search each block on the float model's outputs; this variant feeds it the outputs of
# the blocks already quantized, one suspected reason for llm-compressor's lower INT4 perplexity
register_method(dataclasses.replace(METHODS['awq'], name='awq_sequential', sequential=True,
                                    doc="AWQ, each block searched on the quantized blocks' outputs"))
# ours with llm-awq's rounding (search and final weights): is the INT3 gap to llm-awq in how a group is rounded?
VARIANTS = [("AWQ + clip, llm-awq's rounding", None, {}, 'ours, llm-awq rounding')]
Q4_K_M = Budget('q4km', calib_samples=0, calib_seq_len=0, eval_tokens=20460, context=1024)


def llm_awq_rounding(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    "llm-awq's pseudo_quantize_tensor with a zero-point, in float32: each group's own min to max, float32 scales."
    if symmetric: raise ValueError("llm-awq's rounding here is the asymmetric one (zero_point=True)")
    w = weight.float().reshape(-1, group_size)
    hi, lo, top = w.amax(1, keepdim=True), w.amin(1, keepdim=True), 2**bits - 1
    scale = (hi - lo).clamp(min=1e-5) / top
    zero = (-torch.round(lo / scale)).clamp(0, top)
    rounded = (torch.clamp(torch.round(w / scale) + zero, 0, top) - zero) * scale
    return rounded.reshape(weight.shape).to(weight.dtype)


def awq_llm_awq_rounding(work, calibration, bits):
    "Our AWQ + clip searched and applied with `llm_awq_rounding` in place of our fake_quantize (float16 scales)."
    import quantcourse.awq as awq_module
    saved = awq_module.fake_quantize
    awq_module.fake_quantize = lambda w, b, g, sym: llm_awq_rounding(w, b, g, sym)
    try: awq_model(work, calibration, progress=False, bits=bits, group_size=64, symmetric=False, clip=True)
    finally: awq_module.fake_quantize = saved
    for module in decoder_blocks(work)[1].modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = llm_awq_rounding(module.weight.data, bits, 64)
    return work


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


def llm_compressor_scheme(bits: int) -> dict:
    "The W{bits} asymmetric groups-of-64 weight scheme both llm-compressor routes quantize to."
    return {'targets': ['Linear'], 'weights': dict(num_bits=bits, type='int', symmetric=False, strategy='group',
                                                    group_size=64)}


def llm_compressor_oneshot(model, tokenizer, calibration, recipe):
    "llm-compressor's `oneshot` with `recipe` on our calibration tokens, in their order, one sequence a batch."
    from datasets import Dataset
    from llmcompressor import oneshot
    dataset = Dataset.from_dict({'input_ids': calibration.tolist(), 'attention_mask': torch.ones_like(calibration).tolist()})
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=calibration.shape[1],
            num_calibration_samples=len(calibration), shuffle_calibration_samples=False, batch_size=1)
    return model


def llm_compressor(model, tokenizer, calibration, bits, duo):
    "llm-compressor's AWQModifier then its W{bits} asym g64 QuantizationModifier, on our calibration tokens."
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    recipe = [AWQModifier(duo_scaling=duo, n_grid=20),
              QuantizationModifier(config_groups={'group_0': llm_compressor_scheme(bits)}, ignore=['lm_head'])]
    return llm_compressor_oneshot(model, tokenizer, calibration, recipe)


def llm_compressor_gptq(model, tokenizer, calibration, bits):
    "llm-compressor's GPTQModifier, W{bits} asym g64, activation order 'static' (its default), damping 0.01."
    from llmcompressor.modifiers.gptq import GPTQModifier
    recipe = [GPTQModifier(config_groups={'group_0': llm_compressor_scheme(bits)}, ignore=['lm_head'],
                           block_size=128, dampening_frac=0.01, actorder='static')]
    return llm_compressor_oneshot(model, tokenizer, calibration, recipe)


ESSENTIAL = ['RTN', 'AWQ', 'AWQ + clip', 'AWQ duo', 'GPTQ act order, static groups', 'AWQ then GPTQ']
PEERS = [('llm-compressor AWQ', None, dict(duo=False), 'llm-compressor'),
         ('llm-compressor AWQ (duo)', None, dict(duo=True), 'llm-compressor'),
         ('llm-awq (scale + clip)', None, {}, 'llm-awq'),
         # the production route for GPTQ, beside ours 'GPTQ act order, static groups' (chapter 10)
         ('llm-compressor GPTQ', None, dict(gptq=True), 'llm-compressor')]


def tasks(seeds, bits_list, peers: bool, only=None, first_seed_extras=True):
    "Every (label, method, settings, source, seed, bits) to run, the most wanted first."
    ours = {label: (label, method, cfg, 'ours') for label, method, cfg in OURS}
    # a seed's peers (the longest runs) and essential rows of ours, seed by seed
    wanted = ([PEERS[0], PEERS[2]] if peers else []) + [ours[l] for l in ESSENTIAL]
    todo = [(*run, seed, bits) for seed in seeds for bits in bits_list for run in wanted]
    # the rest (tied o_proj factors, llm-compressor's duo) on the first seed only
    extras = [r for r in OURS if r[0] not in ESSENTIAL]
    extras = [(*r, 'ours') for r in extras] + ([PEERS[1], PEERS[3]] if peers else [])
    if first_seed_extras: todo += [(*run, seeds[0], bits) for run in extras for bits in bits_list]
    todo += [(*run, seed, bits) for seed in seeds for bits in bits_list for run in VARIANTS]
    return [t for t in todo if not only or t[0] in only]


def claim(folder: Path|None, task) -> bool:
    "Take `task` for this process (an exclusive file in `folder`); False if another took it."
    if folder is None: return True
    label, *_, seed, bits = task
    name = f"{label}-{seed}-{bits}".replace(' ', '_').replace('/', '_').replace('>', '')
    try: (folder / name).open('x').close(); return True
    except FileExistsError: return False


def done_rows(paths, calibration_shape) -> set:
    "(label, seed, bits) of the valid rows in these JSON files with calibration of `calibration_shape`."
    rows = [r for p in paths for r in json.loads(Path(p).read_text()).get('rows', [])]
    # rows recorded before quantize_model's sequential=False correction (a26fdc8) must run again
    return {(r['label'], r['seed'], r['bits']) for r in rows
            if r['calibration'] == list(calibration_shape) and not r.get('before_correction')}


def truncated(model, blocks: int):
    "A copy of `model` keeping its first `blocks` decoder blocks: the cost per block of a search, timed alone."
    work = copy.deepcopy(model)
    name, layers = decoder_blocks(work)
    parent, _, attribute = name.rpartition('.')
    setattr(work.get_submodule(parent), attribute, layers[:blocks])
    work.config.num_hidden_layers = blocks
    if getattr(work.config, 'layer_types', None): work.config.layer_types = work.config.layer_types[:blocks]
    return work


def quantize_task(work, task, tokenizer, calibration):
    "Quantize `work` as `task` says (in place, or the peer's returned model)."
    label, method, cfg, source, seed, bits = task
    if source == 'llm-compressor' and cfg.get('gptq'): return llm_compressor_gptq(work, tokenizer, calibration, bits)
    if source == 'llm-compressor': return llm_compressor(work, tokenizer, calibration, bits, cfg['duo'])
    if source == VARIANTS[0][3]: return awq_llm_awq_rounding(work, calibration, bits)
    if source == 'llm-awq':
        from llm_awq_peer import llm_awq
        return llm_awq(work, tokenizer, calibration, bits)
    quantize_model(work, method, calibration=None if method == 'rtn' else calibration,
                   bits=bits, group_size=64, symmetric=False, progress=False, **cfg)
    return work


def time_blocks(task, model, tokenizer, calibration, blocks, device) -> dict:
    "Seconds per block of `task`'s search on the first `blocks` blocks, the card to itself; no evaluation."
    work = truncated(model, blocks)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    sync(device); start = time.perf_counter()
    quantize_task(work, task, tokenizer, calibration)
    sync(device); seconds = time.perf_counter() - start
    label, method, cfg, source, seed, bits = task
    row = dict(label=label, source=source, method=method, settings=cfg, bits=bits, seed=seed, blocks=blocks,
               calibration=list(calibration.shape), seconds=seconds, seconds_per_block=seconds / blocks,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None)
    del work
    if device.type == 'cuda': torch.cuda.empty_cache()
    return row


def merge(out: Path, parts: list[str], notes: str|None):
    "One JSON from several workers' files: the first one's metadata, every row, every failure."
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    head = next((r for r in loaded if 'correctness' in r), loaded[0])
    result = {k: v for k, v in head.items() if k not in ('rows', 'failures')}
    result['rows'] = [row for r in loaded for row in r.get('rows', [])]
    result['failures'] = [f for r in loaded for f in r.get('failures', [])]
    if notes: result['notes'] = notes
    out.write_text(json.dumps(result, indent=1))
    print(f"{out}: {len(result['rows'])} rows, {len(result['failures'])} failures from {len(parts)} files")


def run_task(task, model, tokenizer, calibration, budget, q4km, device, shared: bool) -> dict:
    "Quantize a copy of `model` as `task` says; its row."
    label, method, cfg, source, seed, bits = task
    work = copy.deepcopy(model)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    sync(device); start = time.perf_counter()
    work = quantize_task(work, task, tokenizer, calibration)
    sync(device); seconds = time.perf_counter() - start
    row = dict(label=label, source=source, calibration=list(calibration.shape), method=method, settings=cfg,
               bits=bits, seed=seed, seconds=seconds, seconds_per_block=seconds / len(decoder_blocks(model)[1]),
               bits_per_weight=model_bits(work) if source == 'ours' else None,
               perplexity=evaluate(work, tokenizer, budget, progress=False)['perplexity'],
               perplexity_20460=evaluate(work, tokenizer, q4km, progress=False)['perplexity'],
               commit=run_metadata(device)['commit'], shared_card=shared, worker=os.environ.get('AWQ_WORKER'),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None)
    del work
    if device.type == 'cuda': torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'awq_quality.json'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--bits', type=int, nargs='+', default=[4, 3])
    parser.add_argument('--only', nargs='+', default=None, help='labels to run (default: all)')
    parser.add_argument('--peers', action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument('--append', action='store_true', help='add to the rows already in --out')
    parser.add_argument('--calib-samples', type=int, default=None, help='calibration sequences (default: the budget)')
    parser.add_argument('--claims', default=None,
                        help='a folder shared by several processes on one card: each takes the next task not taken')
    parser.add_argument('--done', nargs='*', default=[], help="JSON files whose rows need not run again")
    parser.add_argument('--check', action=argparse.BooleanOptionalAction, default=True,
                        help='the float32 correctness check first (one process of several is enough)')
    parser.add_argument('--merge', nargs='+', default=None, help='write --out from these workers\' files, run nothing')
    parser.add_argument('--notes', default=None, help="with --merge: the result's notes")
    parser.add_argument('--timing-blocks', type=int, default=None,
                        help='time each task on this many blocks only (the card to itself), no evaluation')
    parser.add_argument('--memory-fraction', type=float, default=None,
                        help="this process's share of the card's memory (torch.cuda.set_per_process_memory_fraction): "
                             "our AWQ batches as many alphas as free memory takes, which starves the other workers")
    parser.add_argument('--retries', type=int, default=4, help='tries after an out-of-memory error (shared card)')
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    if args.merge: return merge(Path(args.out), args.merge, args.notes)
    device = default_device()
    if args.memory_fraction and device.type == 'cuda': torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    budget = Budget('quick', 4, 64, 256, 128) if args.quick else get_budget('full')
    if args.calib_samples: budget = dataclasses.replace(budget, calib_samples=args.calib_samples)
    q4km = Budget('quick', 0, 0, 256, 128) if args.quick else Q4_K_M
    model, tokenizer = load_model(device=device)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.append and out.exists() else {}
    result.update(run_metadata(device), budget=str(budget), matmul='tf32', group_size=64, symmetric=False)
    result.setdefault('rows', []); result.setdefault('failures', [])
    def save(): out.write_text(json.dumps(result, indent=1))
    if args.check:
        result['correctness'] = check_correctness(model, calibration_samples(tokenizer, 4, 256), device)
        print(result['correctness'], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # after the float32 check
    if args.check:
        result['reference'] = {'perplexity': evaluate(model, tokenizer, budget, progress=False)['perplexity'],
                               'perplexity_20460': evaluate(model, tokenizer, q4km, progress=False)['perplexity']}
        print('float32', result['reference'], flush=True)
    save()
    claims = Path(args.claims) if args.claims else None
    if claims: claims.mkdir(parents=True, exist_ok=True)
    skip = done_rows(args.done, (budget.calib_samples, budget.calib_seq_len))
    calibrations = {}
    for task in tasks(args.seeds, args.bits, args.peers, args.only):
        label, method, cfg, source, seed, bits = task
        if (label, seed, bits) in skip or not claim(claims, task): continue
        if seed not in calibrations:
            calibrations[seed] = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=seed)
        if args.timing_blocks:
            if not result.get('timing'):  # a first, untimed run: kernels loaded, caches warm
                time_blocks(('AWQ', 'awq', {}, 'ours', seed, bits), model, tokenizer, calibrations[seed], 1, device)
            try: row = time_blocks(task, model, tokenizer, calibrations[seed], args.timing_blocks, device)
            except Exception as error:
                result['failures'].append(dict(label=label, timing=True, error=repr(error)[:500],
                                               trace=traceback.format_exc()[-2000:]))
                print('FAILED timing', label, repr(error)[:300], flush=True); save(); continue
            result.setdefault('timing', []).append(row); save()
            print(f"timing {label:34s} {bits}b: {row['seconds_per_block']:.2f} s a block", flush=True)
            continue
        for attempt in range(args.retries + 1):
            try: row = run_task(task, model, tokenizer, calibrations[seed], budget, q4km, device, claims is not None)
            except Exception as error:
                if isinstance(error, torch.OutOfMemoryError) and attempt < args.retries:
                    print('out of memory, again in 30 s:', label, bits, seed, flush=True)
                    torch.cuda.empty_cache(); time.sleep(30); continue
                result['failures'].append(dict(label=label, seed=seed, bits=bits, error=repr(error)[:500],
                                               trace=traceback.format_exc()[-2000:]))
                print('FAILED', label, bits, seed, repr(error)[:300], flush=True); save(); row = None
            break
        if row is None: continue
        result['rows'].append(row); save()
        print(f"{label:34s} {bits}b seed {seed}: {row['perplexity']:.3f} ({row['perplexity_20460']:.3f} "
              f"on 20,460) in {row['seconds']:.1f} s", flush=True)
    save()

if __name__ == '__main__':
    main()
