"""`quantize_model` over tiny random models of several architectures (see `tiny_models.py`).

Each model is built once per session (seeded, float32, eager attention) and deep-copied before anything changes
it; each (architecture, method) pair is quantized once and shared by the tests that only read the result.
Calibration: 4 sequences of 32 random token ids from a seeded generator.
"""
import copy, math
import pytest, torch
from torch import nn

from tiny_models import ARCHS, build, calibration, blocks_of, block_linears

api = pytest.importorskip('quantcourse.api', reason='quantcourse.api (quantize_model) is not in this checkout yet')
from quantcourse.api import quantize_model, save_quantized, load_quantized
from quantcourse.core import decoder_blocks, QuantizedLinear
from quantcourse.outliers import smooth_model

ARCH_NAMES = list(ARCHS)
METHODS = ['rtn', 'gptq', 'nf4', 'fp4', 'w8a8', 'llm_int8', 'smoothquant', 'awq', 'awq_gptq', 'gguf_q4_0', 'gguf_q8_0']
CONFIG = {'rtn': dict(bits=4, group_size=64), 'gptq': dict(bits=4, group_size=64)}  # the others: their defaults
NEEDS_SMOOTHING = {'smoothquant', 'awq', 'awq_gptq'}  # methods that fold factors into the layer before

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread while this file runs: these matrices are too small to share, and on a busy 2-core machine
    two threads that spin-wait on each other made the file 25x slower (7 s with one thread, 190 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope='session')
def calib(): return calibration(4, 32, seed=0)

_models = {}
@pytest.fixture(scope='session')
def tiny():
    "tiny(arch) -> the float model of `arch`, built once per session; never change it, deep-copy it."
    def get(arch):
        if arch not in _models: _models[arch] = build(arch)
        return _models[arch]
    return get

_quantized = {}
@pytest.fixture(scope='session')
def quantized(tiny, calib):
    "quantized(arch, method) -> (model, report), quantized once per session from a copy of the float model."
    def get(arch, method):
        if (arch, method) not in _quantized:
            model = copy.deepcopy(tiny(arch))
            report = quantize_model(model, method, calibration=calib, progress=False, **CONFIG.get(method, {}))
            _quantized[arch, method] = model, report
        return _quantized[arch, method]
    return get

def _skip_unsmoothable(arch, method):
    if method in NEEDS_SMOOTHING and not ARCHS[arch].smoothable:
        pytest.skip(f"{arch} cannot be smoothed ({ARCHS[arch].why}); test_smoothquant_refuses covers it")

@torch.no_grad()
def _logits(model, ids): return model(ids, use_cache=False).logits

# ---------------------------------------------------------------------------------------------------------- discovery
@pytest.mark.parametrize('arch', ARCH_NAMES)
def test_decoder_blocks_found(arch, tiny):
    "`decoder_blocks` finds the blocks where the architecture keeps them (OPT: model.decoder.layers, GPT-NeoX: gpt_neox.layers)."
    model = tiny(arch)
    name, blocks = decoder_blocks(model)
    assert name == ARCHS[arch].blocks and blocks is blocks_of(model, arch)

# ------------------------------------------------------------------------------------ 1. every decoder linear quantized
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('arch', ARCH_NAMES)
def test_every_decoder_linear_quantized(arch, method, tiny, quantized):
    "Every nn.Linear inside the blocks becomes a QuantizedLinear, no nn.Linear is left there, one report row each."
    _skip_unsmoothable(arch, method)
    before = block_linears(tiny(arch), arch)
    model, report = quantized(arch, method)
    after = block_linears(model, arch, QuantizedLinear)
    assert sorted(after) == sorted(before)
    assert [n for n, m in blocks_of(model, arch).named_modules() if type(m) is nn.Linear] == []
    assert not isinstance(model.get_output_embeddings(), QuantizedLinear)  # outside the blocks: left alone
    assert sorted(r['layer'] for r in report.rows) == sorted(before)
    for r in report.rows:
        assert r['method'] == method and r['bits_per_weight'] > 0 and r['seconds'] >= 0
        assert r['error'] is not None and math.isfinite(r['error']) and r['error'] >= 0, r
    assert len(report.to_frame()) == len(before)

