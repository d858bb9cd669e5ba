"""mit-han-lab's llm-awq run on the course model, on our calibration tokens, beside RTN and our AWQ.

llm-awq's code is not in this repository: bench/get_llm_awq.sh copies its awq/quantize and awq/utils Python files
into the ignored folder peers/llm-awq/ (with the commit they came from in peers/llm-awq/COMMIT). This module imports
them from there (or from $LLM_AWQ) and changes nothing in their files: what has to differ for transformers 5, for
the CPU and for our calibration tokens is patched from outside, for the length of one call, in `_patched`:

- imports: awq/quantize/__init__.py imports w8a8_linear (the awq_inference_engine CUDA extension) and smooth (VILA),
  neither used by fake quantization: the packages awq, awq.quantize and awq.utils are made here without running
  their __init__.py, and awq_inference_engine (imported at the top of qmodule.py, used only by its real-quantized
  WQLinear) is an empty stand-in module;
- calibration: run_awq imports get_calib_dataset from awq.utils.calib_data inside the function (that file imports
  `datasets` and loads the pile from the hub): awq.utils.calib_data is a module of ours whose get_calib_dataset
  returns our (n_samples, seq_len) tokens, one row per sample, as the pile loader returns its blocks;
- the block's output: transformers 5's LlamaDecoderLayer returns a tensor, not a tuple, so run_awq's
  `inps = layer(inps, **layer_kwargs)[0]` would keep the first calibration sample only (2-D, which the next
  layers accept silently): a forward hook on every decoder layer returns `(output,)` during run_awq;
- the KV cache: the model's config has use_cache=True, so the Catcher catches `cache` (a DynamicCache) among the
  layer's keywords; auto_scale_block pops use_cache but not cache, and every later call of a layer or of self_attn
  appends its keys and values to that cache; the causal mask then lines each query up with the cache's first keys,
  those of run_awq's first call: the search of q/k/v never sees k and v quantized (`trap_checks`: self_attn with
  v_proj zeroed gives the float output exactly). config.use_cache is False during run_awq;
- the CPU: the `.cuda()` calls (layers, scales) and move_embed(model, "cuda") fail on a CPU-only torch: they are
  identities (move_embed moves to the CPU) while the model is on the CPU; on a GPU they run as llm-awq wrote them, and so do its `.cpu()` offloads: the model goes back
  to its device at the end. Not patched, because harmless (`trap_checks` shows it): on the CPU `v.cpu()` is `v`, so
  `_search_module_scale`'s saved state `{k: v.cpu() for k, v in block.state_dict().items()}` shares storage with
  the weights it then scales in place (`fc.weight.mul_`); but the first alpha is 0, whose factors are exactly 1,
  and its `fc.weight.data = ...` gives each weight new storage before any real factor is applied, ending the alias.
  The inputs kept by cache_input_hook (`x.detach().cpu()`, aliases on the CPU) are copied by torch.cat before
  apply_scale divides them in place;
- fewer than 512 calibration tokens (the quick budgets only): auto_clip_layer samples `n_token // 512` apart, a step
  of 0; it is then called with n_sample_token = the tokens there are. At 512 tokens or more it runs unchanged.

`run_llm_awq` follows llm-awq's entry.py: run_awq on a copy of the model (entry.py dumps its results and exits), then
apply_awq on the model, then pseudo_quantize_model_weight (q_backend 'fake'): float weights rounded to the 2^bits
levels of their group. The model keeps its dtype (llm-awq's entry.py loads float16).
`python bench/llm_awq_peer.py --quick` runs a tiny budget on the CPU: RTN, ours and llm-awq's perplexity and time,
then block 0's searched scales from both codes, then a check of each patch (`--traps`).
"""
import argparse, contextlib, copy, importlib, importlib.machinery, importlib.util, json, os, sys, time, types
from pathlib import Path
import torch
from torch import nn

Q_CONFIG = dict(zero_point=True, q_group_size=64)  # llm-awq's defaults but for the group size (128 there)
_CALIBRATION = {}  # the tokens get_calib_dataset hands to run_awq, set for one call


def peer_dir() -> Path:
    "llm-awq's files: $LLM_AWQ, else peers/llm-awq in the nearest folder above this file that has one."
    if os.environ.get('LLM_AWQ'): return Path(os.environ['LLM_AWQ'])
    for parent in Path(__file__).resolve().parents:
        if (parent / 'peers' / 'llm-awq' / 'awq' / 'quantize' / 'pre_quant.py').exists():
            return parent / 'peers' / 'llm-awq'
    raise FileNotFoundError("llm-awq's files are missing: run bench/get_llm_awq.sh (or set $LLM_AWQ)")


