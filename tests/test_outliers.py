"Unit tests for quantcourse.outliers: parity with bitsandbytes' LLM.int8(), exact integer matmuls, SmoothQuant's invariance, bad input."
import copy, io, logging
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st
from quantcourse.core import import_bitsandbytes
bnb = import_bitsandbytes()  # without its hub kernel fetch (chapter 00)
from safetensors.torch import save, load
from quantcourse.core import linear_names
from quantcourse.outliers import (ChannelStats, input_stats, int8_matmul, quantize_activations, W8A8Linear,
    int8_vectorwise_quant, LLMInt8Linear, smooth_scales, smooth_norm_linears, smooth_model)
from quantcourse.api import quantize_model

logging.getLogger('bitsandbytes').setLevel(logging.ERROR)


def activations(rows, cols, seed, outlier_cols=(3,), scale=20.0):
    "Gaussian activations with a few large channels, like a transformer's."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    for c in outlier_cols: x[:, c % cols] *= scale
    return x


def tiny_llama(seed=0):
    "A two-block Llama with random weights and random norm gains; built locally, nothing downloaded."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('layernorm.weight'): p.uniform_(0.5, 2.0); p[5] = 12.0  # one outlier channel
    return model


# --- LLM.int8() against bitsandbytes -------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 80), seed=st.integers(0, 10**6),
       threshold=st.sampled_from([None, 1.0, 2.5, 6.0]), scale=st.sampled_from([1.0, 10.0, 300.0]))
def test_vectorwise_quant_equals_bitsandbytes(rows, cols, seed, threshold, scale):
    x = activations(rows, cols, seed, outlier_cols=(seed,), scale=scale).half()
    codes, absmax, columns = int8_vectorwise_quant(x, threshold)
    theirs = bnb.functional.int8_vectorwise_quant(x.clone(), threshold=threshold or 0.0)
    assert torch.equal(codes, theirs[0]) and torch.equal(absmax, theirs[1])
    if threshold is not None: assert torch.equal(columns, theirs[2])
    else: assert theirs[2] is None and columns.numel() == 0


def test_vectorwise_quant_float32_equals_bitsandbytes():
    x = activations(33, 96, 1, outlier_cols=(4, 50), scale=9.0)
    for threshold in (None, 6.0):
        ours, theirs = int8_vectorwise_quant(x, threshold), bnb.functional.int8_vectorwise_quant(x.clone(), threshold=threshold or 0.0)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_outlier_columns_zeroed_and_outliers_do_not_set_scale():
    x = torch.tensor([[0.5, 10.0, -1.0], [2.0, 0.25, 1.0]])
    codes, absmax, columns = int8_vectorwise_quant(x, 6.0)
    assert columns.tolist() == [1]
    assert codes[:, 1].tolist() == [0, 0]
    assert absmax.tolist() == [1.0, 2.0]  # row 0's scale ignores the 10; row 1 still counts the 0.25 of the outlier column
    assert codes[0].tolist() == [64, 0, -127]


def bnb_layer(linear, threshold):
    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 has_fp16_weights=False, threshold=threshold)
    module.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None: module.bias = nn.Parameter(linear.bias.detach().clone())
    return module.to('cpu').eval()


