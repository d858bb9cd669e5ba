"Chapter 11: HQQ (against PyPI hqq where its source is present), Hadamard rotations, MXFP4 (against gguf, byte for byte) and NVFP4."
import math, sys, types
from pathlib import Path
import numpy as np
import pytest, torch
from torch import nn
from quantcourse.below4 import *
from quantcourse.scales import quantize_weight
from quantcourse.formats import decode, FP8_E4M3

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ['model.layers.0.self_attn.k_proj.weight', 'model.layers.7.self_attn.o_proj.weight',
          'model.layers.15.mlp.down_proj.weight', 'model.layers.29.mlp.up_proj.weight']

@pytest.fixture(scope='module')
def weights(course_model):
    model, _ = course_model
    state = model.state_dict()
    return {k: state[k].detach().float() for k in LAYERS}

# ---------------------------------------------------------------- HQQ
def test_shrink_lp_is_the_soft_threshold_at_p1_and_safe_at_zero():
    x = torch.linspace(-1, 1, 101)
    torch.testing.assert_close(shrink_lp(x, 10.0, 1.0), torch.sign(x) * torch.relu(x.abs() - 0.1))
    assert torch.equal(shrink_lp(torch.zeros(5), 10.0, 0.5), torch.zeros(5))
    assert torch.isfinite(shrink_lp(torch.tensor([0.0, 1e-30, -1e-30]), 10.0, 0.7)).all()

def test_zero_update_is_the_least_squares_zero():
    "Step 2 of the solver: with the codes and W_e fixed, the mean is the argmin of the quadratic."
    g = torch.randn(8, 64); s, z = minmax_init(g, 3)
    q, e = torch.round(g * s + z).clamp(0, 7), 0.01 * torch.randn(8, 64)
    z1 = (q - (g - e) * s).mean(-1, keepdim=True)
    for dz in (-1e-2, 1e-2):
        loss = lambda z: ((q - z) / s - (g - e)).pow(2).sum(-1)
        assert (loss(z1) <= loss(z1 + dz)).all()

@pytest.mark.parametrize('bits', [4, 3, 2])
def test_hqq_lowers_the_lp_error_of_minmax(bits):
    g = torch.distributions.StudentT(3.0).sample((512, 64))
    s, z0 = minmax_init(g, bits)
    deq = lambda z: (torch.round(g * s + z).clamp(0, 2**bits - 1) - z) / s
    lp = lambda z: (g - deq(z)).abs().pow(0.7).sum()
    assert lp(hqq_zero(g, s, z0, bits)) < lp(z0)

@pytest.mark.parametrize('bits', [4, 3, 2])
def test_hqq_lowers_the_lp_error_of_its_start_on_course_weights(weights, bits):
    "Against its own min/max start (iters=0): round-to-nearest's grid is another (it keeps 0 and an integer zero)."
    for name, W in weights.items():
        h, m = hqq_quantize(W, bits, 64), hqq_quantize(W, bits, 64, iters=0)
        lp = lambda q: (q.dequantize() - W).abs().pow(0.7).sum()
        assert lp(h) < lp(m), name
        assert h.bits_per_weight == bits + 32 / 64

def test_hqq_weight_round_trips_through_its_tensors():
    q = hqq_quantize(torch.randn(24, 128), 3, 64)
    again = HQQWeight.from_tensors(q.tensors(), q.config())
    assert torch.equal(again.codes, q.codes) and torch.equal(again.dequantize(), q.dequantize())

def test_hqq_bad_input():
    W = torch.randn(8, 128)
    with pytest.raises(ValueError, match='bits must be from 2 to 8'): hqq_quantize(W, bits=1)
    with pytest.raises(ValueError, match='bits must be from 2 to 8'): HQQLinear(128, 8, bits=9)
    with pytest.raises(TypeError, match='bits must be an int'): hqq_quantize(W, bits=2.5)
    for p in (0, -0.5, 1.01):
        with pytest.raises(ValueError, match=r'p must lie in \(0, 1\]'): hqq_quantize(W, p=p)
    with pytest.raises(TypeError, match='p must be a number'): hqq_quantize(W, p='0.7')
    with pytest.raises(ValueError, match='does not divide'): hqq_quantize(W, group_size=96)
    with pytest.raises(TypeError, match='group_size must be an int'): HQQLinear(128, 8, group_size='channel')
    with pytest.raises(ValueError, match='does not fit in torch.float16'): hqq_quantize(W * 1e30)