def _package(name: str, folder: Path):
    "A package module whose submodules load from `folder`, without running its __init__.py."
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def _get_calib_dataset(data='pileval', tokenizer=None, n_samples=512, block_size=512):
    "Stands for llm-awq's pile loader: our calibration tokens, as a list of (1, seq_len) blocks."
    tokens = _CALIBRATION['tokens']
    return [row[None] for row in tokens]


def load_llm_awq(folder: Path|None = None) -> types.SimpleNamespace:
    "llm-awq's pre_quant, auto_scale, auto_clip and quantizer modules, imported from `folder` (see `peer_dir`)."
    folder = Path(folder or peer_dir())
    loaded = sys.modules.get('awq')
    if loaded is not None and list(getattr(loaded, '__path__', [])) != [str(folder / 'awq')]:
        raise ImportError(f"another package named awq is imported ({loaded}); llm-awq's is in {folder}")
    if loaded is None:
        _package('awq', folder / 'awq'); _package('awq.quantize', folder / 'awq' / 'quantize')
        _package('awq.utils', folder / 'awq' / 'utils')
        sys.modules.setdefault('awq_inference_engine', types.ModuleType('awq_inference_engine'))
        calib = types.ModuleType('awq.utils.calib_data'); calib.get_calib_dataset = _get_calib_dataset
        sys.modules['awq.utils.calib_data'] = calib
    names = ('pre_quant', 'auto_scale', 'auto_clip', 'quantizer')
    found = {n: importlib.import_module(f'awq.quantize.{n}') for n in names}
    commit = (folder / 'COMMIT').read_text().strip() if (folder / 'COMMIT').exists() else None
    return types.SimpleNamespace(**found, folder=folder, commit=commit)


def _identity(self, *args, **kwargs): return self


@contextlib.contextmanager
def _patched(awq, model, calibration: torch.Tensor|None = None, block_tuples: bool = True,
             copies: bool = False):
    "The patches of this module's docstring, for the length of a `with`."
    on_cpu = next(model.parameters()).device.type == 'cpu'
    saved = dict(module_cuda=nn.Module.cuda, tensor_cuda=torch.Tensor.cuda, state_dict=nn.Module.state_dict,
                 clip_layer=awq.auto_clip.auto_clip_layer, move_embed=awq.pre_quant.move_embed,
                 use_cache=model.config.use_cache)
    handles = []
    original_state_dict, original_clip = saved['state_dict'], saved['clip_layer']
    def copied_state_dict(self, *args, **kwargs):
        out = original_state_dict(self, *args, **kwargs)
        top = not args and kwargs.get('destination') is None  # children are called with a destination
        if top:
            for k, v in out.items(): out[k] = v.clone()
        return out
    def clip_layer(w, input_feat, *args, **kwargs):
        tokens = input_feat.numel() // input_feat.shape[-1]
        if tokens < kwargs.get('n_sample_token', 512): kwargs['n_sample_token'] = tokens
        return original_clip(w, input_feat, *args, **kwargs)
    try:
        if calibration is not None: _CALIBRATION['tokens'] = calibration
        model.config.use_cache = False
        if on_cpu:
            nn.Module.cuda = _identity; torch.Tensor.cuda = _identity
            awq.pre_quant.move_embed = lambda model, device: saved['move_embed'](model, 'cpu')  # .to('cuda')
        if copies: nn.Module.state_dict = copied_state_dict  # only trap_checks: the aliasing is harmless
        awq.auto_clip.auto_clip_layer = clip_layer
        if block_tuples:
            tuple_out = lambda module, args, out: (out,) if isinstance(out, torch.Tensor) else None
            handles = [b.register_forward_hook(tuple_out) for b in awq.pre_quant.get_blocks(model)]
        yield
    finally:
        for h in handles: h.remove()
        nn.Module.cuda, torch.Tensor.cuda = saved['module_cuda'], saved['tensor_cuda']
        nn.Module.state_dict = saved['state_dict']
        awq.auto_clip.auto_clip_layer = saved['clip_layer']; awq.pre_quant.move_embed = saved['move_embed']
        model.config.use_cache = saved['use_cache']
        _CALIBRATION.clear()