@pytest.mark.parametrize('threshold', [6.0, None])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_llm_int8_layer_matches_linear8bitlt(threshold, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = activations(48, 256, 2, outlier_cols=(7, 100, 200), scale=15.0).to(dtype)
    ours, theirs = LLMInt8Linear.from_linear(linear, threshold), bnb_layer(linear, threshold or 0.0)
    assert torch.equal(ours.weight_codes, theirs.weight.data) and torch.equal(ours.weight_absmax, theirs.weight.SCB)
    with torch.no_grad(): y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == dtype
    torch.testing.assert_close(y_ours, y_theirs, atol=0.03, rtol=1e-5)  # bitsandbytes' own tolerance for this layer
    if dtype == torch.float32:  # tighter: only bitsandbytes' rescaling constant (6.200124e-05 vs 1/127**2) differs
        assert ((y_ours - y_theirs).abs().max() / y_theirs.abs().max()).item() < 1e-4
    if threshold: assert (ours.calls, ours.columns_in_16bit) == (1, len(theirs.state.idx)) == (1, 3)


def test_llm_int8_activations_beyond_float16_go_the_16bit_way_as_in_bitsandbytes():
    # bitsandbytes casts the input to float16 (|x| > 65504 becomes inf, which is >= any threshold), so such a
    # column is an outlier and is multiplied in the input's own dtype: finite, and the same as ours
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    x = activations(16, 64, 1, outlier_cols=(5,), scale=3.0)
    x[3, 5], x[7, 40] = 1e6, -7e4  # both beyond float16's range, in two columns
    ours, theirs = LLMInt8Linear.from_linear(linear, 6.0), bnb_layer(linear, 6.0)
    with torch.no_grad(): y_ours, y_theirs = ours(x), theirs(x)
    assert torch.isfinite(y_ours).all() and sorted(theirs.state.idx.tolist()) == [5, 40]
    assert ours.columns_in_16bit == 2
    torch.testing.assert_close(y_ours, y_theirs, atol=0.03, rtol=1e-4)
    with torch.no_grad(): exact = linear(x)
    # the 16-bit columns still use the INT8 weight, so its rounding (about 0.4% here) scales with the 1e6
    assert ((y_ours - exact).abs().max() / exact.abs().max()).item() < 1e-2
    with pytest.raises(ValueError, match="beyond float16's range.*give a threshold"):
        LLMInt8Linear.from_linear(linear, None)(x)


def test_llm_int8_3d_input_and_decomposition_helps():
    torch.manual_seed(1)
    linear = nn.Linear(128, 64)
    x = activations(64, 128, 3, outlier_cols=(9,), scale=40.0).view(2, 32, 128)
    with torch.no_grad(): exact = linear(x)
    error = lambda t: (LLMInt8Linear.from_linear(linear, t)(x) - exact).norm().item()
    assert LLMInt8Linear.from_linear(linear)(x).shape == (2, 32, 64)
    assert error(6.0) < 0.5 * error(None)


# --- exact integer matmul and the W8A8 layer -----------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 20), k=st.sampled_from([1, 8, 1023, 1024, 1025, 2600]), seed=st.integers(0, 10**6),
       extreme=st.booleans())
def test_int8_matmul_is_exact(m, n, k, seed, extreme):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    if extreme: a.fill_(-128); b.fill_(-128)
    result = int8_matmul(a, b)
    assert result.dtype == torch.int32 and torch.equal(result.long(), a.long() @ b.long().T)


def test_int_mm_on_cpu_agrees():
    a, b = torch.randint(-128, 128, (32, 64), dtype=torch.int8), torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b.T), int8_matmul(a, b))


@pytest.mark.parametrize('granularity', ['token', 'tensor'])
def test_w8a8_equals_fake_quant_reference(granularity):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = activations(3 * 17, 96, 4).view(3, 17, 96)
    layer = W8A8Linear.from_linear(linear, granularity)
    codes, scale = quantize_activations(x, granularity)
    reference = (codes.double() * scale.double()) @ layer.weight().dequantize(torch.float64).T + linear.bias.double()
    out = layer(x)
    assert out.shape == (3, 17, 40)
    torch.testing.assert_close(out.reshape(-1, 40).double(), reference, rtol=1e-5, atol=1e-5)
    assert scale.shape == ((51, 1) if granularity == 'token' else (1, 1))


def test_per_token_beats_per_tensor_with_a_large_token():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(40, 64); x[0] *= 500  # one massive token
    with torch.no_grad(): exact = linear(x)
    err = {g: (W8A8Linear.from_linear(linear, g)(x)[1:] - exact[1:]).norm().item() for g in ('token', 'tensor')}
    assert err['token'] < 0.05 * err['tensor']


def test_w8a8_state_dict_round_trip():
    torch.manual_seed(0)
    layer = W8A8Linear.from_linear(nn.Linear(64, 24), 'tensor')
    restored = W8A8Linear(64, 24, bias=True, granularity='tensor')
    restored.load_state_dict(load(save(layer.state_dict())))
    x = torch.randn(5, 64)
    assert torch.equal(restored(x), layer(x))
    assert layer.weight().bits_per_weight == layer.bits_per_weight == 8 + 16 / 64
    assert LLMInt8Linear(64, 24).bits_per_weight == 8 + 32 / 64


# --- measurement and SmoothQuant -----------------------------------------------------------------

