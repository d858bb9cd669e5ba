"Tests for quantcourse.scales: properties (hypothesis), parity with torch's quantized tensors, packing, bad input."
import math, warnings
import pytest, torch
from torch import nn
import numpy as np
from hypothesis import given, settings, assume, strategies as st, HealthCheck
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file, load_file
from quantcourse.core import model_size_bytes
from quantcourse.scales import (qrange, scale_zero, quantize_codes, dequantize_codes, QuantizedWeight, quantize_weight,
    fake_quantize, pack, unpack, bits_per_weight, QuantLinear, Arch, ARCHS, FORMATS,
    arch_from_config, memory_estimate, NF4_DQ_BITS, q4_k_m_type)

BITS = st.integers(2, 8)
GRANULARITY = st.sampled_from(['tensor', 'channel', 4, 8, 16])

@st.composite
def weights(draw, max_rows=4, groups=(1, 3), magnitudes=(1e-6, 1e-2, 1.0, 1e3)):
    "A float32 (rows, 16*k) tensor of finite values at one of several magnitudes."
    shape = (draw(st.integers(1, max_rows)), 16 * draw(st.integers(*groups)))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    return torch.from_numpy(values) * draw(st.sampled_from(magnitudes))

def _torch_codes(weight, scale, zero, symmetric, per_channel):
    dtype = torch.qint8 if symmetric else torch.quint8
    zero = torch.zeros_like(scale) if zero is None else zero
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if per_channel: q = torch.quantize_per_channel(weight, scale.flatten().double(), zero.flatten().long(), 0, dtype)
        else: q = torch.quantize_per_tensor(weight, scale.item(), int(zero.item()), dtype)
    return q.int_repr()

# --- properties -------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights(), BITS, st.booleans())
def test_in_range_values_come_back_within_half_a_step(w, bits, symmetric):
    scale, zero = scale_zero(w, bits, symmetric)
    restored = dequantize_codes(quantize_codes(w, scale, zero, bits, symmetric), scale, zero)
    assert ((restored - w).abs() <= scale * (0.5 + 1e-4)).all()

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights(), BITS, GRANULARITY, st.booleans())
def test_stored_weight_within_half_a_step(w, bits, group_size, symmetric):
    "With float16 scales (rounded up) every weight still lies within half a step of its level."
    q = quantize_weight(w, bits, group_size, symmetric)
    restored = q.dequantize()
    groups = {'tensor': w.numel(), 'channel': w.shape[1]}.get(group_size, group_size)
    step = q.scale.float().flatten().repeat_interleave(groups).view(w.shape)
    assert torch.isfinite(restored).all() and restored.shape == w.shape
    assert ((restored - w).abs() <= step * (0.5 + 1e-4)).all()

@settings(max_examples=100, deadline=None)
@given(weights(), BITS, st.booleans())
def test_requantizing_dequantized_values_gives_same_codes(w, bits, symmetric):
    scale, zero = scale_zero(w, bits, symmetric)
    codes = quantize_codes(w, scale, zero, bits, symmetric)
    assert torch.equal(quantize_codes(dequantize_codes(codes, scale, zero), scale, zero, bits, symmetric), codes)

@settings(max_examples=40, deadline=None)
@given(weights(magnitudes=(1e-2, 1.0, 1e3)), BITS, GRANULARITY)
def test_symmetric_fake_quantize_is_idempotent(w, bits, group_size):
    "Holds while float16 scales are normal numbers (below ~6e-5 their precision is too coarse to come back)."
    assume(w.abs().amax() > 1e-3)
    once = fake_quantize(w, bits, group_size)
    assume(quantize_weight(once, bits, group_size).scale.float().min() > torch.finfo(torch.float16).smallest_normal)
    assert torch.equal(fake_quantize(once, bits, group_size), once)

@settings(max_examples=150, deadline=None)
@given(BITS, st.integers(0, 70), st.booleans(), st.integers(0, 2**31))
def test_pack_unpack_exact_for_every_width(bits, numel, signed, seed):
    gen = torch.Generator().manual_seed(seed)
    low, high = qrange(bits, symmetric=signed)
    codes = torch.randint(low, high + 1, (numel,), generator=gen).to(torch.int8 if signed else torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8) * bits
    assert torch.equal(unpack(packed, bits, numel, signed=signed), codes)

