"GPTQ: the fast version against the slow reference, activation order, damping, the course model, saving, bad input."
import copy, warnings
import pytest, torch
from hypothesis import given, settings, strategies as st
from quantcourse.core import calibration_samples, eval_tokens, linear_names
from quantcourse.scales import fake_quantize, quantize_codes, dequantize_codes, scale_zero
from quantcourse.gptq import (Hessian, GPTQLinear, damped_inverse_cholesky, gptq_quantize, naive_gptq,
                              reconstruction_error, ColumnGrid)
from quantcourse.api import quantize_model, save_quantized, load_quantized


def random_layer(rows, cols, seed=0, tokens=None, dtype=torch.float64):
    "A random weight and the Hessian of random inputs whose channels differ in energy."
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen, dtype=dtype)
    X = torch.randn(tokens or 4 * cols, cols, generator=gen, dtype=dtype) * (0.1 + 3 * torch.rand(cols, generator=gen, dtype=dtype))
    return W, Hessian(cols, dtype=dtype).add(X).value()


def test_hessian_accumulates_over_batches():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64), torch.randn(7, 6, generator=gen, dtype=torch.float64)
    H = Hessian(6, dtype=torch.float64).add(a).add(b).value()
    X = torch.cat([a.reshape(-1, 6), b])
    torch.testing.assert_close(H, 2 * X.T @ X / len(X))
    delta = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    assert reconstruction_error(delta, torch.zeros_like(delta), H) == pytest.approx(((X @ delta.T) ** 2).sum(1).mean().item())


@pytest.mark.parametrize('case', [dict(), dict(symmetric=True), dict(group_size=16), dict(group_size=24, bits=3),
                                  dict(act_order=True), dict(group_size=16, act_order=True),
                                  dict(group_size=16, act_order=True, static_groups=True), dict(group_size=48, bits=2, symmetric=True)])
def test_fast_equals_naive(case):
    W, H = random_layer(20, 96, seed=len(case))
    fast, slow = gptq_quantize(W, H, block_size=32, **case), naive_gptq(W, H, **case)
    assert torch.equal(fast.quantized.codes, slow.quantized.codes)
    torch.testing.assert_close(fast.dequantize(torch.float64), slow.dequantize(torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 4), group_len=st.sampled_from([8, 12, 20]), bits=st.integers(2, 8),
       symmetric=st.booleans(), act_order=st.booleans(), grid=st.sampled_from(['channel', 'fly', 'static']),
       block_size=st.integers(1, 50), seed=st.integers(0, 1000))
