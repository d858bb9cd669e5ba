"""Why chapter 04's GPTQ table looks the way it does: variants of our GPTQ (and the reference's) on the course model.

bench/gptq_table.py compares round-to-nearest, our GPTQ and IST-DASLab's reference GPTQ in 8 settings. This script
re-runs single pieces of that comparison with one thing changed, to find out what moves the perplexity:
- seed1, seed2: our GPTQ on a different random draw of the calibration windows (same novels, same size). The spread
  over seeds 0, 1, 2 is how much perplexity moves for reasons that have nothing to do with the algorithm;
- float32_scales: our GPTQ rounding against float32 scales and keeping the float weights (as the reference does)
  instead of rounding scales up to float16 first (as stored);
- static_groups: group grids fitted on the original weights, before any update (the reference's --static-groups);
  static_groups_seed1, static_groups_seed2: the same on the other two calibration draws;
- stale_group_grid: groups found on the fly the way the reference's code does it: a group that starts inside a lazy
  block of 128 columns is fitted on the weights as they stood when the block began (before that block's own updates);
- as_reference: both of the reference's habits at once (float32 scales and the stale group grid); on single layers
  this gives the reference's weights to float32 rounding (for per-channel grids, float32_scales alone does);
- reference_static_groups: the reference itself with static_groups=True;
- reference_seed1: the reference itself on calibration draw 1 (its seed-0 run is gptq_table.py's).
Every row uses the settings of gptq_table.py (asymmetric, damping 1%, block 128) and the budget of the machine
('full' on CUDA). Writes --out (default bench/results/gptq_ablation.json) after every row, naming the card, the commit
and the time (benchmeta.run_metadata; each row names its own run's too), merging with rows already there when the card
and budget match (so a run can be split over several calls with --variants).
`--quick` runs on a 2-block model with tiny data to show the script works on a CPU; its numbers mean nothing.
"""
import argparse, contextlib, copy, io, json, tempfile
from pathlib import Path
import torch
import transformers
import quantcourse.gptq as gptq
from quantcourse.core import Budget, load_model, get_budget, calibration_samples, evaluate, default_device, QuantizedLinear, METHODS
from quantcourse.api import quantize_model
from benchmeta import run_metadata
from gptq_speed import check_correctness
from gptq_table import ALL_SETTINGS, load_reference, quantize_model_reference, timed, parse_setting

GROUPED = [s for s in ALL_SETTINGS if s[1] != 'channel']
VARIANTS = {'seed1': ALL_SETTINGS, 'seed2': ALL_SETTINGS, 'float32_scales': ALL_SETTINGS, 'static_groups': GROUPED,
            'stale_group_grid': GROUPED, 'as_reference': GROUPED, 'reference_static_groups': GROUPED,
            'static_groups_seed1': GROUPED, 'static_groups_seed2': GROUPED, 'reference_seed1': ALL_SETTINGS}


class StaleGroupGrid(gptq.ColumnGrid):
    "Groups found on the fly from the weights as they stood at the start of the current lazy block (the reference's way)."
    block = 128
    def round(self, column, upcoming, codes):
        if self.on_the_fly and column % self.block == 0: self.snapshot = upcoming[:self.block].clone()
        self.column = column
        return super().round(column, upcoming, codes)

    def fit(self, columns):
        if self.on_the_fly:  # fit the group starting at this column on its weights as they stood when the block began
            start = self.column % self.block
            columns = self.snapshot[start:start + self.group_size].T
        super().fit(columns)


class Float32Grid(gptq.ColumnGrid):
    "Grids with float32 scales, as the reference keeps them (ours rounds them up to float16 before choosing codes)."
    def fit(self, columns):
        scale, zero = gptq.scale_zero(columns, self.bits, self.symmetric, None, check=False)
        self.params.append((scale[:, 0], 1 / scale[:, 0], None if zero is None else zero[:, 0]))

    def result(self, codes, damping, losses=None):
        out = super().result(codes, damping, losses)
        out.quantized.scale = torch.stack([s for s, _, _ in self.params], 1)  # not rounded to float16 for storage
        return out


