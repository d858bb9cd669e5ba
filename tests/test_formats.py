"Unit tests for quantcourse.formats: decode and encode bit for bit against torch, properties, bad input."
import math
import pytest, torch
from hypothesis import given, settings, strategies as st
from quantcourse.formats import (FloatFormat, IntFormat, FP32, TF32, BF16, FP16, FP8_E4M3, FP8_E5M2, FP4_E2M1,
    INT8, INT4, FLOAT_FORMATS, FORMATS, decode, encode, round_to, torch_decode, torch_encode, same_values,
    stress_inputs, is_tie, format_summary, format_table, bit_string, simulated_tf32_matmul)

TORCH_FORMATS = [FP16, BF16, FP8_E4M3, FP8_E5M2]
# torch's overflow rule for float8_e4m3fn changed between releases (NaN, then saturation): read it off one cast
TORCH_SATURATES_E4M3 = torch.tensor([1e4]).to(torch.float8_e4m3fn).item() == 448
def torch_overflow(fmt): return ('saturate' if TORCH_SATURATES_E4M3 else 'nan') if fmt is FP8_E4M3 else fmt.overflow
ids = lambda fmts: [f.name for f in fmts]

# --- decoding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', TORCH_FORMATS, ids=ids(TORCH_FORMATS))
def test_decode_every_code_matches_torch(fmt):
    codes = torch.arange(1 << fmt.bits)
    assert same_values(decode(codes, fmt), torch_decode(codes, fmt)).all()

def test_decode_random_fp32_codes_match_torch():
    codes = torch.randint(0, 1 << 32, (100_000,), generator=torch.Generator().manual_seed(3))
    codes = torch.cat([codes, torch.tensor([0, 1, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x80000000])])
    assert same_values(decode(codes, FP32), torch_decode(codes, FP32)).all()

def test_decode_fp4_e2m1_matches_ocp_mx_table():
    # OCP Microscaling spec, FP4 E2M1 element: S.EE.M, bias 1, no Inf or NaN.
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    expected = torch.tensor(table + [-v for v in table], dtype=torch.float64)
    assert same_values(decode(torch.arange(16), FP4_E2M1), expected).all()