def test_fast_equals_naive_property(rows, groups, group_len, bits, symmetric, act_order, grid, block_size, seed):
    cols = groups * group_len
    W, H = random_layer(rows, cols, seed=seed)
    kw = dict(bits=bits, symmetric=symmetric, act_order=act_order, group_size='channel' if grid == 'channel' else group_len,
              static_groups=grid == 'static')
    fast, slow = gptq_quantize(W, H, block_size=block_size, **kw), naive_gptq(W, H, **kw)
    assert torch.equal(fast.quantized.codes, slow.quantized.codes)
    torch.testing.assert_close(fast.dequantize(torch.float64), slow.dequantize(torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_column_rounding_is_chapter_02s(bits, symmetric):
    W = torch.randn(50, 16, generator=torch.Generator().manual_seed(bits)) * 2
    grid, codes = ColumnGrid(W, bits, 'channel', symmetric, False, None), torch.empty(16, 50)
    scale, zero = scale_zero(W, bits, symmetric, scale_dtype=torch.float16)
    for c in range(16):
        q = grid.round(c, W.T[c:], codes[c])
        expected = quantize_codes(W[:, c:c+1], scale, zero, bits, symmetric)
        assert torch.equal(codes[c].to(expected.dtype), expected[:, 0])
        assert torch.equal(q, dequantize_codes(expected, scale, zero)[:, 0])


def test_act_order_permutation_is_undone_exactly():
    W, H = random_layer(16, 64, seed=3, dtype=torch.float32)
    perm = torch.argsort(H.diagonal(), descending=True)
    ordered = gptq_quantize(W, H, 4, 16, act_order=True)
    by_hand = gptq_quantize(W[:, perm], H[perm][:, perm], 4, 16)
    assert torch.equal(ordered.perm.long(), perm)
    assert torch.equal(ordered.dequantize()[:, perm], by_hand.dequantize())
    # a grid per row or static groups do not depend on the order: codes go back to the original order, nothing extra is stored
    per_row = gptq_quantize(W, H, 4, 'channel', act_order=True)
    assert per_row.perm is None
    assert torch.equal(per_row.dequantize()[:, perm], gptq_quantize(W[:, perm], H[perm][:, perm], 4, 'channel').dequantize())
    assert gptq_quantize(W, H, 4, 16, act_order=True, static_groups=True).perm is None


@pytest.mark.parametrize('input_scale', [0.1, 1.0, 10.0])
def test_copied_pseudocode_is_worse(input_scale):
    "Dividing by [H^-1]_ii twice and never updating the inverse loses to GPTQ, whatever the units of the inputs."
    W, H = random_layer(32, 64, seed=8, dtype=torch.float64)
    H = H * input_scale ** 2
    error = lambda Q: reconstruction_error(W, Q, H)
    gptq = error(naive_gptq(W, H).dequantize(torch.float64))
    assert error(copied_pseudocode(W, H)) > gptq


def copied_pseudocode(weight, hessian, bits=4, percdamp=.01):
    "The widely copied rendering: the inverse computed once and never updated, the update divided by [H^-1]_ii twice."
    W, H = weight.clone(), hessian.clone()
    Hinv = torch.linalg.inv(H + percdamp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype))
    scale, zero = scale_zero(W, bits, symmetric=False, scale_dtype=torch.float16)
    for i in range(W.shape[1]):
        q = dequantize_codes(quantize_codes(W[:, i:i+1], scale, zero, bits, False), scale, zero)[:, 0].to(W.dtype)
        error = (W[:, i] - q) / Hinv[i, i]
        W[:, i+1:] -= torch.outer(error, Hinv[i, i+1:]) / Hinv[i, i]
        W[:, i] = q
    return W


def test_stacked_layers_equal_separate_layers():
    W, H = random_layer(30, 48, seed=4, dtype=torch.float32)
    stacked = gptq_quantize(W, H, 4, 16, act_order=True).split_rows([10, 20])
    for part, rows in zip(stacked, (W[:10], W[10:])):
        alone = gptq_quantize(rows, H, 4, 16, act_order=True)
        assert torch.equal(part.quantized.codes, alone.quantized.codes)
        assert torch.equal(part.dequantize(), alone.dequantize())


def test_not_positive_definite_gets_more_damping():
    with pytest.warns(RuntimeWarning, match='my.layer: the Hessian is not positive definite'):
        # eigenvalues 4 and -2: damping 0.01, 0.1 and 1 leave it indefinite, 10 makes it definite
        # ([[1, 2], [2, 1]] would land exactly on a singular matrix at damping 1, where float32
        # rounding, which differs between CPUs, decides)
        U, damp = damped_inverse_cholesky(torch.tensor([[1., 3.], [3., 1.]]), name='my.layer')
    assert torch.isfinite(U).all()
    assert damp == pytest.approx(10.0)
    # a rank-deficient Hessian (fewer tokens than inputs) with no damping at all
    W, H = random_layer(8, 64, seed=5, tokens=10, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        q = gptq_quantize(W, H, 4, 16, percdamp=0., name='rank.deficient')
    assert all('rank.deficient' in str(w.message) for w in caught)
    assert torch.isfinite(q.dequantize()).all() and q.damping > 0


def test_dead_inputs():
    W, H = random_layer(8, 32, seed=6, dtype=torch.float32)
    H[5, :] = 0; H[:, 5] = 0
    q = gptq_quantize(W, H, 4, 16, act_order=True)
    assert torch.isfinite(q.dequantize()).all()
    assert (q.dequantize()[:, 5] == 0).all()


def test_bad_input():
    W, H = random_layer(8, 64, seed=7, dtype=torch.float32)
    for bits in (1, 9):
        with pytest.raises(ValueError, match='bits must be from 2 to 8'): gptq_quantize(W, H, bits=bits)
    with pytest.raises(TypeError, match='bits must be an int'): gptq_quantize(W, H, bits=4.0)
    with pytest.raises(ValueError, match='does not divide in_features=64'): gptq_quantize(W, H, group_size=48)
    with pytest.raises(ValueError, match='hessian must be in_features x in_features'): gptq_quantize(W, H[:32, :32])
    with pytest.raises(ValueError, match='needs an int group_size'): gptq_quantize(W, H, static_groups=True)
    with pytest.raises(ValueError, match='NaN or Inf'): gptq_quantize(W, H * float('nan'))
    with pytest.raises(ValueError, match='in_features=64'): Hessian(64).add(torch.randn(3, 65))
    with pytest.raises(ValueError, match='calibration set is empty'): Hessian(64).value()
    with pytest.raises(ValueError, match='NaN or Inf'): Hessian(64).add(torch.full((2, 64), float('inf')))


@pytest.fixture(scope='module')
def two_blocks(course_model):
    "The course model cut to its first two blocks (the chapter runs all 30; here time is short)."
    model = copy.deepcopy(course_model[0])
    model.model.layers = model.model.layers[:2]
    return model


@pytest.fixture(scope='module')
def gptq_course_model(two_blocks, course_model):
    "Two blocks of the course model quantized by GPTQ (4 bits, groups of 64, activation order) on a little calibration text, and its report."
    quantized = copy.deepcopy(two_blocks)
    calibration = calibration_samples(course_model[1], 4, 128, seed=1)
    report = quantize_model(quantized, 'gptq', calibration=calibration, bits=4, group_size=64, act_order=True, progress=False)
    return quantized, report.rows


def test_beats_rtn_on_every_layer_of_the_course_model(gptq_course_model, two_blocks):
    quantized, report = gptq_course_model
    assert [r['layer'] for r in report] == linear_names(two_blocks)
    worse = [r['layer'] for r in report if not r['error'] < r['rtn_error']]
    assert not worse, f"GPTQ is not below round-to-nearest on {worse}"
    assert sum(isinstance(m, GPTQLinear) for m in quantized.modules()) == 14


def test_save_and_reload_bit_identical(gptq_course_model, two_blocks, course_model, tmp_path):
    quantized, _ = gptq_course_model
    model, tokenizer = two_blocks, course_model[1]
    path = save_quantized(quantized, tmp_path/'gptq.safetensors')
    reloaded = load_quantized(path, copy.deepcopy(model))
    ids = eval_tokens(tokenizer, 32)[None]
    with torch.no_grad(): assert torch.equal(reloaded(ids).logits, quantized(ids).logits)
    layer = reloaded.get_submodule('model.layers.1.mlp.down_proj')
    assert layer.perm is not None and layer.perm.dtype == torch.int16
    with pytest.raises(ValueError, match='no quantized layers'): save_quantized(model, tmp_path/'none.safetensors')


def test_model_level_bad_input(two_blocks, course_model):
    model, tokenizer = two_blocks, course_model[1]
    calibration = calibration_samples(tokenizer, 2, 8)
    gptq = lambda calibration, **settings: quantize_model(copy.deepcopy(model), 'gptq', calibration=calibration, progress=False, **settings)
    with pytest.raises(ValueError, match='calibration set is empty'): gptq(calibration[:0])
    with pytest.raises(TypeError, match='integer tensor of token ids'): gptq(calibration.float())
    with pytest.raises(ValueError, match='does not divide in_features=576'): gptq(calibration, group_size=100)
    with pytest.raises(ValueError, match='bits must be from 2 to 8'): gptq(calibration, bits=9)
    with pytest.raises(ValueError, match='GPTQ needs the Hessian'): GPTQLinear.from_linear(torch.nn.Linear(64, 8))