# ------------------------------------------------------------------------------------------------- 2. it still generates
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('arch', ARCH_NAMES)
def test_quantized_model_generates(arch, method, quantized, calib):
    "Greedy generation of 5 tokens from 2 prompts of 8 gives (2, 13) ids and finite logits at every step."
    _skip_unsmoothable(arch, method)
    model, _ = quantized(arch, method)
    ids = calib[:2, :8]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 13)
    assert torch.equal(out.sequences[:, :8], ids)
    assert len(out.logits) == 5 and all(torch.isfinite(l).all() for l in out.logits)

# --------------------------------------------------------------------------------------------- 3. GPTQ below RTN, 3 bits
@pytest.mark.parametrize('arch', ARCH_NAMES)
def test_gptq_error_below_rtn(arch, tiny, calib):
    """At 3 bits, group 64, asymmetric, on the same calibration, GPTQ's reported per-layer errors are below RTN's.

    Asserted: the mean over layers of GPTQ's error is below 0.8x RTN's, and GPTQ's error is lower on every layer.
    Why every layer: GPTQ minimises exactly the error reported (the layer's output error on its calibration inputs),
    and with at most 128 calibration tokens against in_features of 128-256 the Hessian is far from isotropic, so
    GPTQ's gain is large on each layer; the two runs see slightly different inputs past the first layer (each
    method's earlier layers are quantized differently), which moves errors by far less than that gain. Measured
    (torch 2.13 CPU): GPTQ/RTN mean ratio 0.08-0.37 by architecture, worst single layer 0.46.
    """
    settings = dict(bits=3, group_size=64, symmetric=False, calibration=calib, progress=False)
    gptq = quantize_model(copy.deepcopy(tiny(arch)), 'gptq', **settings).rows
    rtn = quantize_model(copy.deepcopy(tiny(arch)), 'rtn', **settings).rows
    g, r = {row['layer']: row['error'] for row in gptq}, {row['layer']: row['error'] for row in rtn}
    assert g.keys() == r.keys()
    worse = {n: (g[n], r[n]) for n in g if not g[n] < r[n]}
    assert sum(g.values()) / len(g) < 0.8 * sum(r.values()) / len(r), (g, r)
    assert not worse, f"GPTQ not below RTN on {worse}"

# -------------------------------------------------------------------------------------- 4. SmoothQuant keeps the logits
RTOL, ATOL = 1e-4, 1e-5

@pytest.mark.parametrize('arch', [a for a in ARCH_NAMES if ARCHS[a].smoothable])
def test_smooth_model_keeps_logits(arch, tiny, calib):
    """`smooth_model(copy, calibration, alpha=0.5)` changes the norms and the linears they feed, not the logits.

    Tolerance: rtol 1e-4, atol 1e-5 on float32 logits of magnitude up to ~7. Smoothing is exact in real arithmetic;
    in float32 each rescaled product rounds differently. Folding random factors in [0.1, 10] by hand into every
    norm -> linears pair of these models moves the logits by at most 5.3e-6 (a few ulps); folding them wrongly
    (a LayerNorm bias left undivided, or Gemma's `1 + weight` divided as if it were `weight`) moves them by 0.7-3.4.
    Measured with `smooth_model` (factors 1.3-4.5): max |difference| 2.2e-6 to 4.7e-6.
    """
    float_model = tiny(arch)
    model = copy.deepcopy(float_model)
    smooth_model(model, calib, alpha=0.5)
    ids = calibration(2, 24, seed=1)                            # not the calibration tokens
    torch.testing.assert_close(_logits(model, ids), _logits(float_model, ids), rtol=RTOL, atol=ATOL)
    fb, sb = blocks_of(float_model, arch), blocks_of(model, arch)
    for i in range(len(fb)):
        for norm, linears in ARCHS[arch].norm_fed:
            assert not torch.equal(fb[i].get_submodule(norm).weight, sb[i].get_submodule(norm).weight), (i, norm)
            for l in linears:
                assert not torch.equal(fb[i].get_submodule(l).weight, sb[i].get_submodule(l).weight), (i, l)