class ReferenceLikeGrid(StaleGroupGrid, Float32Grid):
    "Both of the reference's habits: float32 scales, and group grids fitted at the start of each lazy block."


@contextlib.contextmanager
def patched(target, **attributes):
    "Replace attributes of `target` (a module or a class) for the duration."
    old = {k: getattr(target, k) for k in attributes}
    for k, v in attributes.items(): setattr(target, k, v)
    try: yield
    finally:
        for k, v in old.items(): setattr(target, k, v)


def check_as_reference(reference, device) -> str:
    "On random layers, ours with both of the reference's habits must give the reference's weights, up to float32 rounding."
    reference_gptq, reference_quant = reference
    gen, worst = torch.Generator().manual_seed(0), 0.0
    for act_order in (False, True):
        weight = torch.randn(64, 512, generator=gen).to(device)
        inputs = (torch.randn(4096, 512, generator=gen) * (0.1 + 3 * torch.rand(512, generator=gen))).to(device)
        layer = torch.nn.Linear(512, 64, bias=False).to(device); layer.weight.data = weight.clone()
        worker = reference_gptq.GPTQ(layer); worker.quantizer = reference_quant.Quantizer()
        worker.quantizer.configure(4, perchannel=True, sym=False, mse=False)
        worker.add_batch(inputs[None], None)
        hessian = worker.H.clone()
        with contextlib.redirect_stdout(io.StringIO()): worker.fasterquant(percdamp=.01, groupsize=64, actorder=act_order)
        with patched(gptq, ColumnGrid=ReferenceLikeGrid): ours = gptq.gptq_quantize(weight, hessian, 4, 64, act_order=act_order)
        worst = max(worst, (ours.dequantize() - layer.weight.data).abs().max().item())
    if worst > 1e-5: raise AssertionError(f"ours with the reference's habits differs from the reference by {worst:.3g}")
    return f"ours with the reference's habits gives the reference's weights to {worst:.1e} (64 x 512 layers, 4-bit g64, with and without act order)"


