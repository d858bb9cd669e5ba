"Tests for quantcourse.nf4: bit-identical parity with bitsandbytes on the CPU, properties, bad input."
import math, tempfile
from pathlib import Path
import torch.nn.functional as F
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st
from quantcourse.core import import_bitsandbytes
bnb = import_bitsandbytes()  # without its hub kernel fetch (chapter 00)
import bitsandbytes.functional as bnbF
from safetensors.torch import save_file, load_file
from quantcourse.core import replace_linears
from quantcourse.nf4 import (BLOCKSIZES, NESTED_BLOCKSIZE, NF4Linear, Weight4bit, double_quantize, dynamic_code, fp4_code,
    nf4_code, nearest_level, pack_nibbles, quantize_4bit, quantize_blockwise_8bit, same_bits,
    scale_bits_per_weight, unpack_nibbles)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    "bitsandbytes compiles its fallback for odd last dimensions with torch.compile; eager gives the same numbers, faster."
    with torch._dynamo.config.patch(disable=True): yield

def weight(shape, dtype=torch.float32, seed=0, std=0.02):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)

def by_definition(packed, absmax, quant_type, blocksize, shape, dtype):
    "Dequantization as the format defines it: the code's level times its block's absmax in float32, rounded once to `dtype`."
    n = math.prod(shape)
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[:n].long()
    levels = (nf4_code() if quant_type == 'nf4' else fp4_code())[codes]
    return (levels * absmax.float().repeat_interleave(blocksize)[:n]).to(dtype).view(shape)

def decoded_absmax(state):
    "bitsandbytes' block scales as the format defines them: float32, or the 8-bit code's level x nested absmax + offset."
    if not state.nested: return state.absmax
    nested = state.state2
    return dynamic_code()[state.absmax.long()] * nested.absmax.repeat_interleave(nested.blocksize)[:len(state.absmax)] + state.offset

def cpu_description() -> str:
    "Whether this CPU has AVX-512, and which vector kernels torch chose (bitsandbytes' CPU backend reads the latter)."
    flags = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else ''
    return f"avx512f {'yes' if ' avx512f' in flags else 'no'}, torch capability {torch.backends.cpu.get_cpu_capability()}"

def native_deviation(packed, state, expected) -> str|None:
    "Where the installed bitsandbytes' native CPU `dequantize_4bit` differs from the definition, in words; None if nowhere."
    theirs = bnbF.dequantize_4bit(packed, state).reshape(expected.shape)
    if torch.equal(theirs, expected): return None  # equal values (the sign of a zero may differ: see test_code_books)
    wrong = F.pad((theirs != expected).reshape(-1), (0, -expected.numel() % state.blocksize)).view(-1, state.blocksize).any(1)
    return (f"bitsandbytes {bnb.__version__}'s native CPU dequantize_4bit on this CPU ({cpu_description()}) "
            f"differs from code x absmax for shape {tuple(expected.shape)}, blocksize {state.blocksize}, {state.quant_type}: "
            f"{wrong.sum().item()} of {len(wrong)} blocks (our codes and absmax equal bitsandbytes')")

def assert_matches_bnb(w, blocksize=64, quant_type='nf4', double_quant=False):
    "Codes and scales bit for bit as bitsandbytes stores them; dequantization bit for bit as the format defines it."
    ours = quantize_4bit(w, blocksize, quant_type, double_quant)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    assert same_bits(ours.packed, packed.view(-1)), 'packed bytes'
    assert same_bits(ours.absmax, state.absmax), 'absmax'
    if double_quant:
        assert same_bits(ours.nested_absmax, state.state2.absmax), 'nested absmax'
        assert same_bits(ours.offset, state.offset), 'offset'
        assert same_bits(dynamic_code(), state.state2.code) and state.state2.blocksize == NESTED_BLOCKSIZE
    assert same_bits(ours.scales(), decoded_absmax(state)), 'decoded block scales'
    expected = by_definition(packed, decoded_absmax(state), quant_type, blocksize, w.shape, w.dtype)
    assert same_bits(ours.dequantize(), expected), 'dequantized'
    if bnb_pure_torch is not None:  # bitsandbytes' own pure-torch path computes the definition too (its FP4 zero is +0.0)
        theirs = bnb_pure_torch(packed.view(-1), decoded_absmax(state), state.code, blocksize, w.shape, w.dtype)
        assert torch.equal(theirs.view(w.shape), expected) and (quant_type == 'fp4' or same_bits(theirs.view(w.shape), expected))
    return ours, packed, state, expected