@pytest.mark.skipif(not hasattr(torch, 'float4_e2m1fn_x2'), reason='this torch has no float4 dtype')
def test_fp4_torch_dtype_is_storage_only():
    # torch has a packed float4 dtype but (in the installed version) cannot convert it: E2M1 is checked by its table
    packed = torch.arange(256, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(NotImplementedError): packed.float()

def test_decode_special_codes():
    assert decode(torch.tensor([0x7C00, 0xFC00]), FP16).tolist() == [math.inf, -math.inf]
    assert decode(torch.tensor([0x7C01, 0x7E00, 0xFFFF]), FP16).isnan().all()
    assert decode(torch.tensor([0x78, 0x7E]), FP8_E4M3).tolist() == [256.0, 448.0]  # top exponent is finite in E4M3 'fn'
    assert decode(torch.tensor([0x7F, 0xFF]), FP8_E4M3).isnan().all()
    assert decode(torch.tensor([0x7C, 0x7D]), FP8_E5M2)[0] == math.inf and decode(torch.tensor([0x7D]), FP8_E5M2).isnan().all()
    assert decode(torch.tensor([0x3FC00, 0x1FC00]), TF32).tolist() == [math.inf, 1.0]

def test_int_formats():
    assert (INT8.min_value, INT8.max_value, INT4.min_value, INT4.max_value) == (-128, 127, -8, 7)
    assert decode(torch.arange(16), INT4).tolist() == list(range(8)) + list(range(-8, 0))
    uint4 = IntFormat('UINT4', 4, signed=False)
    assert decode(torch.arange(16), uint4).tolist() == list(range(16))
    assert round_to(torch.tensor([-3.0, 7.5, 20.0]), uint4).tolist() == [0.0, 8.0, 15.0]

# --- encoding, bit for bit ------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', TORCH_FORMATS + [FP32], ids=ids(TORCH_FORMATS + [FP32]))
def test_encode_matches_torch_cast_bit_for_bit(fmt):
    n = 20_000
    x = stress_inputs(fmt, n=n, seed=7)
    assert is_tie(x, fmt).sum() >= (n if fmt is not FP32 else 0)          # the ties really are there
    assert (x.abs() > decode(torch.tensor([fmt.max_code]), fmt)).sum() > n  # and values beyond the largest
    assert (encode(x, fmt, overflow=torch_overflow(fmt)) == torch_encode(x, fmt)).all()

@pytest.mark.parametrize('fmt', TORCH_FORMATS, ids=ids(TORCH_FORMATS))
def test_encode_matches_torch_on_gaussian_inputs(fmt):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.randint(-8, 6, (50_000,))
    assert (encode(x, fmt, overflow=torch_overflow(fmt)) == torch_encode(x, fmt)).all()

@pytest.mark.parametrize('fmt', TORCH_FORMATS, ids=ids(TORCH_FORMATS))
def test_float64_input_rounds_once_where_torch_rounds_twice(fmt):
    # just above a tie of `fmt`, by less than float32 can see: one rounding goes up; torch's float64 casts go
    # through float32 first, land on the tie and round to even (down)
    one_up = 1 + 2.0 ** -fmt.mantissa_bits
    x = torch.tensor([1 + 2.0 ** -(fmt.mantissa_bits + 1) + 2.0 ** -40], dtype=torch.float64)
    assert round_to(x, fmt).item() == one_up
    assert x.to(fmt.torch_dtype).item() == 1.0 == round_to(x.float(), fmt).item()

@pytest.mark.parametrize('fmt', TORCH_FORMATS, ids=ids(TORCH_FORMATS))
def test_nan_encodes_to_nan(fmt):
    x = torch.tensor([math.nan, -math.nan])
    assert decode(encode(x, fmt), fmt).isnan().all() and torch_decode(torch_encode(x, fmt), fmt).isnan().all()

def test_overflow_conventions():
    # E4M3: saturating (torch 2.13: beyond 448, including +-inf, gives +-448) or NaN (older torch, ml_dtypes)
    big = torch.tensor([464.0, 465.0, 1e6, math.inf, -math.inf])
    assert round_to(big, FP8_E4M3).tolist() == [448.0, 448.0, 448.0, 448.0, -448.0]
    nonsaturating = round_to(big, FP8_E4M3, overflow='nan')
    assert nonsaturating[0] == 448.0 and nonsaturating[1:].isnan().all()
    expected = round_to(big, FP8_E4M3, overflow=torch_overflow(FP8_E4M3))
    assert same_values(big.to(torch.float8_e4m3fn).double(), expected.double()).all()
    if TORCH_SATURATES_E4M3: assert big.to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0]
    # E5M2 and FP16 are IEEE: overflow gives inf, after rounding (61440 and 65520 are the ties above the max)
    assert torch.tensor([61439.0, 61440.0]).to(torch.float8_e5m2).float().tolist() == [57344.0, math.inf]
    assert round_to(torch.tensor([61439.0, 61440.0]), FP8_E5M2).tolist() == [57344.0, math.inf]
    assert round_to(torch.tensor([65519.0, 65520.0]), FP16).tolist() == [65504.0, math.inf]
    assert round_to(torch.tensor([65520.0, -math.inf]), FP16, overflow='saturate').tolist() == [65504.0, -65504.0]
    # FP4 E2M1 has no inf/NaN: it saturates to +-6 (OCP MX convention)
    assert round_to(torch.tensor([6.9, 7.0, 100.0, -math.inf]), FP4_E2M1).tolist() == [6.0, 6.0, 6.0, -6.0]
    assert round_to(torch.tensor([1e9, -1e9, math.inf]), INT8).tolist() == [127.0, -128.0, 127.0]

def test_ties_round_to_even():
    assert round_to(torch.tensor([2049.0, 2051.0, -2049.0]), FP16).tolist() == [2048.0, 2052.0, -2048.0]
    assert round_to(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]), FP4_E2M1).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_to(torch.tensor([0.5, 1.5, 2.5, -0.5]), INT4).tolist() == [0.0, 2.0, 2.0, -0.0]
    assert encode(torch.tensor([2.0 ** -10]), FP8_E4M3).item() == 0   # half the smallest subnormal: tie to zero
    assert encode(torch.tensor([3 * 2.0 ** -10]), FP8_E4M3).item() == 2  # 1.5 subnormal steps: tie to even (2)

def test_tf32_rounds_like_masking_after_rne():
    # TF32 keeps FP32's exponent: rounding to it equals the classic bit trick (add 0xFFF + lsb, clear 13 bits)
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2)) * 10.0 ** torch.randint(-30, 30, (50_000,))
    bits = x.view(torch.int32)
    trick = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    assert same_values(round_to(x, TF32).double(), trick.double()).all()

def test_encode_is_identity_on_fp32():
    x = stress_inputs(FP32, n=20_000, seed=4)
    assert (encode(x, FP32) == (x.view(torch.int32).long() & 0xFFFFFFFF)).all()