HQQ_SOURCE = sorted((ROOT/'peers'/'hqq'/'src').glob('hqq-*/hqq/core/quantize.py'))

@pytest.fixture(scope='module')
def peer_quantizer():
    "PyPI hqq's Quantizer, read from its sdist under peers/ (pip download hqq==0.2.5 --no-deps); skip without it."
    if not HQQ_SOURCE: pytest.skip('hqq source not in peers/hqq/src (pip download hqq==0.2.5 --no-deps --no-binary :all:)')
    if 'termcolor' not in sys.modules:  # hqq imports it only to colour its warnings
        try: import termcolor  # noqa: F401
        except ImportError:
            stub = types.ModuleType('termcolor'); stub.colored = lambda text, *a, **k: text
            sys.modules['termcolor'] = stub
    sys.path.insert(0, str(HQQ_SOURCE[-1].parent.parent.parent))
    try: from hqq.core.quantize import Quantizer
    except ImportError as e: pytest.skip(f'hqq does not import here: {e}')
    finally: sys.path.pop(0)
    return Quantizer

@pytest.mark.parametrize('bits', [4, 3, 2])
def test_same_codes_as_pypi_hqq(weights, peer_quantizer, bits):
    "Same codes, code for code; steps and zero-points equal hqq's float32 ones to our float16 storage."
    for name, W in weights.items():
        codes, meta = peer_quantizer.quantize(W, nbits=bits, group_size=64, optimize=True, axis=1,
                                              bitpack=False, device='cpu')
        ours = hqq_quantize(W, bits, 64)
        assert torch.equal(ours.codes.reshape(-1, 64).float(), codes), name
        torch.testing.assert_close(ours.scale.reshape(-1, 1), meta['scale'].half(), rtol=0, atol=0)
        torch.testing.assert_close(ours.zero.reshape(-1, 1), meta['zero'].half(), rtol=0, atol=0)

# ---------------------------------------------------------------- Hadamard
@pytest.mark.parametrize('n', [1, 2, 4, 16, 64, 256, 1024])
def test_fwht_is_the_sylvester_matrix(n):
    x = torch.randn(3, 7, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ sylvester(n).double())

def test_sylvester_is_orthogonal_up_to_n():
    H = sylvester(128)
    assert torch.equal(H @ H.T, 128 * torch.eye(128)) and set(H.unique().tolist()) == {-1.0, 1.0}

@pytest.mark.parametrize('n', [3, 12, 576, 1536])
def test_non_power_of_two_sizes_are_refused(n):
    with pytest.raises(ValueError, match='power-of-two length'): fwht(torch.randn(2, n))
    with pytest.raises(ValueError, match='power of two'): sylvester(n)
    assert is_power_of_two(hadamard_block(n)) and n % hadamard_block(n) == 0

def test_rotation_block_must_divide():
    with pytest.raises(ValueError, match='must divide'): rotate(torch.randn(2, 96), random_signs(96), 64)

@pytest.mark.parametrize('shape', [(576, 576), (192, 576), (1536, 576), (576, 1536), (48, 128)])
def test_incoherence_is_orthogonal_and_undone(shape):
    W = torch.randn(shape, dtype=torch.float64)
    o, i = random_signs(shape[0], 0), random_signs(shape[1], 1)
    R = incoherent(W, o, i)
    torch.testing.assert_close(R.norm(), W.norm())
    torch.testing.assert_close(coherent(R, o, i), W)
    x = torch.randn(5, shape[1], dtype=torch.float64)  # W x = R_out^T W' R_in x
    torch.testing.assert_close(x @ W.T, unrotate(rotate(x, i, hadamard_block(shape[1])) @ R.T, o, hadamard_block(shape[0])))

def test_rotation_removes_outliers(weights):
    for W in weights.values():
        R = incoherent(W, random_signs(W.shape[0]), random_signs(W.shape[1], 1))
        assert abs(kurtosis(R) - 3) < abs(kurtosis(W) - 3) + 0.05
        assert R.abs().max() / R.pow(2).mean().sqrt() <= W.abs().max() / W.pow(2).mean().sqrt()

def test_kurtosis_of_known_distributions():
    assert abs(kurtosis(torch.randn(1_000_000)) - 3) < 0.05
    assert abs(kurtosis(torch.rand(1_000_000)) - 1.8) < 0.02