class FloatWeightLinear(QuantizedLinear):
    "GPTQ's weight as a patched grid computed it, kept in float32 (packing would round float32 scales to float16)."
    method = 'gptq_float32'
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer('values', torch.zeros(out_features, in_features)); self._seal()
    def settings(self): return {}
    def compute(self, x): return torch.nn.functional.linear(x, self.values.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

def float_weights(linear, hessian, bits, group_size, symmetric, **options):
    "The registry's GPTQ step, but the quantized weight stays float32."
    q = gptq.gptq_quantize(linear.weight, hessian, bits, group_size, symmetric, **options)
    layer = FloatWeightLinear(linear.in_features, linear.out_features, linear.bias is not None).to(linear.weight.device)
    layer.values.copy_(q.dequantize(torch.float32))
    if linear.bias is not None: layer.bias.copy_(linear.bias.detach())
    return layer

KEEP_FLOATS = dict(quantize=float_weights)
OURS = {  # variant: (extra settings of quantize_model's 'gptq', attributes of quantcourse.gptq to replace, of its Method to replace)
    'seed': ({}, {}, {}), 'static_groups': (dict(static_groups=True), {}, {}), 'stale_group_grid': ({}, dict(ColumnGrid=StaleGroupGrid), {}),
    'float32_scales': ({}, dict(ColumnGrid=Float32Grid), KEEP_FLOATS), 'as_reference': ({}, dict(ColumnGrid=ReferenceLikeGrid), KEEP_FLOATS)}


def run_variant(variant, model, calibrations, bits, group, act_order, reference):
    "Quantize `model` (a copy) as `variant` says; return the seconds it took."
    calibration = calibrations[int(variant[-1])] if variant[-5:-1] == 'seed' else calibrations[0]  # 'seed1', 'static_groups_seed2'
    variant = 'seed' if variant.startswith('seed') else variant.removesuffix('_seed1').removesuffix('_seed2')
    if variant in OURS:
        extra, attributes, method = OURS[variant]
        def quantize(m):
            with patched(gptq, **attributes), patched(METHODS['gptq'], **method):
                quantize_model(m, 'gptq', calibration=calibration, bits=bits, group_size=group, act_order=act_order, progress=False, **extra)
    elif variant in ('reference', 'reference_static_groups'):
        fasterquant = reference[0].GPTQ.fasterquant  # gptq_table.py calls it with static_groups=False
        static = dict(fasterquant=lambda self, *args, **kwargs: fasterquant(self, *args, **{**kwargs, 'static_groups': True}))
        def quantize(m):
            with patched(reference[0].GPTQ, **(static if variant == 'reference_static_groups' else {})):
                quantize_model_reference(m, calibration, bits, group, act_order, reference)
    else: raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return timed(quantize, model, calibration.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variants', nargs='*', default=list(VARIANTS), help=f'some of {list(VARIANTS)}')
    parser.add_argument('--settings', nargs='*', type=parse_setting, help='a subset, as bits-group-actorder: 4-64-1 3-channel-0')
    parser.add_argument('--reference', default='.gpu/ref', help="folder holding IST-DASLab's gptq.py and quant.py")
    parser.add_argument('--out', help="default: bench/results/gptq_ablation.json; with --quick, in the temporary folder")
    parser.add_argument('--quick', action='store_true', help='2 blocks, tiny data: shows the script works')
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown: parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    args.out = Path(args.out or (Path(tempfile.gettempdir())/'gptq_ablation.quick.json' if args.quick
                                 else Path(__file__).resolve().parent/'results'/'gptq_ablation.json'))
    have_reference = all((Path(args.reference)/f).exists() for f in ('gptq.py', 'quant.py'))
    if any(v.startswith('reference') for v in args.variants) or have_reference: reference = load_reference(Path(args.reference))  # exits if missing
    else: reference = None; print(f"no reference code in {args.reference}: running our variants only", flush=True)
    device = default_device()
    if device.type == 'cpu': torch.set_num_threads(1)
    correctness = check_correctness(device) + ('' if reference is None else '; ' + check_as_reference(reference, device))
    print(correctness, flush=True)
    model, tokenizer = load_model(device=device)
    if args.quick:
        budget = Budget('quick', calib_samples=4, calib_seq_len=64, eval_tokens=512, context=256)
        model.model.layers = model.model.layers[:2]
    else: budget = get_budget()
    calibrations = {seed: calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=seed).to(device)
                    for seed in (0, 1, 2)}
    float_model = evaluate(model, tokenizer, budget, progress=False)
    meta = run_metadata(device)
    header = dict(**meta, transformers=transformers.__version__, quick=args.quick,
                  budget=str(budget), correctness=correctness, text=float_model['text'], tokens=float_model['tokens'],
                  context=float_model['context'], reference_model_perplexity=float_model['perplexity'],
                  calibration=f"{budget.calib_samples} x {budget.calib_seq_len} tokens of the other five novels; seed 0 "
                              "unless the variant names another",
                  variants=__doc__.split('re-runs')[1].split('Every row')[0].strip(),
                  rows_from="commit, dirty and recorded above are the latest run's; each row names the commit and time of the "
                            "run that made it (rows merged from earlier runs keep theirs; rows without them predate that)")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    same_run = all(previous.get(k) == header[k] for k in ('device', 'budget', 'quick'))
    rows = {(r['variant'], r['bits'], r['group'], r['act_order']): r for r in previous.get('rows', [])} if same_run else {}
    for variant in args.variants:
        for bits, group, act_order in VARIANTS[variant]:
            if args.settings and (bits, group, act_order) not in args.settings: continue
            quantized = copy.deepcopy(model)
            seconds = run_variant(variant, quantized, calibrations, bits, group, act_order, reference)
            row = dict(variant=variant, bits=bits, group=group, act_order=act_order, seconds=seconds,
                       perplexity=evaluate(quantized, tokenizer, budget, progress=False)['perplexity'],
                       commit=meta['commit'], dirty=meta['dirty'], recorded=meta['recorded'])
            del quantized
            print(row, flush=True)
            rows[variant, bits, group, act_order] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(header, rows=list(rows.values())), indent=1) + '\n')
    print(f"wrote {args.out}")


if __name__ == '__main__': main()