try: from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as bnb_pure_torch
except ImportError: bnb_pure_torch = None  # another bitsandbytes layout: the definition alone is the reference

# ---------------------------------------------------------------- code books
def test_code_books_equal_bitsandbytes():
    assert same_bits(nf4_code(), bnbF.get_4bit_type('nf4', device='cpu'))
    assert same_bits(dynamic_code(), bnbF.create_dynamic_map())
    assert torch.equal(fp4_code(), bnbF.get_4bit_type('fp4', device='cpu'))  # equal values; bitsandbytes' table says +0.0
    assert torch.signbit(fp4_code()[0b1000]) and not torch.signbit(fp4_code()[0])  # pattern 1000 is -0.0 by its bits

def test_nf4_code_structure():
    code = nf4_code()
    assert ((code > 0).sum(), (code < 0).sum(), (code == 0).sum()) == (8, 7, 1)
    assert code[0] == -1 and code[-1] == 1 and torch.all(code[1:] > code[:-1])

# ---------------------------------------------------------------- parity with bitsandbytes
@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: str(d).replace('torch.', ''))
@pytest.mark.parametrize('quant_type', ['nf4', 'fp4'])
@pytest.mark.parametrize('shape,blocksize', [((128, 96), 64), ((37, 22), 64), ((5, 7), 32), ((3, 10, 9), 128),
                                             ((1,), 64), ((576, 192), 4096), ((1000, 3), 256)])
def test_quantize_4bit_matches_bnb(shape, blocksize, quant_type, dtype):
    assert_matches_bnb(weight(shape, dtype), blocksize, quant_type)

NATIVE_CASES = [((128, 96), 64), ((37, 22), 64), ((576, 192), 4096), ((96, 100), 2048), ((576, 576), 64), ((1536, 576), 64)]

@pytest.mark.parametrize('quant_type', ['nf4', 'fp4'])
@pytest.mark.parametrize('shape,blocksize', NATIVE_CASES)
def test_bnb_native_dequantize_against_definition(shape, blocksize, quant_type):
    "bitsandbytes' native CPU kernel dispatches on the CPU's features: a disagreement is its deviation, reported by name."
    _, packed, state, expected = assert_matches_bnb(weight(shape), blocksize, quant_type)
    deviation = native_deviation(packed, state, expected)
    if deviation: pytest.xfail(deviation)

@pytest.mark.parametrize('blocksize', BLOCKSIZES)
def test_every_blocksize(blocksize):
    assert_matches_bnb(weight((96, 100), seed=blocksize), blocksize, 'nf4')
    assert_matches_bnb(weight((96, 100), seed=blocksize), blocksize, 'fp4', double_quant=True)

@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: str(d).replace('torch.', ''))
@pytest.mark.parametrize('shape', [(512, 512), (300, 277), (4096, 17), (9, 9)])
def test_double_quant_matches_bnb(shape, dtype):
    assert_matches_bnb(weight(shape, dtype, seed=1), 64, 'nf4', double_quant=True)

def test_zeros_and_exact_levels():
    w = torch.zeros(256); w[64:128] = torch.linspace(-1, 1, 64)  # an all-zero block, and values on the grid
    w[200] = 0.5
    assert_matches_bnb(w, 64, 'nf4')
    assert_matches_bnb(w, 64, 'fp4')
    assert torch.equal(quantize_4bit(w).dequantize()[:64], torch.zeros(64))

def test_real_layers_match_bnb(course_model):
    model, _ = course_model
    for name in ['q_proj', 'k_proj', 'up_proj', 'down_proj']:
        layer = next(m for n, m in model.named_modules() if n.endswith(name))
        assert_matches_bnb(layer.weight.detach(), 64, 'nf4', double_quant=True)
        assert_matches_bnb(layer.weight.detach(), 64, 'fp4')