@pytest.mark.parametrize('arch', [a for a in ARCH_NAMES if not ARCHS[a].smoothable])
def test_smoothquant_refuses(arch, tiny, calib):
    "Where no norm sits directly before a group of linears (post-LN OPT's q, k, v), smoothing raises a ValueError naming it."
    model = copy.deepcopy(tiny(arch))
    with pytest.raises(ValueError, match=ARCHS[arch].missing):
        smooth_model(model, calib, alpha=0.5)
    with pytest.raises(ValueError, match=ARCHS[arch].missing):
        quantize_model(copy.deepcopy(tiny(arch)), 'smoothquant', calibration=calib, progress=False)
    with pytest.raises(ValueError, match='AWQ finds nowhere to fold factors'):
        quantize_model(copy.deepcopy(tiny(arch)), 'awq', calibration=calib, progress=False)

# ------------------------------------------------------------------------------------- 5. Gemma 3: each block's kwargs
@torch.no_grad()
def _block_kwargs(model, arch, ids):
    "The hidden states and keyword arguments each block receives in an ordinary forward."
    seen, blocks = [], blocks_of(model, arch)
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw)), with_kwargs=True) for b in blocks]
    try: model(ids, use_cache=False)
    finally:
        for h in hooks: h.remove()
    assert len(seen) == len(blocks)
    return seen

def test_gemma3_blocks_receive_their_own_kwargs(tiny, calib):
    "Sliding and full layers get different position embeddings (rope base 1e4 vs 1e6) and masks (window 8 vs causal)."
    model = tiny('gemma3')
    types = model.config.layer_types
    assert types == ['sliding_attention', 'full_attention'] * 2
    seen = _block_kwargs(model, 'gemma3', calib)
    kw = [k for _, k in seen]
    for i, j in [(0, 1), (2, 3), (0, 3)]:                       # different types: different cos, sin and mask
        assert not torch.equal(kw[i]['position_embeddings'][0], kw[j]['position_embeddings'][0])
        assert not torch.equal(kw[i]['attention_mask'], kw[j]['attention_mask'])
    for i, j in [(0, 2), (1, 3)]:                               # same type: the same tensors
        assert torch.equal(kw[i]['position_embeddings'][0], kw[j]['position_embeddings'][0])
        assert torch.equal(kw[i]['attention_mask'], kw[j]['attention_mask'])
    block1, (h1, _) = blocks_of(model, 'gemma3')[1], seen[1]  # and it matters: block 1 run with block 0's kwargs
    with torch.no_grad():
        own, wrong = block1(h1, **kw[1]), block1(h1, **kw[0])
    own, wrong = (o[0] if isinstance(o, tuple) else o for o in (own, wrong))
    assert (own - wrong).abs().max() > 1e-2

@torch.no_grad()
def _layer_inputs(model, arch, ids, names, kwargs_of_block=None):
    """Inputs of the modules `names` on `ids`: an ordinary forward, or (kwargs_of_block given) the blocks driven one
    by one from the first block's input, block i called with kwargs_of_block(i)."""
    inputs, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].detach().clone())))
    try:
        if kwargs_of_block is None: model(ids, use_cache=False)
        else:
            hidden = _block_kwargs(model, arch, ids)[0][0]
            inputs.clear()
            for i, block in enumerate(blocks_of(model, arch)):
                out = block(hidden, **kwargs_of_block(i))
                hidden = out[0] if isinstance(out, tuple) else out
    finally:
        for h in hooks: h.remove()
    return {n: torch.cat(v) for n, v in inputs.items()}

@torch.no_grad()
def _rel_mse(qlayer, flayer, x):
    y = flayer(x).double()
    return float(((qlayer(x).double() - y) ** 2).sum() / (y ** 2).sum())

def _errors(model, float_model, arch, ids, names, kwargs_of_block=None):
    "Each layer's relative output error, recomputed from the quantized layer and its float original on captured inputs."
    x = _layer_inputs(model, arch, ids, names, kwargs_of_block)
    return {n: _rel_mse(model.get_submodule(n), float_model.get_submodule(n), x[n]) for n in names}

_close = lambda a, b: abs(a - b) <= 1e-3 * abs(b) + 1e-9