def test_pack_layout():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21, 0, 0, 0]            # low nibble first
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011, 0]      # 2 bits, low pair first
    assert pack(torch.arange(8), 3).tolist() == [0b10001000, 0b11000110, 0b11111010]  # 8 codes in 3 bytes
    assert pack(torch.tensor([-1]), 4).tolist() == [0x0F, 0, 0, 0]             # two's complement

def test_symmetric_never_uses_most_negative_code():
    w = torch.randn(64, 256)
    for bits in range(2, 9):
        assert quantize_weight(w, bits, 32).codes.min() > qrange(bits, True)[0]

# --- parity with torch's quantized tensors (8 bits, same scale and zero-point) -------------------------

@settings(max_examples=40, deadline=None)
@given(weights(max_rows=8), st.booleans())
def test_per_channel_codes_equal_torch(w, symmetric):
    "torch's quantize kernels multiply by 1/scale: defined (and equal across its AVX-512/AVX2/plain paths) for normal scales."
    scale, zero = scale_zero(w, 8, symmetric)
    assume(scale.min() >= torch.finfo(torch.float32).smallest_normal)
    assert torch.equal(quantize_codes(w, scale, zero, 8, symmetric), _torch_codes(w, scale, zero, symmetric, True))

@settings(max_examples=40, deadline=None)
@given(weights(max_rows=8))
def test_per_tensor_symmetric_codes_equal_torch(w):
    "As above; with a subnormal scale 1/scale is infinite and torch's kernels disagree with each other (see the next test)."
    scale, _ = scale_zero(w.flatten(), 8, True)
    assume(scale.min() >= torch.finfo(torch.float32).smallest_normal)
    assert torch.equal(quantize_codes(w, scale, None, 8, True), _torch_codes(w, scale, None, True, False))

@pytest.mark.parametrize('magnitude', [1e-40, 1e-44, torch.finfo(torch.float32).smallest_normal])
@pytest.mark.parametrize('symmetric', [True, False])
def test_subnormal_scales_quantize_by_definition(magnitude, symmetric):
    "Weights so small that the scale is subnormal: codes round(w / scale + zero), no NaN, no overflow of 1/scale."
    w = torch.tensor([[magnitude, -magnitude / 2, 0.0, magnitude / 4] * 4])
    scale, zero = scale_zero(w, 8, symmetric)
    codes = quantize_codes(w, scale, zero, 8, symmetric)
    expected = torch.round(w.double() / scale.double() + (0 if zero is None else zero.double())).clamp(*qrange(8, symmetric))
    assert torch.equal(codes.double(), expected)
    assert torch.isfinite(dequantize_codes(codes, scale, zero)).all()

def test_per_tensor_asymmetric_codes_equal_torch_except_at_ties():
    "torch's vectorised per-tensor kernel fuses the multiply-add; the codes may differ only where w/s + z is a tie."
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.05 + 0.01
    scale, zero = scale_zero(w.flatten(), 8, False)
    ours, theirs = quantize_codes(w, scale, zero, 8, False).int(), _torch_codes(w, scale, zero, False, False).int()
    x = w * (1 / scale) + zero
    ties = (x - x.floor() - 0.5).abs() < 1e-4
    assert ((ours != theirs) & ~ties).sum() == 0 and (ours - theirs).abs().max() <= 1

def test_real_layer_matches_torch(course_model):
    model, _ = course_model
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    for symmetric in (True, False):
        scale, zero = scale_zero(w, 8, symmetric)
        assert torch.equal(quantize_codes(w, scale, zero, 8, symmetric), _torch_codes(w, scale, zero, symmetric, True))

# --- conventions and storage ---------------------------------------------------------------------------

def test_conventions():
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15) and qrange(8, True) == (-128, 127)
    scale, zero = scale_zero(torch.tensor([[-2.0, 1.0]]), 4, True)
    assert torch.allclose(scale, torch.tensor([[2 / 7]])) and zero is None
    scale, zero = scale_zero(torch.tensor([[0.5, 1.0]]), 4, False)   # range widened to include 0
    assert torch.allclose(scale, torch.tensor([[1 / 15]])) and zero.item() == 0
    assert quantize_codes(torch.tensor([0.5, 1.5, 2.5]), torch.tensor(1.0), None, 4, True).tolist() == [0, 2, 2]  # half to even