# ---------------------------------------------------------------- storage
def test_bits_per_weight_and_bnb_bytes():
    w = weight((256, 4096))  # 16,384 blocks: 64 full blocks of scales
    plain, double = quantize_4bit(w), quantize_4bit(w, double_quant=True)
    assert plain.bits_per_weight == 4.5
    assert math.isclose(double.bits_per_weight - 4, scale_bits_per_weight(64, True) + 32 / w.numel())
    _, state = bnbF.quantize_4bit(w, quant_type='nf4', compress_statistics=True)
    stored = sum(t.numel() * t.element_size() for t in (state.absmax, state.state2.absmax, state.offset))
    assert stored == double.nbytes - double.packed.numel()
    assert math.isclose(scale_bits_per_weight(64, True), 0.126953125)

# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize('quant_type', ['nf4', 'fp4'])
@pytest.mark.parametrize('double_quant', [False, True])
@pytest.mark.parametrize('compute_dtype', [torch.float32, torch.bfloat16], ids=['float32', 'bfloat16'])
def test_linear_matches_bnb_linear4bit(quant_type, double_quant, compute_dtype):
    torch.manual_seed(0)
    source = nn.Linear(192, 320)
    x = torch.randn(2, 5, 192)
    ours = NF4Linear.from_linear(source, 64, quant_type, double_quant, compute_dtype)
    theirs = bnb.nn.Linear4bit(192, 320, bias=True, compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
    theirs.load_state_dict(source.state_dict()); theirs = theirs.to('cpu')
    assert same_bits(ours.packed, theirs.weight.data.view(-1))
    state = theirs.weight.quant_state
    expected = by_definition(theirs.weight.data, decoded_absmax(state), quant_type, 64, (320, 192), compute_dtype)
    with torch.no_grad(): y_ours, y_theirs = ours(x), theirs(x)
    reference = torch.nn.functional.linear(x.to(compute_dtype), expected, source.bias.detach().to(compute_dtype)).float()
    assert same_bits(y_ours, reference) and y_ours.dtype == torch.float32
    if not same_bits(y_ours, y_theirs):  # bitsandbytes' layer runs its native kernel: ours is right, say where it is not
        pytest.xfail(native_deviation(theirs.weight.data, state, expected.float().to(compute_dtype)) or
                     f"bitsandbytes {bnb.__version__}'s Linear4bit output differs from F.linear on the dequantized weight on this CPU")

@pytest.mark.parametrize('double_quant', [False, True])
def test_safetensors_round_trip(double_quant):
    source = nn.Linear(100, 64)  # 6,400 weights: blocks of 64 fill exactly, 256-blocks of scales do not
    layer = NF4Linear.from_linear(source, double_quant=double_quant, compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        save_file(layer.state_dict(), f'{folder}/layer.safetensors')
        fresh = NF4Linear(100, 64, double_quant=double_quant, compute_dtype=torch.bfloat16)
        fresh.load_state_dict(load_file(f'{folder}/layer.safetensors'))
    assert list(layer.state_dict()) == list(fresh.state_dict())
    assert all(same_bits(a, b) for a, b in zip(layer.state_dict().values(), fresh.state_dict().values()))
    x = torch.randn(3, 100)
    with torch.no_grad(): assert same_bits(layer(x), fresh(x))

def test_nf4_layers_in_a_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False))
    x = torch.randn(4, 64)
    with torch.no_grad(): before = net(x)
    replace_linears(net, lambda name, linear: NF4Linear.from_linear(linear, double_quant=True), ['0', '2'])
    assert isinstance(net[0], NF4Linear) and isinstance(net[2], NF4Linear) and net[2].bias is None
    with torch.no_grad(): after = net(x)
    assert (after - before).norm() / before.norm() < 0.15

# ---------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 700), blocksize=st.sampled_from([32, 64, 128]),
       quant_type=st.sampled_from(['nf4', 'fp4']), scale=st.floats(1e-6, 1e3))