@torch.no_grad()
def run_llm_awq(model, calibration: torch.Tensor, # (n_samples, seq_len) token ids
                bits: int, group_size: int = 64, clip: bool = True, scale: bool = True,
                tokenizer=None, # handed to run_awq, which hands it to the (replaced) pile loader only
                awq=None) -> nn.Module:
    "llm-awq's run_awq on `calibration`, apply_awq and pseudo_quantize_model_weight: `model`, changed in place."
    awq = awq or load_llm_awq()
    device = next(model.parameters()).device
    q_config = dict(Q_CONFIG, q_group_size=group_size)
    work = copy.deepcopy(model)  # entry.py: run_awq, dump its results, exit; then a fresh model loads them
    with _patched(awq, work, calibration):
        results = awq.pre_quant.run_awq(work, tokenizer, w_bit=bits, q_config=q_config, n_samples=len(calibration),
                                        seqlen=calibration.shape[1], auto_scale=scale, mse_range=clip)
    del work
    with _patched(awq, model, block_tuples=False):
        awq.pre_quant.apply_awq(model, results)
        awq.quantizer.pseudo_quantize_model_weight(model, w_bit=bits, q_config=q_config)
    return model.to(device)


def llm_awq(model, tokenizer, calibration, bits):
    "A row of bench/awq_quality.py: llm-awq's default run (scales + clip, asymmetric, groups of 64), in place."
    return run_llm_awq(model, calibration, bits, group_size=64, clip=True, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------- comparisons

@contextlib.contextmanager
def _swapped(module, name, value):
    "`module.name` is `value` for the length of a `with`."
    saved = getattr(module, name); setattr(module, name, value)
    try: yield
    finally: setattr(module, name, saved)


def _linear_inputs(block, hidden, kwargs) -> dict:
    "The input of each linear of `block` on one pass, as run_awq's cache_input_hook keeps them."
    feats, handles = {}, []
    def keep(name):
        def hook(module, args, output): feats[name] = args[0].detach().clone()
        return hook
    handles = [m.register_forward_hook(keep(n)) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    try: block(hidden, **kwargs)
    finally:
        for h in handles: h.remove()
    return feats


@torch.no_grad()
def compare_block_scales(model, calibration, bits: int = 4, group_size: int = 64, block: int = 0, awq=None):
    "Block `block`'s searched factors, llm-awq's (auto_scale_block) and ours (search_scale), on the same inputs."
    from quantcourse.core import decoder_blocks, block_inputs, linear_groups, run_block
    from quantcourse.awq import scale_groups, record_block, search_scale, channel_means, awq_scales
    import quantcourse.awq as ours_awq
    awq = awq or load_llm_awq()
    _, blocks = decoder_blocks(model)
    hidden, kwargs = block_inputs(model, calibration)
    for i in range(block): hidden = run_block(blocks[i], hidden, kwargs[i])
    theirs_block, ours_block = copy.deepcopy(blocks[block]), copy.deepcopy(blocks[block])
    # llm-awq's inputs: its run_awq's hook, on one float pass of the block
    feats = _linear_inputs(theirs_block, hidden, kwargs[block])
    before = {k: v.clone() for k, v in theirs_block.state_dict().items()}
    with _patched(awq, model, block_tuples=False):
        start = time.perf_counter()
        found = awq.auto_scale.auto_scale_block(theirs_block, dict(kwargs[block]), w_bit=bits,
                                                q_config=dict(Q_CONFIG, q_group_size=group_size), input_feat=feats)
        theirs_seconds = time.perf_counter() - start
    unchanged = all(torch.equal(before[k], v) for k, v in theirs_block.state_dict().items())
    groups = scale_groups(ours_block, linear_groups(ours_block, hidden, kwargs[block]))
    inputs, replays = record_block(ours_block, hidden, kwargs[block], [g.names[0] for g in groups],
                                   sorted({g.inspect for g in groups}))
    rows = []
    for prev, names, s_theirs in found:
        g = next((g for g in groups if g.source == prev and tuple(g.names) == tuple(names)), None)
        if g is None: rows.append(dict(group=f'{prev} -> {names}', ours=None)); continue
        start = time.perf_counter()
        s_ours, alpha, losses = search_scale(ours_block, g, inputs[g.names[0]], replays[g.inspect], bits,
                                             group_size, False, 20)
        ours_seconds = time.perf_counter() - start
        # ours again with llm-awq's rounding (float32 scales from the raw min/max) in place of fake_quantize
        # (float16 scales rounded up, the range widened to hold 0)
        theirs_round = lambda w, b, gs, sym: awq.quantizer.pseudo_quantize_tensor(w, b, not sym, gs)
        with _swapped(ours_awq, 'fake_quantize', theirs_round):
            _, alpha_llm_round, _ = search_scale(ours_block, g, inputs[g.names[0]], replays[g.inspect], bits,
                                                 group_size, False, 20)
        x_mean = channel_means(inputs[g.names[0]])
        grid = [awq_scales(x_mean, i / 20) for i in range(20)]  # which alpha gave llm-awq's scales
        nearest = min(range(20), key=lambda i: (grid[i] - s_theirs.float()).norm().item())
        s_theirs = s_theirs.float()
        rows.append(dict(group=f"{prev} -> {', '.join(names)}", alpha_ours=alpha, alpha_llm_awq=nearest / 20,
                         llm_awq_vs_grid=((grid[nearest] - s_theirs).norm() / s_theirs.norm()).item(),
                         relative_difference=((s_ours.float().cpu() - s_theirs).norm() / s_theirs.norm()).item(),
                         max_ratio=(s_ours.float().cpu() / s_theirs).sub(1).abs().max().item(),
                         alpha_ours_with_llm_awq_rounding=alpha_llm_round,
                         loss_at_ours=losses[int(round(alpha * 20))], loss_at_theirs=losses[nearest],
                         seconds_ours=ours_seconds))
    return dict(block=block, rows=rows, llm_awq_seconds=theirs_seconds, llm_awq_left_block_unchanged=unchanged)


def trap_checks(model, calibration, awq=None) -> dict:
    "Each suspected trap checked on the model: what the code would meet without the patch."
    from quantcourse.core import decoder_blocks, block_inputs
    awq = awq or load_llm_awq()
    out = {}
    _, blocks = decoder_blocks(model)
    assert awq.pre_quant.get_blocks(model) is blocks, 'get_blocks finds another list than ours'
    out['get_blocks'] = f'{type(model).__name__}: model.model.layers, the same {len(blocks)} blocks as ours (no trap)'
    # the Catcher's keywords, as run_awq catches them, with and without use_cache
    caught = {}
    for use_cache in (True, False):
        model.config.use_cache, kw, inps = use_cache, {}, []
        class Catcher(nn.Module):
            def __init__(self, m): super().__init__(); self.module = m
            def forward(self, inp, **kwargs): inps.append(inp); kw.update(kwargs); raise ValueError
        blocks[0] = Catcher(blocks[0])
        try: model(calibration)
        except ValueError: pass
        finally: blocks[0] = blocks[0].module
        caught[use_cache] = {k: type(v).__name__ for k, v in kw.items()}
        if use_cache:  # what the search would see: self_attn called again with the caught cache
            block, x = blocks[0], blocks[0].input_layernorm(inps[0])
            with torch.no_grad():
                block(inps[0], **kw)  # run_awq's call of the layer
                weight = block.self_attn.v_proj.weight.data
                block.self_attn.v_proj.weight.data = torch.zeros_like(weight)
                zeroed = block.self_attn(x, **kw)[0]
                block.self_attn.v_proj.weight.data = weight
                exact = block.self_attn(x, **dict(kw, cache=None))[0]
            cache_effect = ((zeroed - exact).norm() / exact.norm()).item()
    model.config.use_cache = True
    out['catcher_keywords'] = caught[True]
    out['position_embeddings'] = ('passed through (no trap)' if 'position_embeddings' in caught[True]
                                  else 'MISSING')
    cache = [k for k, v in caught[True].items() if v.endswith('Cache')]
    out['cache'] = (f'use_cache=True: the Catcher catches {cache}; auto_scale_block pops only use_cache (trap, '
                    'patched: config.use_cache False). With it, self_attn called again with v_proj zeroed differs from '
                    f'the float output by {cache_effect:.1e} (relative): the later calls attend over the first '
                    'call\'s keys and values, so the search never sees k and v quantized' if cache else 'no cache caught (no trap)')
    hidden, kwargs = block_inputs(model, calibration)
    y = blocks[0](hidden, **kwargs[0])
    out['layer_output'] = (f'{type(y).__name__} {tuple(y.shape)}; run_awq\'s [0] keeps {tuple(y[0].shape)} '
                           '(trap, patched: a hook returns (output,))' if isinstance(y, torch.Tensor)
                           else f'{type(y).__name__} (no trap)')
    t = torch.ones(3)
    shared = blocks[0].state_dict()['self_attn.q_proj.weight'].data_ptr() == blocks[0].self_attn.q_proj.weight.data_ptr()
    out['cpu_alias'] = f'on the CPU v.cpu() is v: {t.cpu() is t}; a state_dict() value shares its weight: {shared}'
    # auto_scale_block on block 0 as run_awq calls it (saved state aliased on the CPU), and with copies
    found = {}
    for copies in (False, True):
        block = copy.deepcopy(blocks[0]); before = {k: v.clone() for k, v in block.state_dict().items()}
        feats = _linear_inputs(block, hidden, kwargs[0])
        with _patched(awq, model, block_tuples=False, copies=copies):
            found[copies] = awq.auto_scale.auto_scale_block(block, dict(kwargs[0]), w_bit=4, q_config=Q_CONFIG,
                                                            input_feat=feats)
        found[copies, 'changed'] = [k for k, v in block.state_dict().items() if not torch.equal(before[k], v)]
    same = all(torch.equal(a[2], b[2]) for a, b in zip(found[False], found[True]))
    out['saved_state'] = (f"aliased saved state: the block is left with {len(found[False, 'changed'])} tensors "
                          f"changed (with copies: {len(found[True, 'changed'])}); the scales equal those found with "
                          f"copies: {same}. The first alpha is 0, whose factors are exactly 1: its `.data =` gives "
                          "each scaled weight new storage before any factor is applied, which ends the alias" +
                          (' (no trap in effect)' if same and not found[False, 'changed'] else ' (TRAP)'))
    try:
        torch.ones(1).cuda(); out['cuda'] = 'CUDA is available: .cuda() runs as written'
    except (AssertionError, RuntimeError) as error:
        out['cuda'] = f'.cuda() here: {type(error).__name__}: {error} (patched: identity while the model is on the CPU)'
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='tiny budget (8 x 256 calibration, 4,096 tokens)')
    parser.add_argument('--bits', type=int, nargs='+', default=[4])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--only', nargs='+', default=None, choices=['RTN', 'ours', 'llm-awq'],
                        help='rows to run (default: all three)')
    parser.add_argument('--traps', action=argparse.BooleanOptionalAction, default=None,
                        help='check each patch (default: with --quick)')
    parser.add_argument('--scales', action=argparse.BooleanOptionalAction, default=None,
                        help="compare block 0's searched scales (default: with --quick)")
    parser.add_argument('--out', default=None, help='write the rows to this JSON (default: print only)')
    args = parser.parse_args()
    from quantcourse.core import Budget, load_model, get_budget, calibration_samples, evaluate, default_device
    from quantcourse.api import quantize_model
    device = default_device()
    budget = Budget('quick', 8, 256, 4096, 512) if args.quick else get_budget('full')
    model, tokenizer = load_model(device=device)
    awq = load_llm_awq()
    result = dict(llm_awq_commit=awq.commit, llm_awq_folder=str(awq.folder), budget=str(budget),
                  group_size=64, symmetric=False, n_grid=20, rows=[])
    try:
        from benchmeta import run_metadata, sync; result.update(run_metadata(device))
    except ImportError: sync = lambda d: torch.cuda.synchronize(d) if d.type == 'cuda' else None
    print(f'llm-awq {awq.commit} from {awq.folder}; {budget}; {device}', flush=True)
    calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=args.seed)
    if args.traps if args.traps is not None else args.quick:
        result['traps'] = trap_checks(copy.deepcopy(model), calibration[:2].to(device), awq)
        for k, v in result['traps'].items(): print(f'trap {k}: {v}', flush=True)
    if args.scales if args.scales is not None else args.quick:
        result['block0_scales'] = compare_block_scales(model, calibration.to(device), 4, 64, 0, awq)
        for row in result['block0_scales']['rows']: print('block 0 scales', row, flush=True)
        print('llm-awq left block 0 unchanged after its search:',
              result['block0_scales']['llm_awq_left_block_unchanged'], flush=True)
    ref = evaluate(model, tokenizer, budget, progress=False)['perplexity']
    result['reference'] = ref
    print(f'float: {ref:.3f}', flush=True)
    runs = [('RTN', 'rtn', {}, 'RTN'), ('AWQ + clip (ours)', 'awq', dict(clip=True), 'ours'),
            ('llm-awq', None, {}, 'llm-awq')]
    runs = [r[:3] for r in runs if args.only is None or r[3] in args.only]
    for bits in args.bits:
        for label, method, cfg in runs:
            work = copy.deepcopy(model)
            sync(device); start = time.perf_counter()
            if method is None: llm_awq(work, tokenizer, calibration, bits)
            else:
                quantize_model(work, method, calibration=None if method == 'rtn' else calibration, bits=bits,
                               group_size=64, symmetric=False, progress=False, **cfg)
            sync(device); seconds = time.perf_counter() - start
            ppl = evaluate(work, tokenizer, budget, progress=False)['perplexity']
            result['rows'].append(dict(label=label, bits=bits, seed=args.seed, seconds=seconds, perplexity=ppl,
                                       calibration=list(calibration.shape)))
            print(f'{label:20s} {bits}b: perplexity {ppl:.3f} in {seconds:.1f} s', flush=True)
            if args.out: Path(args.out).write_text(json.dumps(result, indent=1))
            del work
    if args.out: Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