def test_rotated_layer_bad_input():
    with pytest.raises(ValueError, match='base must be one of'): RotatedLinear(64, 8, base='awq')
    with pytest.raises(ValueError, match='bits must be from 2 to 8'): RotatedLinear(64, 8, bits=1)

def test_gptq_rot_rotated_hessian_and_error():
    "gptq_rot: R H R^T is the rotated inputs' Hessian; GPTQ there beats RTN there on the output; bad input refused."
    from quantcourse.below4 import incoherent, rotate, hadamard_block
    from quantcourse.gptq import Hessian
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(192, 48, bias=True)
    x = torch.randn(1024, 192, generator=gen) * torch.linspace(0.1, 4, 192)
    H = Hessian(192).add(x).value()
    layer = RotatedLinear.from_linear(linear, 'gptq', 3, hessian=H)
    rotated_x = rotate(x, layer.in_signs, hadamard_block(192))
    torch.testing.assert_close(incoherent(H, layer.in_signs, layer.in_signs), Hessian(192).add(rotated_x).value(),
                               rtol=1e-4, atol=1e-4)
    error = lambda l: ((l(x) - linear(x)).norm() / linear(x).norm()).item()
    with torch.no_grad(): assert error(layer) < error(RotatedLinear.from_linear(linear, 'rtn', 3))
    with pytest.raises(ValueError, match='needs the Hessian'): RotatedLinear.from_linear(linear, 'gptq', 3)
    with pytest.raises(ValueError, match='static_groups=True'):
        RotatedLinear.from_linear(linear, 'gptq', 3, hessian=H, static_groups=False)

# ---------------------------------------------------------------- MXFP4 and NVFP4
def _gguf_mxfp4(W):
    from gguf.quants import quantize
    from gguf.constants import GGMLQuantizationType
    return torch.from_numpy(quantize(W.numpy(), GGMLQuantizationType.MXFP4)).reshape(-1, 17)

def test_mxfp4_bytes_equal_gguf_on_course_weights(weights):
    for name, W in weights.items(): assert torch.equal(mxfp4_blocks(W), _gguf_mxfp4(W)), name

def test_mxfp4_bytes_equal_gguf_on_ties_zeros_and_saturation():
    g = torch.Generator().manual_seed(0)
    exact = E2M1_VALUES[torch.randint(0, 16, (64, 32), generator=g)]
    ties = (exact[:, :-1] + exact[:, 1:]) / 2  # midpoints between levels, scaled by powers of two
    W = torch.cat([exact, torch.cat([ties, ties[:, :1]], 1), torch.randn(64, 32, generator=g)], 0)
    W = W * torch.exp2(torch.randint(-20, 4, (W.shape[0], 1), generator=g).float())
    W[0] = 0; W[1, 3] = -0.0
    assert torch.equal(mxfp4_blocks(W), _gguf_mxfp4(W))
    assert not torch.equal(mxfp4_blocks(W, ties='even'), _gguf_mxfp4(W))

def test_mxfp4_dequantizes_as_gguf(weights):
    from gguf.quants import dequantize
    from gguf.constants import GGMLQuantizationType
    W = weights[LAYERS[1]]
    q = MXFP4Weight(mxfp4_blocks(W), tuple(W.shape))
    theirs = dequantize(q.blocks.numpy().reshape(W.shape[0], -1), GGMLQuantizationType.MXFP4)
    assert torch.equal(q.dequantize(), torch.from_numpy(theirs).reshape(W.shape))
    assert q.bits_per_weight == 4.25

def test_e8m0_exponent_is_floor_log2_minus_2():
    a = torch.tensor([1.0, 1.5, 6.0, 7.99, 8.0, 0.001, 0.0])
    expected = [-2, -2, 0, 0, 1, math.floor(math.log2(0.001)) - 2]
    assert e8m0_exponent(a)[:-1].long().sub(127).tolist() == expected and e8m0_exponent(a)[-1] == 0

def test_nvfp4_definition_and_bits(weights):
    for W in weights.values():
        q = nvfp4_quantize(W)
        blocks = W.reshape(-1, 16)
        assert torch.isclose(q.tensor_scale, W.abs().max() / (6 * 448)).all()
        scales = decode(q.block_scale, FP8_E4M3).float() * q.tensor_scale
        assert ((blocks.abs().amax(1) / 6 - scales).abs() <= scales * 2**-4 + 1e-12).all()  # E4M3: 3 mantissa bits
        mx = MXFP4Weight(mxfp4_blocks(W), tuple(W.shape))
        assert (q.dequantize() - W).norm() < (mx.dequantize() - W).norm()
        assert q.bits_per_weight == 4.5 + 32 / W.numel()