def test_error_bound_and_exact_absmax(seed, n, blocksize, quant_type, scale):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize_4bit(w, blocksize, quant_type)
    code = nf4_code() if quant_type == 'nf4' else fp4_code().sort().values
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    blocks = torch.nn.functional.pad(w, (0, -n % blocksize)).view(-1, blocksize)
    deq = torch.nn.functional.pad(q.dequantize(), (0, -n % blocksize)).view(-1, blocksize)
    assert torch.all((deq - blocks).abs() <= q.absmax[:, None] * half_gap * (1 + 1e-6))
    assert torch.equal(deq.abs().amax(1), q.absmax)  # the extreme weight of every block comes back exactly

@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=200))
def test_pack_unpack_round_trip(codes):
    codes = torch.tensor(codes + [0] * (len(codes) % 2), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), len(codes)), codes)

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), power=st.integers(-20, 20))
def test_codes_invariant_to_power_of_two_scaling(seed, power):
    w = torch.randn(300, generator=torch.Generator().manual_seed(seed))
    a, b = quantize_4bit(w), quantize_4bit(w * 2.0 ** power)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax * 2.0 ** power, b.absmax)

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 2000))
def test_double_quantized_scales_stay_close(seed, n):
    absmax = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.1 + 0.01
    w = Weight4bit(torch.zeros(n * 32, dtype=torch.uint8), absmax, (n * 64,), torch.float32)
    decoded = double_quantize(w).scales()
    nested = torch.nn.functional.pad(absmax - absmax.mean(), (0, -n % 256)).view(-1, 256).abs().amax(1)
    # one 8-bit dynamic-code step near 1 is 0.0141 of the nested absmax; never worse than that plus the table's grid
    assert torch.all((decoded - absmax).abs() <= nested.repeat_interleave(256)[:n] * (0.0141 / 2 + 2 / 65535) + 1e-6)

def test_8bit_table_close_to_exact_nearest():
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_blockwise_8bit(values, dynamic_code())
    normalized = (torch.nn.functional.pad(values, (0, -10_000 % 256)).view(-1, 256) / absmax[:, None]).view(-1)[:10_000]
    exact = nearest_level(normalized, dynamic_code())
    error = lambda c: (dynamic_code()[c.long()] - normalized).abs()
    assert (codes != exact).float().mean() < 0.01
    assert torch.all(error(codes) <= error(exact) + 2 / 65535)  # at most one grid step worse than the nearest level

# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('blocksize', [48, 16, 8192, 0, -64, 64.0, True, '64'])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match='power of two from 32 to 4096'): quantize_4bit(weight((64, 64)), blocksize)
    with pytest.raises(ValueError, match='power of two from 32 to 4096'): NF4Linear(64, 64, blocksize=blocksize)

@pytest.mark.parametrize('dtype', [torch.int8, torch.int32, torch.uint8, torch.bool])
def test_non_floating_input(dtype):
    with pytest.raises(TypeError, match='floating-point'): quantize_4bit(torch.ones(64, 64, dtype=dtype))

def test_float64_input():
    with pytest.raises(TypeError, match=r'float32, float16 or bfloat16.*\.float\(\)'): quantize_4bit(torch.ones(64, 64, dtype=torch.float64))

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_nan_and_inf(bad):
    w = weight((64, 64)); w[3, 5] = bad
    with pytest.raises(ValueError, match='NaN or Inf'): quantize_4bit(w)
    with pytest.raises(ValueError, match='NaN or Inf'): quantize_4bit(w.bfloat16())

def test_other_bad_input():
    with pytest.raises(ValueError, match='non-empty'): quantize_4bit(torch.ones(0, 64))
    with pytest.raises(ValueError, match="quant_type must be one of"): quantize_4bit(weight((64, 64)), quant_type='int4')
    with pytest.raises(TypeError, match='torch.Tensor'): quantize_4bit([[1.0, 2.0]])
    with pytest.raises(ValueError, match='compute_dtype'): NF4Linear(64, 64, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match='even number'): pack_nibbles(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match='strictly between 0.5 and 1'): nf4_code(0.4)
    with pytest.raises(ValueError, match='NaN or Inf'): quantize_blockwise_8bit(torch.tensor([1.0, float('nan')]), dynamic_code())
    with pytest.raises(ValueError, match='positive int'): quantize_blockwise_8bit(torch.ones(8), dynamic_code(), 0)
    with pytest.raises(ValueError, match='at most 256 levels'): quantize_blockwise_8bit(torch.ones(8), torch.linspace(-1, 1, 300))