def test_input_stats_match_full_capture():
    from quantcourse.core import capture_inputs
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    names = linear_names(model)
    stats = input_stats(model, ids, names, threshold=1.0, batch_size=2, progress=False)
    with capture_inputs(model, names) as captured, torch.no_grad(): model(ids[:2]); model(ids[2:])  # the same two passes
    for name in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[name]]).abs()
        assert torch.equal(stats[name].absmax, x.amax(0)) and torch.equal(stats[name].over, (x >= 1.0).sum(0))
        assert stats[name].tokens == 60
    assert isinstance(stats[names[0]], ChannelStats) and stats[names[0]].outlier_fraction.max() <= 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), alpha=st.floats(0, 1))
def test_smooth_scales_balance(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    act, weight = torch.rand(32, generator=g) * 50 + 0.01, torch.rand(32, generator=g) + 0.01
    s = smooth_scales(act, weight, alpha)
    # after smoothing: max|X/s| = (max|X| max|W|)^(1-alpha) and max|W s| = (max|X| max|W|)^alpha
    torch.testing.assert_close(act / s, (act * weight) ** (1 - alpha), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight * s, (act * weight) ** alpha, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('down_proj', [False, True])
def test_smoothing_keeps_the_function(down_proj):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    smoothed = copy.deepcopy(model)
    factors = smooth_model(smoothed, ids, alpha=0.5, down_proj=down_proj)
    assert len(factors) == (6 if down_proj else 4)
    with torch.no_grad(): torch.testing.assert_close(smoothed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    # the smoothed attention input's channel maxima equal the smoothed weights' column maxima
    after = input_stats(smoothed, ids, ['model.layers.0.self_attn.q_proj'], progress=False)['model.layers.0.self_attn.q_proj']
    attn = smoothed.model.layers[0].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0).detach()
    torch.testing.assert_close(after.absmax, w, rtol=1e-4, atol=1e-6)
    if down_proj:  # down_proj's smoothed input maxima equal its smoothed column maxima too
        name = 'model.layers.1.mlp.down_proj'
        after = input_stats(smoothed, ids, [name], progress=False)[name]
        torch.testing.assert_close(after.absmax, smoothed.model.layers[1].mlp.down_proj.weight.abs().amax(0).detach(), rtol=1e-4, atol=1e-6)


def test_up_proj_codes_absorb_the_down_proj_fold():
    "Dividing up_proj's rows by s leaves its per-output-channel INT8 codes unchanged (but for float16 rounding of the scales) and divides the scales."
    model = tiny_llama()
    mlp = copy.deepcopy(model.model.layers[0].mlp)
    before = W8A8Linear.from_linear(mlp.up_proj)
    from quantcourse.outliers import smooth_up_down
    factors = smooth_up_down(mlp, torch.rand(128) * 10 + 0.1, 0.5)
    after = W8A8Linear.from_linear(mlp.up_proj)
    assert (before.weight_codes.int() - after.weight_codes.int()).abs().max() <= 1  # only float16 rounding of the scales differs
    assert (before.weight_codes != after.weight_codes).float().mean() < 0.05
    torch.testing.assert_close(after.weight_scale.float(), before.weight_scale.float() / factors[:, None], rtol=5e-3, atol=1e-7)


def test_smoothquant_model_runs_and_stays_close():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
        for granularity in ('token', 'tensor'):
            quantized = copy.deepcopy(model)
            quantize_model(quantized, 'smoothquant', calibration=ids, alpha=0.5, granularity=granularity, down_proj=True, progress=False)
            assert sum(isinstance(m, W8A8Linear) for m in quantized.modules()) == 14
            assert ((quantized(ids).logits - reference).norm() / reference.norm()).item() < 0.05
        int8 = copy.deepcopy(model)
        quantize_model(int8, 'llm_int8', threshold=6.0, progress=False)
        assert ((int8(ids).logits - reference).norm() / reference.norm()).item() < 0.05


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize('threshold', [0, 0.0, -1.0, float('nan')])
def test_threshold_must_be_positive(threshold):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match='threshold must be > 0'): int8_vectorwise_quant(x, threshold)
    with pytest.raises(ValueError, match='threshold=None'): LLMInt8Linear(8, 4, threshold=threshold)
    with pytest.raises(ValueError, match='threshold must be > 0'): quantize_model(tiny_llama(), 'llm_int8', threshold=threshold)
    with pytest.raises(ValueError, match='threshold must be > 0'): input_stats(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), threshold=threshold)