def test_bits_per_weight():
    assert bits_per_weight(4, 32, 4096) == 4.5
    assert bits_per_weight(4, 128, 4096, zero_bits=4) == 4 + 20 / 128
    assert quantize_weight(torch.randn(8, 64), 4, 32, symmetric=False).bits_per_weight == 4 + 20 / 32
    assert quantize_weight(torch.randn(8, 64), 4, 'tensor').bits_per_weight == 4 + 16 / 512
    with pytest.raises(ValueError, match='out_features'): bits_per_weight(4, 'tensor', 64)

def test_quantized_weight_shapes_and_dtypes():
    q = quantize_weight(torch.randn(6, 64), 3, 16, symmetric=False)
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float16 and q.zero.dtype == torch.uint8
    assert q.scale.shape == q.zero.shape == (6, 4) and q.shape == (6, 64)
    assert fake_quantize(torch.randn(6, 64).bfloat16()).dtype == torch.bfloat16

def test_quantlinear_matches_fake_quantized_linear_and_round_trips_safetensors(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(96, 10)
    x = torch.randn(3, 7, 96)
    for bits, group_size, symmetric in [(4, 32, True), (3, 'channel', False), (2, 'tensor', True), (8, 48, False)]:
        layer = QuantLinear.from_linear(linear, bits, group_size, symmetric)
        expected = nn.functional.linear(x, fake_quantize(linear.weight.detach(), bits, group_size, symmetric), linear.bias)
        assert torch.allclose(layer(x), expected, atol=1e-5)
        save_file(layer.state_dict(), tmp_path/'layer.safetensors')
        again = QuantLinear(96, 10, bits, group_size, symmetric, bias=True)
        again.load_state_dict(load_file(tmp_path/'layer.safetensors'))
        assert torch.equal(again(x), layer(x))
        stored = 8 * (model_size_bytes(layer) - 10 * 4)   # minus the float32 bias
        assert abs(stored / linear.weight.numel() - layer.weight().bits_per_weight) < 0.1


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('bits', [0, 1, 9, 16, -4])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match='bits must be from 2 to 8'): quantize_weight(torch.randn(2, 8), bits)
    with pytest.raises(ValueError, match='bits must be from 2 to 8'): pack(torch.zeros(8, dtype=torch.uint8), bits)

@pytest.mark.parametrize('bits', [4.0, '4', True, None])
def test_bits_not_an_int(bits):
    with pytest.raises(TypeError, match='bits must be an int'): scale_zero(torch.randn(2, 8), bits)

def test_group_size_must_divide_the_row():
    with pytest.raises(ValueError, match='group_size=128 does not divide in_features=576'): quantize_weight(torch.randn(2, 576), 4, 128)
    with pytest.raises(ValueError, match='group_size=0'): quantize_weight(torch.randn(2, 8), 4, 0)
    with pytest.raises(TypeError, match='group_size must be'): quantize_weight(torch.randn(2, 8), 4, 'row')
    with pytest.raises(ValueError, match='group_size=100'): QuantLinear(576, 4, 4, 100)

@pytest.mark.parametrize('dtype', [torch.int32, torch.int8, torch.bool, torch.uint8])
def test_non_floating_weight(dtype):
    with pytest.raises(TypeError, match='weight must be a floating-point tensor'): quantize_weight(torch.ones(2, 8, dtype=dtype))
    with pytest.raises(TypeError, match='weight must be a floating-point tensor'): scale_zero(torch.ones(2, 8, dtype=dtype), 4)

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_nan_or_inf_weight(bad):
    w = torch.randn(3, 16); w[1, 5] = bad
    with pytest.raises(ValueError, match='weight holds 1 NaN or Inf'): quantize_weight(w)
    with pytest.raises(ValueError, match='NaN or Inf'): fake_quantize(w, 4, 8, False)

def test_empty_and_not_a_tensor():
    with pytest.raises(ValueError, match='non-empty'): quantize_weight(torch.empty(0, 16))
    with pytest.raises(TypeError, match='weight must be a torch.Tensor'): quantize_weight([[1.0, 2.0]])

