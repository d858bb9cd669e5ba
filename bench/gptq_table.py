"""Chapter 04's table: round-to-nearest, our GPTQ and IST-DASLab's reference GPTQ on the course model.

For each setting (4 and 3 bits; one grid per row or groups of 64; with and without activation order; asymmetric
grids, damping 1% of the mean diagonal, groups found on the fly) it quantizes a fresh copy of the course model three
ways, times the quantization, and measures perplexity on the evaluation novel:
- RTN: `quantize_model(model, 'rtn', ...)`;
- ours: `quantize_model(model, 'gptq', ...)` (block by block, every layer calibrated on the outputs of the
  quantized layers before it);
- the reference: IST-DASLab's `gptq.py` and `quant.py` (github.com/IST-DASLab/gptq), imported at run time from
  --reference (they are not part of this repository), driven block by block in their --true-sequential order for
  Llama (keys, values, queries; then the output projection; then up and gate; then down), on the same calibration.
Before any of that it checks on the device that the fast GPTQ gives the slow column-by-column version's codes.
Writes a JSON naming the card, the commit and the time (benchmeta.run_metadata; each row names its own run's too) to
--out (default bench/results/gptq_table.json), after every setting, merging with the rows already there when the budget
and the card are the same (so a long run can be split with --settings).
The budget is `get_budget()`: 'full' on CUDA. `--quick` runs two settings on a truncated model with tiny
calibration and evaluation, to show on a CPU that the script works; its numbers mean nothing.
"""
import argparse, contextlib, copy, io, json, sys, tempfile, time
from pathlib import Path
import torch
import transformers
from quantcourse.core import Budget, load_model, get_budget, calibration_samples, evaluate, default_device
from quantcourse.core import model_bits, block_inputs, decoder_blocks, run_block
from quantcourse.api import quantize_model
from benchmeta import run_metadata, sync
from gptq_speed import check_correctness

ALL_SETTINGS = [(bits, group, act) for bits in (4, 3) for group in ('channel', 64) for act in (False, True)]
TRUE_SEQUENTIAL = [['self_attn.k_proj', 'self_attn.v_proj', 'self_attn.q_proj'], ['self_attn.o_proj'],
                   ['mlp.up_proj', 'mlp.gate_proj'], ['mlp.down_proj']]  # the reference's --true-sequential order for Llama


def load_reference(folder: Path):
    "Import the reference's `gptq` and `quant` modules from `folder`."
    folder = folder.resolve()
    missing = [f for f in ('gptq.py', 'quant.py') if not (folder/f).exists()]
    if missing: sys.exit(f"{folder} lacks {missing}: put IST-DASLab's gptq.py and quant.py (github.com/IST-DASLab/gptq) there, "
                         f"or name their folder with --reference")
    sys.path.insert(0, str(folder))
    if not torch.cuda.is_available(): torch.cuda.synchronize = lambda *args, **kwargs: None  # their fasterquant calls it
    with contextlib.redirect_stdout(io.StringIO()):  # quant.py says when its optional CUDA extension is missing
        import gptq as reference_gptq, quant as reference_quant
    for module in (reference_gptq, reference_quant):
        if Path(module.__file__).resolve().parent != folder: sys.exit(f"imported {module.__name__} from {module.__file__}, not from {folder}")
    return reference_gptq, reference_quant


@torch.no_grad()
def quantize_model_reference(model, calibration, bits, group, act_order, reference):
    "Quantize `model` in place with the reference's GPTQ class, block by block, in its true-sequential order."
    reference_gptq, reference_quant = reference
    hidden, per_block = block_inputs(model, calibration)
    for block, kwargs in zip(decoder_blocks(model)[1], per_block):
        for names in TRUE_SEQUENTIAL:  # each group calibrated on the outputs of the groups quantized before it
            workers = {}
            for name in names:
                workers[name] = reference_gptq.GPTQ(block.get_submodule(name))
                workers[name].quantizer = reference_quant.Quantizer()
                workers[name].quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            def add_batch(worker): return lambda module, inputs, output: worker.add_batch(inputs[0].data, output.data)
            handles = [block.get_submodule(name).register_forward_hook(add_batch(workers[name])) for name in names]
            try: run_block(block, hidden, kwargs)
            finally:
                for handle in handles: handle.remove()
            for worker in workers.values():
                with contextlib.redirect_stdout(io.StringIO()):  # it prints a time and an error per layer
                    worker.fasterquant(percdamp=.01, groupsize=-1 if group == 'channel' else group, actorder=act_order,
                                       static_groups=False)
                worker.free()
        hidden = run_block(block, hidden, kwargs)


def timed(quantize, model, device) -> float:
    "Seconds `quantize(model)` takes, the device synchronized on both sides."
    sync(device); start = time.perf_counter()
    quantize(model); sync(device)
    return time.perf_counter() - start