@pytest.mark.parametrize('method', ['rtn', 'gptq'])
@pytest.mark.parametrize('arch', ARCH_NAMES)
def test_reported_errors_are_on_the_layers_inputs(arch, method, tiny, quantized, calib):
    """Every reported error equals the error recomputed (`_rel_mse`, rtol 1e-3) on the inputs the layer sees in the
    quantized model's own forward on the calibration tokens: block after block, each layer after the ones before it
    were quantized ("the rest of the pass sees its quantized output").

    The float model's forward is accepted as the other reading of "its calibration inputs", but one reading must hold
    for every layer: a pass where some layers' outputs are float and others quantized matches neither.
    """
    float_model = tiny(arch)
    model, report = quantized(arch, method)
    names = block_linears(float_model, arch)
    reported = {r['layer']: r['error'] for r in report.rows}
    on_float_inputs = _layer_inputs(float_model, arch, calib, names)
    readings = {'quantized forward': _errors(model, float_model, arch, calib, names),
                'float forward': {n: _rel_mse(model.get_submodule(n), float_model.get_submodule(n), on_float_inputs[n])
                                  for n in names}}
    ok = [r for r, e in readings.items() if all(_close(reported[n], e[n]) for n in names)]
    off = {n: (reported[n], readings['quantized forward'][n], readings['float forward'][n])
           for n in names if not _close(reported[n], readings['quantized forward'][n])}
    assert ok, f"(reported, on the quantized forward's inputs, on the float forward's inputs): {off}"

def test_gemma3_gptq_errors_use_each_blocks_kwargs(tiny, calib):
    """On Gemma 3, GPTQ's reported errors are those of inputs computed with every block's own kwargs, and differ from
    what a calibration feeding block 0's kwargs to every block would give.

    Only the last linear of each block (mlp.down_proj) is quantized (`names=`), so the expected inputs do not depend
    on how the pass orders layers inside a block: block i's down_proj reads the float block i driven with its own
    kwargs from the output of blocks < i (their down_proj quantized). The reference drives the blocks one by one
    with hooks, once with each block's kwargs and once with block 0's; the errors are recomputed on both (rtol 1e-3);
    the reported ones must match the first, and the second must differ by more than 1% somewhere (the test's teeth:
    blocks 1 and 3 are full-attention layers, rope base 1e6 and no window).
    """
    float_model = tiny('gemma3')
    model = copy.deepcopy(float_model)
    names = [f'model.layers.{i}.mlp.down_proj' for i in range(4)]
    report = quantize_model(model, 'gptq', calibration=calib, names=names, progress=False, bits=4, group_size=64)
    assert sorted(r['layer'] for r in report.rows) == names
    seen = _block_kwargs(float_model, 'gemma3', calib)
    reported = {r['layer']: r['error'] for r in report.rows}
    own = _errors(model, float_model, 'gemma3', calib, names, lambda i: seen[i][1])
    assert own == _errors(model, float_model, 'gemma3', calib, names)  # driving the blocks == an ordinary forward
    wrong = _errors(model, float_model, 'gemma3', calib, names, lambda i: seen[0][1])
    assert all(_close(reported[n], own[n]) for n in names), {n: (reported[n], own[n], wrong[n]) for n in names}
    assert any(abs(wrong[n] - own[n]) > 1e-2 * own[n] for n in names), "block 0's kwargs change nothing: no teeth"
    ids = calibration(2, 24, seed=1)                            # and the quantized model still differs from float
    assert not torch.equal(_logits(model, ids), _logits(float_model, ids))

# ------------------------------------------------------------------------------------------------ 6. save / load
SAVE_LOAD = {'rtn': 'llama', 'gptq': 'gemma3', 'nf4': 'phi3', 'fp4': 'qwen2', 'w8a8': 'opt',
             'llm_int8': 'gpt_neox', 'smoothquant': 'mistral', 'gguf_q4_0': 'gemma3', 'gguf_q5_1': 'opt', 'gguf_q8_0': 'phi3'}

@pytest.mark.parametrize('method,arch', list(SAVE_LOAD.items()))
def test_save_load_round_trip(arch, method, quantized, tmp_path):
    "`save_quantized` then `load_quantized` into a fresh float copy gives bit-identical logits (SmoothQuant: norms too)."
    model, _ = quantized(arch, method)
    path = tmp_path / f'{arch}-{method}.safetensors'
    save_quantized(model, path)
    fresh = build(arch)
    loaded = load_quantized(path, fresh)
    assert loaded is fresh                                      # rebuilt in place, and returned
    ids = calibration(2, 16, seed=2)
    assert sorted(block_linears(loaded, arch, QuantizedLinear)) == sorted(block_linears(model, arch, QuantizedLinear))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