def test_pack_bad_input():
    with pytest.raises(ValueError, match='fit in bits=3'): pack(torch.tensor([8]), 3)
    with pytest.raises(TypeError, match='codes must be an integer tensor'): pack(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match='packed must be a uint8'): unpack(torch.zeros(4, dtype=torch.int8), 4, 8)
    with pytest.raises(ValueError, match='need 3'): unpack(torch.zeros(4, dtype=torch.uint8), 3, 8)

@pytest.mark.parametrize('group_size', ['tensor', 'channel', 16])
@pytest.mark.parametrize('symmetric', [True, False])
def test_all_zero_groups_quantize_to_zeros(group_size, symmetric):
    w = torch.randn(4, 64); w[:, :16] = 0; w[2] = 0
    restored = fake_quantize(w, 4, group_size, symmetric)
    assert torch.isfinite(restored).all()
    assert (restored[2] == 0).all() and (restored[:, :16] == 0).all()
    assert torch.equal(fake_quantize(torch.zeros(2, 16), 2, group_size, symmetric), torch.zeros(2, 16))

def test_tiny_and_huge_weights():
    assert torch.isfinite(fake_quantize(torch.full((2, 8), 1e-30))).all()    # scale never rounds to 0 in float16
    with pytest.raises(ValueError, match='does not fit in torch.float16'): quantize_weight(torch.full((2, 8), 1e9))

# --- the memory calculator ---------------------------------------------------------------------------

def test_param_counts_and_kv_cache():
    assert ARCHS['Llama-3 8B'].n_params == 8_030_261_248
    assert ARCHS['Mistral 7B'].n_params == 7_241_732_096
    assert ARCHS['Llama-3 70B'].n_params == 70_553_706_496
    est = memory_estimate('Llama-3 8B', 'FP16', 8192, batch=2)
    assert est['kv_cache'] == 2 * 2**30 and est['weights'] == pytest.approx(2 * 8_030_261_248, rel=1e-4)
    assert est['total'] == est['weights'] + est['kv_cache']

def test_formats_bits():
    assert NF4_DQ_BITS == pytest.approx(4.127, abs=1e-3)
    llama = ARCHS['Llama-3 8B']
    assert FORMATS['INT4 g128']('q', 0, 4096, llama) == 4.125 and FORMATS['INT4 g128']('head', None, 4096, llama) == 16
    types = [q4_k_m_type(kind, layer, i, llama) for layer in range(32) for kind, _, i in llama.linears()]
    assert types.count('Q6_K') == 32 and set(types) == {'Q4_K', 'Q6_K'}   # half the attn_v and ffn_down tensors
    assert q4_k_m_type('v', 10, 8192, ARCHS['Llama-3 70B']) == 'Q5_K'
    assert q4_k_m_type('q', 0, 576, ARCHS['SmolLM2-135M']) == 'Q5_0'       # 576 is not a multiple of 256
    assert 4.8 < memory_estimate('Llama-3 8B', 'Q4_K_M', 1)['bits_per_weight'] < 5.0

def test_memory_bad_input():
    with pytest.raises(ValueError, match="fmt 'INT3' is unknown"): memory_estimate('Llama-3 8B', 'INT3', 10)
    with pytest.raises(ValueError, match="arch 'GPT-5' is unknown"): memory_estimate('GPT-5', 'FP16', 10)
    with pytest.raises(ValueError, match='context must be >= 1'): memory_estimate('Llama-3 8B', 'FP16', 0)
    with pytest.raises(TypeError, match='batch must be an int'): memory_estimate('Llama-3 8B', 'FP16', 512, batch=True)
    with pytest.raises(TypeError, match='group_size must be an int'): bits_per_weight(4, 64.0, 576)
    with pytest.raises(ValueError, match='in_features must be >= 1'): bits_per_weight(4, 'channel', 0)

def test_arch_from_course_config(course_model):
    model, _ = course_model
    arch = arch_from_config(model.config, 'SmolLM2-135M')
    assert arch == ARCHS['SmolLM2-135M'] and arch.n_params == sum(p.numel() for p in model.parameters())