def test_fp4_bad_input():
    with pytest.raises(ValueError, match='multiple of the block size 32'): mxfp4_blocks(torch.randn(4, 48))
    with pytest.raises(ValueError, match='multiple of 16'): FP4Linear(40, 8, 'nvfp4')
    with pytest.raises(ValueError, match='fmt must be one of'): FP4Linear(64, 8, 'mxfp6')
    with pytest.raises(ValueError, match='ties must be one of'): e2m1_codes(torch.ones(3), 'nearest')


# --- QuaRot's folded rotations of the residual stream -----------------------------------------------
sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build, calibration  # noqa: E402


@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'mistral'])
@pytest.mark.parametrize('tied', [False, True])
def test_rotate_residual_keeps_the_logits(arch, tied):
    "Norms fused, residual stream and value heads rotated: the same logits, other weights, untied head."
    import copy
    model = build(arch)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    ids = calibration(2, 16)
    with torch.no_grad(): before = model(ids).logits
    rotated = rotate_residual(copy.deepcopy(model), seed=5)
    with torch.no_grad(): after = rotated(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert rotated.lm_head.weight is not rotated.get_input_embeddings().weight
    layer = rotated.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not torch.allclose(layer.self_attn.v_proj.weight, model.model.layers[0].self_attn.v_proj.weight)


def test_fuse_norms_alone_keeps_the_logits():
    import copy
    model = build('llama'); ids = calibration(2, 16)
    with torch.no_grad(): torch.testing.assert_close(fuse_norms(copy.deepcopy(model))(ids).logits,
                                                     model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('arch', ['gemma3', 'phi3', 'opt', 'gpt_neox'])
def test_rotate_residual_refuses_other_architectures(arch):
    "Gemma's 1 + weight norms and extra norms, fused projections, LayerNorms: a clear error, nothing changed."
    model = build(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match='rotate_residual needs a Llama-style decoder'):
        rotate_residual(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_is_plain_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(8); norm.weight.data.uniform_(0.5, 2)
    assert is_plain_rms_norm(norm)
    assert not is_plain_rms_norm(nn.LayerNorm(8))
    with pytest.raises(ValueError, match='seed'): rotate_residual(build('llama'), seed=-1)


# --- W4A4 -------------------------------------------------------------------------------------------
def test_w4a4_is_its_definition():
    "Each token's input and each weight row rounded symmetric to 4 bits, then a float product."
    import torch.nn.functional as F
    from quantcourse.scales import fake_quantize
    torch.manual_seed(0)
    linear = nn.Linear(128, 16); x = torch.randn(3, 5, 128)
    expected = F.linear(fake_quantize(x.reshape(-1, 128), 4, 'channel', True),
                        fake_quantize(linear.weight.detach(), 4, 'channel', True), linear.bias)
    torch.testing.assert_close(W4A4Linear.from_linear(linear)(x), expected.reshape(3, 5, 16),
                               rtol=1e-5, atol=1e-5)


def test_w4a4_online_rotation_computes_the_same_product_before_rounding():
    "With rotate_input, (xR)(WR)^T = xW^T: at 8 bits both layers are within rounding of the float one."
    torch.manual_seed(1)
    linear = nn.Linear(192, 24); x = torch.randn(7, 192)
    x[:, 5] *= 50  # an outlier channel: per-token 4-bit rounding suffers, the rotation spreads it
    errors = {}
    for rotate_input in (False, True):
        layer = W4A4Linear.from_linear(linear, bits=8, act_bits=4, rotate_input=rotate_input)
        errors[rotate_input] = ((layer(x) - linear(x)).norm() / linear(x).norm()).item()
    assert errors[True] < errors[False] / 2, errors
    exact = W4A4Linear.from_linear(linear, bits=8, act_bits=8, rotate_input=True)
    torch.testing.assert_close(exact(x), linear(x), rtol=0.02, atol=0.02 * linear(x).abs().max().item())


def test_w4a4_bad_settings():
    with pytest.raises(ValueError, match='act_bits'): W4A4Linear(8, 4, act_bits=9)
    with pytest.raises(TypeError, match='rotate_input'): W4A4Linear(8, 4, rotate_input=1)
    with pytest.raises(ValueError, match='seed'): W4A4Linear(8, 4, seed=-2)