def parse_setting(text: str):
    "'4-64-1' -> (4, 64, True); '3-channel-0' -> (3, 'channel', False)."
    bits, group, act = text.split('-')
    return int(bits), group if group == 'channel' else int(group), act in ('1', 'true', 'True')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--reference', default='.gpu/ref', help="folder holding IST-DASLab's gptq.py and quant.py")
    parser.add_argument('--out', help="default: bench/results/gptq_table.json; with --quick, gptq_table.quick.json in the temporary folder")
    parser.add_argument('--settings', nargs='*', type=parse_setting, help='a subset, as bits-group-actorder: 4-64-1 3-channel-0')
    parser.add_argument('--budget', choices=['small', 'full'], help="default: get_budget() ('full' on CUDA)")
    parser.add_argument('--quick', action='store_true', help='2 settings, 2 blocks, tiny data: shows the script works')
    args = parser.parse_args()
    args.out = args.out or str(Path(tempfile.gettempdir())/'gptq_table.quick.json' if args.quick else Path(__file__).resolve().parent/'results'/'gptq_table.json')
    reference = load_reference(Path(args.reference))
    device = default_device()
    if device.type == 'cpu': torch.set_num_threads(1)  # both implementations on one thread: comparable times on a shared CPU
    correctness = check_correctness(device)
    print(correctness, flush=True)

    model, tokenizer = load_model(device=device)
    if args.quick:
        budget = Budget('quick', calib_samples=4, calib_seq_len=64, eval_tokens=512, context=256)
        model.model.layers = model.model.layers[:2]
        settings = args.settings or [(4, 'channel', False), (3, 64, True)]
    else: budget, settings = get_budget(args.budget), args.settings or ALL_SETTINGS
    print(budget, flush=True)
    calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=0).to(device)
    float_model = evaluate(model, tokenizer, budget, progress=False)
    out = Path(args.out)
    meta = run_metadata(device)
    header = dict(**meta, transformers=transformers.__version__, quick=args.quick,
                  budget=str(budget), budget_name=budget.name, correctness=correctness, text=float_model['text'],
                  tokens=float_model['tokens'], context=float_model['context'],
                  calibration=f"{budget.calib_samples} x {budget.calib_seq_len} tokens of the other five novels, seed 0",
                  reference_model_perplexity=float_model['perplexity'],
                  reference_code=f"IST-DASLab/gptq gptq.py + quant.py from {args.reference}, true-sequential order, "
                                 f"percdamp 0.01, asymmetric per-channel Quantizer (mse=False), groups found on the fly",
                  how="RTN: quantize_model('rtn') (asymmetric); ours: quantize_model('gptq') (asymmetric, percdamp 0.01, groups "
                      "found on the fly); seconds: quantization only, device synchronized",
                  rows_from="commit, dirty and recorded above are the latest run's; each row names the commit and time of the "
                            "run that made it (rows merged from earlier runs keep theirs; rows without them predate that)")
    previous = json.loads(out.read_text()) if out.exists() else {}
    same_run = all(previous.get(k) == header[k] for k in ('device', 'budget', 'quick'))
    rows = {(r['bits'], r['group'], r['act_order']): r for r in previous.get('rows', [])} if same_run else {}
    rtn = {}
    for bits, group, act_order in settings:
        if (bits, group) not in rtn:
            quantized = copy.deepcopy(model)
            seconds = timed(lambda m: quantize_model(m, 'rtn', bits=bits, group_size=group, symmetric=False, progress=False), quantized, device)
            rtn[bits, group] = (evaluate(quantized, tokenizer, budget, progress=False)['perplexity'], seconds)
            del quantized
        row = dict(bits=bits, group=group, act_order=act_order, rtn_perplexity=rtn[bits, group][0], rtn_seconds=rtn[bits, group][1],
                   commit=meta['commit'], dirty=meta['dirty'], recorded=meta['recorded'])
        ours = copy.deepcopy(model)
        row['ours_seconds'] = timed(lambda m: quantize_model(m, 'gptq', calibration=calibration, bits=bits, group_size=group,
                                                        act_order=act_order, progress=False), ours, device)
        row['ours_perplexity'] = evaluate(ours, tokenizer, budget, progress=False)['perplexity']
        row['ours_bits_per_weight'] = model_bits(ours)
        del ours
        theirs = copy.deepcopy(model)
        row['reference_seconds'] = timed(lambda m: quantize_model_reference(m, calibration, bits, group, act_order, reference), theirs, device)
        row['reference_perplexity'] = evaluate(theirs, tokenizer, budget, progress=False)['perplexity']
        del theirs
        if device.type == 'cuda': torch.cuda.empty_cache()
        if device.type == 'cuda': row['peak_gpu_memory_gib'] = torch.cuda.max_memory_allocated() / 2**30
        print(row, flush=True)
        rows[bits, group, act_order] = row
        ordered = [rows[k] for k in ALL_SETTINGS if k in rows] + [r for k, r in rows.items() if k not in ALL_SETTINGS]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(header, rows=ordered), indent=1) + '\n')
    print(f"wrote {out}")


if __name__ == '__main__': main()