# --- properties -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', [f for f in FORMATS if f.bits <= 19], ids=ids([f for f in FORMATS if f.bits <= 19]))
def test_every_code_round_trips(fmt):
    codes = torch.arange(1 << fmt.bits)
    values = decode(codes, fmt)
    keep = ~values.isnan()
    assert (encode(values[keep], fmt) == codes[keep]).all()

def test_codes_are_sorted_like_values():
    for fmt in [f for f in FLOAT_FORMATS if f.bits <= 16]:
        values = decode(torch.arange(fmt.max_code + 1), fmt)
        assert (values[1:] > values[:-1]).all()

@settings(max_examples=150, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(FLOAT_FORMATS))
def test_encode_picks_the_nearest_value(value, fmt):
    x = torch.tensor([value], dtype=torch.float32)
    stored = round_to(x.double(), fmt, overflow='saturate').item()
    values = decode(torch.arange(fmt.max_code + 1), fmt) if fmt.bits <= 16 else None
    if values is None: return  # FP32/TF32: checked by the spacing bound below
    best = (values - abs(value)).abs().min().item()
    assert abs(abs(stored) - abs(value)) == best

@settings(max_examples=150, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1e30), st.sampled_from([FP32, TF32, BF16]))
def test_relative_error_within_unit_roundoff(value, fmt):
    x = torch.tensor([value], dtype=torch.float64)
    u = 2.0 ** -(fmt.mantissa_bits + 1)
    assert abs(round_to(x, fmt).item() - value) <= u * abs(value)

# --- tables and helpers ---------------------------------------------------------------------------------------

def test_summary_matches_finfo():
    summary = format_summary()
    for fmt in [FP32, BF16, FP16, FP8_E4M3, FP8_E5M2]:
        info = torch.finfo(fmt.torch_dtype)
        assert summary.loc[fmt.name, 'largest'] == info.max
        assert summary.loc[fmt.name, 'smallest normal'] == info.tiny
        assert summary.loc[fmt.name, 'smallest subnormal'] == info.tiny * info.eps
    assert summary.loc['FP4 E2M1', 'largest'] == 6.0 and summary.loc['INT4', 'most negative'] == -8

def test_format_table_and_bits():
    table = format_table(500.0)
    assert table['value'].tolist() == [500.0, 500.0, 500.0, 500.0, 448.0, 512.0, 6.0, 127.0, 7.0]
    assert format_table(0.1).loc['FP16', 'bits'] == '0|01011|1001100110'
    assert bit_string(0xFF, FP8_E5M2) == '1|11111|11' and bit_string(0b1000, INT4) == '1000'

def test_simulated_tf32_matmul_error_is_tf32_sized():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g)
    exact = a.double() @ b.double()
    error = ((simulated_tf32_matmul(a, b).double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < 1e-3

# --- bad input ------------------------------------------------------------------------------------------------

def test_encode_rejects_non_floating_input():
    with pytest.raises(TypeError, match='x must be a floating-point tensor, got torch.int64'): encode(torch.tensor([1, 2]), FP16)
    with pytest.raises(TypeError, match='x must be a floating-point tensor, got list'): encode([0.5], FP8_E4M3)
    with pytest.raises(TypeError, match='x must be a floating-point tensor'): encode(torch.tensor([1]), INT8)
    with pytest.raises(TypeError, match='a must be a floating-point tensor'): simulated_tf32_matmul(torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 2))

def test_decode_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r'codes must lie in \[0, 255\] for FP8 E4M3'): decode(torch.tensor([256]), FP8_E4M3)
    with pytest.raises(ValueError, match=r'codes must lie in \[0, 15\] for FP4 E2M1'): decode(torch.tensor([16]), FP4_E2M1)
    with pytest.raises(ValueError, match=r'codes must lie in \[0, 15\] for INT4'): decode(torch.tensor([-1]), INT4)
    with pytest.raises(TypeError, match='codes must be an integer tensor'): decode(torch.tensor([1.0]), FP16)

def test_unrepresentable_nan_and_impossible_overflow_rule():
    with pytest.raises(ValueError, match='FP4 E2M1 cannot represent'): encode(torch.tensor([1.0, math.nan]), FP4_E2M1)
    with pytest.raises(ValueError, match='INT8 cannot represent'): encode(torch.tensor([math.nan]), INT8)
    with pytest.raises(ValueError, match=r"use one of \['saturate', 'nan'\]"): encode(torch.tensor([1.0]), FP8_E4M3, overflow='inf')
    with pytest.raises(ValueError, match=r"use one of \['saturate'\]"): encode(torch.tensor([1.0]), FP4_E2M1, overflow='nan')