# ---------------------------------------------------------------- the CUDA path's pieces, checked on the CPU
from quantcourse.nf4 import FAST_PATHS, Linear4bitFunction, linear_4bit, triton_dequantize_4bit
import importlib.util, os, subprocess, sys
from torch.autograd.graph import saved_tensors_hooks

def saved_sizes(fn):
    sizes = []
    def pack(t): sizes.append(t.numel() * t.element_size()); return t
    with saved_tensors_hooks(pack, lambda t: t): out = fn()
    return sizes, out

@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)])
@pytest.mark.parametrize('double_quant', [False, True])
@pytest.mark.parametrize('with_bias', [False, True])
def test_linear_4bit_matches_dequantize_then_matmul(dtype, tol, double_quant, with_bias):
    "The autograd function: the reference's output and input gradient (relative `tol`), without saving the weight."
    w4 = quantize_4bit(weight((48, 200), seed=3), 64, 'nf4', double_quant)
    bias = weight((48,), seed=4).to(dtype) if with_bias else None
    x = torch.randn(2, 7, 200, generator=torch.Generator().manual_seed(5)).to(dtype)
    grad_y = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(6)).to(dtype)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = F.linear(x_ref, w4.dequantize(dtype), bias)
    sizes, y_ours = saved_sizes(lambda: linear_4bit(x_ours, w4, bias))
    y_ref.backward(grad_y); y_ours.backward(grad_y)
    assert y_ours.dtype == dtype and x_ours.grad.dtype == dtype
    torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=0, atol=tol * y_ref.abs().max().item())
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad.float(), rtol=0, atol=tol * x_ref.grad.abs().max().item())
    assert all(size < w4.numel for size in sizes)  # nothing of the dequantized weight's size is kept

def test_linear_4bit_without_input_grad():
    w4 = quantize_4bit(weight((32, 64)), 64, 'nf4', True)
    x = torch.randn(3, 64)
    with torch.no_grad(): assert torch.equal(linear_4bit(x, w4), F.linear(x, w4.dequantize(torch.float32)))
    assert torch.equal(Linear4bitFunction.apply(x, w4, None, Weight4bit.dequantize), linear_4bit(x, w4))

def test_nf4_linear_fast_path_is_cuda_only_and_equal():
    "On the CPU the layer computes by the reference path; routed through linear_4bit it gives the same output."
    assert FAST_PATHS.get('cpu') is None and FAST_PATHS['cuda'] is linear_4bit
    layer = NF4Linear.from_linear(nn.Linear(64, 32), double_quant=True, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 64, requires_grad=True)
    reference = layer(x)
    FAST_PATHS['cpu'] = linear_4bit
    try: fast = layer(x)
    finally: del FAST_PATHS['cpu']
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)

@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton is not installed')
def test_triton_kernel_in_the_interpreter():
    "The fused kernel, run by triton's CPU interpreter: Weight4bit.dequantize's float32 bits."
    script = '''
import torch
from quantcourse.nf4 import quantize_4bit, triton_dequantize_4bit, same_bits
g = torch.Generator().manual_seed(0)
for shape, qt, dq in [((96, 200), 'nf4', True), ((64, 64), 'fp4', False), ((7, 111), 'nf4', True), ((33, 64), 'fp4', True)]:
    w = quantize_4bit(torch.randn(shape, generator=g), 64, qt, dq)
    assert same_bits(triton_dequantize_4bit(w, torch.float32, bytes_per_program=64), w.dequantize(torch.float32)), shape
'''
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         env=os.environ | {'TRITON_INTERPRET': '1'})
    assert run.returncode == 0, run.stderr[-3000:]

@pytest.mark.skipif(importlib.util.find_spec('triton') is not None, reason='triton is installed')
def test_triton_dequantize_without_triton_says_so():
    with pytest.raises(RuntimeError, match='triton is not installed'):
        triton_dequantize_4bit(quantize_4bit(weight((8, 64))))