def test_threshold_type():
    with pytest.raises(TypeError, match='positive number or None'): int8_vectorwise_quant(torch.randn(2, 2), '6')
    with pytest.raises(TypeError, match='positive number or None'): int8_vectorwise_quant(torch.randn(2, 2), True)


@pytest.mark.parametrize('alpha', [-0.1, 1.01, float('nan'), float('inf')])
def test_alpha_must_lie_in_unit_interval(alpha):
    with pytest.raises(ValueError, match=r'alpha must lie in \[0, 1\]'): smooth_scales(torch.ones(4), torch.ones(4), alpha)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r'alpha must lie in \[0, 1\]'): smooth_model(model, torch.zeros(1, 4, dtype=torch.long), alpha)


def test_alpha_type():
    with pytest.raises(TypeError, match='alpha must be a number'): smooth_scales(torch.ones(4), torch.ones(4), '0.5')


def test_nan_activations_are_refused():
    x = torch.randn(6, 16); x[2, 3] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'): int8_vectorwise_quant(x, 6.0)
    with pytest.raises(ValueError, match='1 NaN or Inf value\\(s\\) in the activations'): quantize_activations(x)
    with pytest.raises(ValueError, match='NaN or Inf'): W8A8Linear.from_linear(nn.Linear(16, 8))(x)
    with pytest.raises(ValueError, match='NaN or Inf'): LLMInt8Linear.from_linear(nn.Linear(16, 8))(x)
    with pytest.raises(ValueError, match='in act_absmax'): smooth_scales(torch.tensor([1.0, float('nan')]), torch.ones(2))
    x[2, 3] = float('inf')
    with pytest.raises(ValueError, match='NaN or Inf'): quantize_activations(x, 'tensor')


def test_nan_inside_the_model_names_the_layer():
    model = tiny_llama()
    with torch.no_grad(): model.model.layers[1].input_layernorm.weight[3] = float('nan')
    with pytest.raises(ValueError, match=r'in the input of model\.layers\.1\.self_attn\.q_proj'):
        input_stats(model, torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_other_bad_input():
    with pytest.raises(ValueError, match='granularity must be one of'): quantize_activations(torch.randn(2, 4), 'channel')
    with pytest.raises(ValueError, match='granularity must be one of'): W8A8Linear(4, 4, granularity='row')
    with pytest.raises(TypeError, match='must be int8'): int8_matmul(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r'need a \(m, k\) and b \(n, k\)'):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match='must be a \\(rows, columns\\) matrix'): int8_vectorwise_quant(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match='must both be'): smooth_scales(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match='no list of repeated blocks'): smooth_model(nn.Sequential(nn.Linear(4, 4)), torch.zeros(1, 4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match='must agree'): smooth_norm_linears(nn.LayerNorm(8, bias=False), [nn.Linear(6, 4)], torch.ones(8))


def test_layernorm_with_bias_folds_exactly():
    "A LayerNorm's bias is divided by the factors too, so the function is unchanged."
    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(8), nn.Linear(8, 4)
    with torch.no_grad(): norm.weight.uniform_(0.5, 2); norm.bias.normal_()
    x = torch.randn(5, 8) * 3
    with torch.no_grad():
        before = linear(norm(x))
        smooth_norm_linears(norm, [linear], norm(x).abs().amax(0), alpha=0.5)
        torch.testing.assert_close(linear(norm(x)), before, rtol=1e-5, atol=1e-5)


def test_statistics_measured_once_serve_every_alpha():
    "Statistics measured with down_proj=True smooth only the norms unless down_proj=True is asked for again."
    from quantcourse.outliers import smoothing_statistics
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    statistics = smoothing_statistics(model, ids, down_proj=True)
    norms_only, both = copy.deepcopy(model), copy.deepcopy(model)
    assert len(smooth_model(norms_only, statistics, alpha=0.5)) == 4 and len(smooth_model(both, statistics, alpha=0.5, down_proj=True)) == 6
    assert torch.equal(norms_only.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(both.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    direct = copy.deepcopy(model)
    smooth_model(direct, ids, alpha=0.5)
    torch.testing.assert_close(direct.model.layers[1].input_layernorm.weight, norms_only.model.layers[1].input_layernorm.weight)
