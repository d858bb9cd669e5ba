"""Tests for quantcourse.kernels: the int4, NF4 and int8 weight-only (W8A16) Triton kernels against float32
dequantize-then-matmul on the same codes, the fused W8A8 kernels (int8, FP8 E4M3) against the same per-token
quantization done in torch (in Triton's CPU interpreter when there is no GPU, in a subprocess with
TRITON_INTERPRET=1), the prepared layouts, compilation for sm_90, and bad input (checked before any launch, so
those tests need no Triton)."""
import importlib.util, json, os, subprocess, sys
import pytest, torch
from quantcourse.gptq import GPTQLinear, GPTQWeight
from quantcourse.kernels import (Int4Weight, check_kernel_input, int4_matmul, interpreted, nf4_matmul,
                                 pick_config, int4_config, gemv_config, prepare_int4, arithmetic_intensity,
                                 matmul_traffic)
from quantcourse.nf4 import quantize_4bit
from quantcourse.scales import QuantLinear, quantize_weight

HAS_TRITON = importlib.util.find_spec('triton') is not None
CUDA = torch.cuda.is_available()

# (label, out_features, in_features, batch, group_size, symmetric, permuted, dtype, config)
INT4_CASES = [
    ('g128 batch 1', 64, 256, 1, 128, False, False, 'float16', None),
    ('g64 batch 3 bf16', 70, 256, 3, 64, False, False, 'bfloat16', None),
    ('channel batch 16 perm', 70, 192, 16, 'channel', False, True, 'float16', None),
    ('g32 sym batch 1 bf16', 33, 96, 1, 32, True, False, 'bfloat16', None),
    ('g24 (per-weight scales) perm', 48, 192, 1, 24, False, True, 'float16', None),
    ('g24 batch 3 perm bf16', 48, 192, 3, 24, False, True, 'bfloat16', None),
    ('split-K batch 5', 48, 128, 5, 128, False, False, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 2}),
    ('ragged N, perm, batch 3', 97, 384, 3, 128, False, True, 'bfloat16', None),
    ('batch 64', 40, 128, 64, 64, False, False, 'float16', None),
    ('batch 33 GEMV form', 40, 128, 33, 64, True, False, 'float16', {'USE_DOT': False, 'BLOCK_M': 4}),
    ('split-K uneven (3 tiles, 2 splits)', 36, 192, 1, 64, False, True, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 2}),
    ('split-K adding in float16', 70, 512, 3, 64, False, False, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 4, 'SPLIT_ADD': 'native'}),
    ('GEMV g16 perm', 64, 256, 1, 16, False, True, 'float16', None),
    ('GEMV g32 ragged', 33, 96, 1, 32, True, False, 'bfloat16', None),
    ('GEMV g64 perm split-K', 40, 512, 1, 64, False, True, 'bfloat16', {'GROUPS': 4, 'SPLIT_K': 2}),
    ('GEMV g128 scale each', 36, 384, 1, 128, True, False, 'float16', {'GROUPS': 2, 'SCALE_EACH': True}),
    ('GEMV g256 split-K adding in float16', 20, 512, 1, 256, False, False, 'float16',
     {'GROUPS': 1, 'SPLIT_K': 2, 'SPLIT_ADD': 'native'}),
    ('GEMV for 3 rows', 48, 256, 3, 64, False, True, 'float16', {'GROUPS': 2, 'num_warps': 2}),
]
# (label, out_features, in_features, batch, blocksize, quant_type, double_quant, dtype, config)
NF4_CASES = [
    ('double quant batch 1', 64, 256, 1, 64, 'nf4', True, 'float16', None),
    ('plain batch 3 bf16', 70, 256, 3, 64, 'nf4', False, 'bfloat16', None),
    ('blocks straddle rows batch 16', 70, 192, 16, 128, 'nf4', True, 'float16', None),
    ('fp4 batch 1 bf16', 33, 96, 1, 32, 'fp4', True, 'bfloat16', None),
    ('> 256 blocks split-K', 300, 128, 5, 64, 'nf4', True, 'float16', {'BLOCK_K': 32, 'SPLIT_K': 2}),
    ('ragged N batch 3', 97, 320, 3, 64, 'nf4', True, 'bfloat16', None),
    ('odd rows straddle, batch 1', 35, 90, 1, 64, 'nf4', True, 'float16', None),
    ('split-K adding in float16', 70, 512, 1, 64, 'nf4', True, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 4, 'SPLIT_ADD': 'native'}),
]
TOLERANCE = {'float16': 2e-3, 'bfloat16': 1.5e-2}

SCRIPT = r'''
import json, sys, torch, bitsandbytes.functional as bnbF
from quantcourse.gptq import GPTQWeight
from quantcourse.kernels import int4_matmul, nf4_matmul, prepare_int4, relative_error, interpreted
from quantcourse.nf4 import Weight4bit, quantize_4bit
from quantcourse.scales import quantize_weight
int4_cases, nf4_cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
device = 'cuda' if torch.cuda.is_available() else 'cpu'
assert device == 'cuda' or interpreted()
errors = {}
for label, n, k, batch, group, symmetric, permuted, dtype, config in int4_cases:
    g = torch.Generator().manual_seed(0)
    q = quantize_weight(torch.randn(n, k, generator=g), 4, group, symmetric)
    if permuted: q = GPTQWeight(q, torch.randperm(k, generator=g).short())
    x = torch.randn(batch, k, generator=g).to(getattr(torch, dtype))
    bias = torch.randn(n, generator=g)
    reference = x.float() @ q.dequantize(torch.float32).T + bias
    out = int4_matmul(x.to(device), prepare_int4(q).to(device), bias.to(device), config=config)
    assert out.dtype == x.dtype and out.shape == (batch, n)
    errors['int4 ' + label] = relative_error(out.cpu(), reference)
for label, n, k, batch, size, qt, dq, dtype, config in nf4_cases:
    g = torch.Generator().manual_seed(1)
    w = quantize_4bit(torch.randn(n, k, generator=g) * 0.02, size, qt, dq)
    x = torch.randn(2, batch, k, generator=g).to(getattr(torch, dtype))   # (..., in_features) inputs too
    reference = x.float() @ w.dequantize(torch.float32).T
    moved = Weight4bit(**{f: (v.to(device) if torch.is_tensor(v) else v) for f, v in vars(w).items()})
    out = nf4_matmul(x.to(device), moved, config=config)
    assert out.dtype == x.dtype and out.shape == (2, batch, n)
    errors['nf4 ' + label] = relative_error(out.cpu(), reference)
# bitsandbytes' own packing with double quantization, read as a Weight4bit
weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(2)) * 0.02
packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type='nf4', compress_statistics=True)
w = Weight4bit(packed.view(-1), state.absmax, (96, 320), torch.float32, 64, 'nf4', state.state2.absmax, state.offset)
x = torch.randn(3, 320, generator=torch.Generator().manual_seed(3)).half()
moved = Weight4bit(**{f: (v.to(device) if torch.is_tensor(v) else v) for f, v in vars(w).items()})
errors['nf4 bitsandbytes-packed'] = relative_error(nf4_matmul(x.to(device), moved).cpu(),
                                                   x.float() @ w.dequantize(torch.float32).T)
print(json.dumps(errors))
'''


def run_kernels(script: str, *cases) -> dict:
    "The JSON that `script` prints, run with `cases` in a subprocess (the interpreter on a CPU)."
    if not HAS_TRITON: pytest.skip('triton is not installed')
    env = os.environ if CUDA else os.environ | {'TRITON_INTERPRET': '1'}
    run = subprocess.run([sys.executable, '-c', script, *map(json.dumps, cases)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def kernel_errors():
    "Relative errors of every case, computed in one subprocess (the interpreter on a CPU)."
    return run_kernels(SCRIPT, INT4_CASES, NF4_CASES)


@pytest.mark.parametrize('case', INT4_CASES, ids=[c[0] for c in INT4_CASES])
def test_int4_kernel_matches_float32_reference(case, kernel_errors):
    assert kernel_errors['int4 ' + case[0]] < TOLERANCE[case[7]]


@pytest.mark.parametrize('case', NF4_CASES, ids=[c[0] for c in NF4_CASES])
def test_nf4_kernel_matches_float32_reference(case, kernel_errors):
    assert kernel_errors['nf4 ' + case[0]] < TOLERANCE[case[7]]


def test_nf4_kernel_reads_bitsandbytes_packing(kernel_errors):
    assert kernel_errors['nf4 bitsandbytes-packed'] < TOLERANCE['float16']


# ---------------------------------------------------------------- the prepared layout (no Triton needed)
@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('group', [32, 64, 'channel'])
def test_prepare_int4_keeps_the_weight(symmetric, group):
    q = quantize_weight(torch.randn(24, 192, generator=torch.Generator().manual_seed(0)), 4, group, symmetric)
    assert torch.equal(prepare_int4(q).dequantize(), q.dequantize())


def test_prepare_int4_from_layers():
    "From a QuantLinear (RTN, AWQ) and a GPTQLinear with a column order: the layer's own weight."
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(128, 40)
    rtn = QuantLinear.from_linear(linear, 4, 64, False)
    assert torch.equal(prepare_int4(rtn).dequantize(), rtn.weight().dequantize())
    q = GPTQWeight(quantize_weight(torch.randn(40, 128, generator=g), 4, 64, False), torch.randperm(128, generator=g).short())
    layer = GPTQLinear.from_weight(q)
    prepared = prepare_int4(layer)
    assert prepared.perm.dtype == torch.int32 and torch.equal(prepared.dequantize(), q.dequantize())


def test_prepare_int4_reads_large_int16_orders():
    "GPTQ stores the order as int16: columns past 32,767 wrap negative; the prepared order does not."
    perm = torch.arange(40000).flip(0)
    q = GPTQWeight(quantize_weight(torch.zeros(2, 40000), 4, 'channel', False), perm.to(torch.int16))
    assert torch.equal(prepare_int4(q).perm.long(), perm)


def test_prepare_int4_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match='bits=4'): prepare_int4(quantize_weight(torch.randn(8, 64), 3, 32, False))
    with pytest.raises(ValueError, match="group_size"): prepare_int4(quantize_weight(torch.randn(8, 64), 4, 'tensor', False))
    with pytest.raises(TypeError, match='QuantizedWeight'): prepare_int4(torch.randn(8, 64))


# ---------------------------------------------------------------- bad input, before any launch
@pytest.fixture
def prepared():
    return prepare_int4(quantize_weight(torch.randn(32, 128, generator=torch.Generator().manual_seed(0)), 4, 64, False))


def test_wrong_activation_dtype(prepared):
    with pytest.raises(TypeError, match='x must be float16 or bfloat16'): int4_matmul(torch.randn(2, 128), prepared)
    with pytest.raises(TypeError, match='x must be a torch.Tensor'): int4_matmul([[1.0] * 128], prepared)


def test_wrong_width(prepared):
    with pytest.raises(ValueError, match='in_features=128'): int4_matmul(torch.randn(2, 64).half(), prepared)


def test_non_contiguous_input(prepared):
    x = torch.randn(128, 2).half().T
    with pytest.raises(ValueError, match='x must be contiguous'): int4_matmul(x, prepared)


def test_wrong_weight_kind(prepared):
    x = torch.randn(2, 128).half()
    with pytest.raises(TypeError, match='Int4Weight'): int4_matmul(x, quantize_weight(torch.randn(32, 128), 4, 64, False))
    with pytest.raises(TypeError, match='Weight4bit'): nf4_matmul(x, prepared)


def test_nf4_odd_in_features():
    w = quantize_4bit(torch.randn(4, 63), 64, 'nf4')
    with pytest.raises(ValueError, match='even in_features'): nf4_matmul(torch.randn(2, 63).half(), w)


@pytest.mark.skipif(interpreted(), reason='the interpreter takes CPU tensors')
def test_cpu_tensors_need_the_interpreter(prepared):
    with pytest.raises(ValueError, match='take CUDA tensors'): int4_matmul(torch.randn(2, 128).half(), prepared)
    with pytest.raises(ValueError, match='take CUDA tensors'):
        nf4_matmul(torch.randn(2, 128).half(), quantize_4bit(torch.randn(32, 128), 64, 'nf4', True))


@pytest.mark.skipif(not CUDA, reason='needs two devices')
def test_device_mismatch(prepared):
    with pytest.raises(ValueError, match='weight is on cpu'): check_kernel_input(torch.randn(2, 128, device='cuda').half(), 128, 'cpu')


def test_imports_without_triton():
    "`import quantcourse` and `quantcourse.kernels` work when triton cannot be imported; the kernels say why."
    script = '''
import sys; sys.modules['triton'] = None   # import triton now raises ImportError
import quantcourse, quantcourse.kernels as k, torch
from quantcourse.scales import quantize_weight
assert k.triton is None and not k.interpreted()
w = k.prepare_int4(quantize_weight(torch.randn(8, 64), 4, 32, False))
try: k.int4_matmul(torch.randn(2, 64).half(), w)
except ValueError as e: assert 'CUDA tensors' in str(e), e
else: raise AssertionError('no error')
'''
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_intensity_formula():
    flops, moved = matmul_traffic(1, 4096, 4096, 16)
    assert flops == 2 * 4096 * 4096 and moved == 4096 * 4096 * 2 + 2 * (4096 + 4096)
    assert abs(arithmetic_intensity(16, 8192, 8192, 4) - 2 * 16 * 8192 * 8192 / (8192 * 8192 / 2 + 32 * 16384)) < 1e-9


def test_pick_config_divides_the_group():
    for group in (32, 64, 128, 192, 576):
        config = pick_config(1, 4096, 4608, group, 132)
        assert group % config['BLOCK_K'] == 0
    assert pick_config(1, 4096, 4096, 128, 132)['USE_DOT'] is False
    assert pick_config(16, 4096, 4096, 128, 132)['BLOCK_M'] == 16


def test_the_tuned_table_is_the_recorded_tune():
    "TUNED_INT4_CONFIGS holds what bench/kernels_gpu.py's tune part recorded, shape for shape."
    from pathlib import Path
    from quantcourse.kernels import TUNED_INT4_CONFIGS
    recorded = json.loads((Path(__file__).parent.parent / 'bench' / 'results' / 'kernels_gpu.json').read_text())
    found = {(r['batch'], *map(int, r['shape'].split('x'))): r['config'] for r in recorded['parts']['tune']['results']}
    assert found == TUNED_INT4_CONFIGS
    for (rows, n, k), config in TUNED_INT4_CONFIGS.items():  # the GEMV kernel at batch 1, tensor cores above
        assert ('GROUPS' in config) == (rows == 1) and (config.get('USE_DOT', False) == (rows > 1))


def test_the_w8a8_route_is_the_recorded_fastest():
    "W8A8_ROUTE names, for int8 and FP8, the route with the best geometric-mean speed-up in the recorded run."
    import math
    from pathlib import Path
    from quantcourse.kernels import W8A8_ROUTE
    recorded = json.loads((Path(__file__).parent.parent / 'bench' / 'results' / 'kernels_gpu.json').read_text())
    rows = [r for r in recorded['parts'].get('w8a8', {}).get('timings', []) if 'us' in r]
    if not any(r['method'].startswith('ours two-pass') for r in rows):
        pytest.skip('the recorded w8a8 part predates the routes: W8A8_ROUTE is not measured yet')
    time = lambda r: r['us_graph'] or r['us']
    bf16 = {(r['shape'], r['tokens']): time(r) for r in rows if r['method'] == 'cuBLAS bf16 F.linear'}
    for kind in ('int8', 'fp8'):
        names = {'fused': f'ours fused {kind}', 'two-pass': f'ours two-pass {kind} 128x128 s3',
                 'torch': f'ours torch route {kind}'}
        score = {route: math.fsum(math.log(bf16[(r['shape'], r['tokens'])] / time(r)) for r in rows
                                  if r['method'].split(':')[0] == name)
                 for route, name in names.items()}
        assert W8A8_ROUTE[kind] == max(score, key=score.get), (kind, score)


def test_int4_config_reads_the_tuned_table(monkeypatch):
    import quantcourse.kernels as K
    tuned = dict(BLOCK_M=1, BLOCK_N=8, GROUPS=4, SPLIT_K=2, SCALE_EACH=True, num_warps=2, num_stages=1)
    monkeypatch.setattr(K, 'TUNED_INT4_CONFIGS', {(1, 4096, 4096): tuned})
    assert int4_config(1, 4096, 4096, 128, 132) == tuned
    assert int4_config(1, 4096, 4096, 64, 132) == pick_config(1, 4096, 4096, 64, 132)  # tuned for g128 only
    assert int4_config(2, 4096, 4096, 128, 132) == pick_config(2, 4096, 4096, 128, 132)


def test_gemv_config_splits_within_the_steps():
    for n, k in ((4096, 4096), (1024, 4096), (28672, 8192), (64, 256)):
        config = gemv_config(n, k, 128, 132)
        assert 1 <= config['SPLIT_K'] <= -(-k // (config['GROUPS'] * 128))


@pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed')
def test_gemv_kernel_refuses_other_group_sizes():
    w = prepare_int4(quantize_weight(torch.randn(8, 48), 4, 24, False))
    with pytest.raises(ValueError, match='group sizes'):
        int4_matmul(torch.randn(1, 48).half().cuda() if CUDA else torch.randn(1, 48).half(),
                    w.to('cuda') if CUDA else w, config={'GROUPS': 1})


COMPILE_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import quantcourse.kernels as K
assert not K.interpreted()
HINTED = {'x_ptr', 'packed_ptr', 'out_ptr', 'N', 'K', 'stride_xm', 'stride_om', 'scales_ptr', 'zeros_ptr',
          'perm_ptr', 'group_size', 'absmax_ptr', 'nested_ptr', 'levels_ptr', 'dynamic_ptr'}
def build(kernel, signature, constants, warps=4, stages=3):
    "Compile for sm_90 (H100/H200) through ptxas, with the 16-divisibility the JIT finds at run time."
    signature = dict(signature, **{k: 'constexpr' for k in constants})
    names = list(signature)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(k),): [['tt.divisibility', 16]] for k in names if k in HINTED})
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=warps, num_stages=stages))
    return dict(shared=compiled.metadata.shared, mma=compiled.asm['ptx'].count('mma.sync'))
report = {}
for dtype in ('fp16', 'bf16'):
    for perm, tile, dot, bm, bn, bk, split, tiles, native in [
            (False, True, False, 1, 32, 128, 8, 4, False), (True, True, True, 16, 64, 128, 4, 8, False),
            (True, False, True, 16, 64, 64, 1, 8, False), (False, False, False, 1, 32, 64, 2, 8, False),
            (False, True, False, 1, 32, 128, 8, 4, True)]:   # native: split-K adds in x's dtype
        sig = dict(x_ptr=f'*{dtype}', packed_ptr='*u8', scales_ptr='*fp16', zeros_ptr='*u8', perm_ptr='*i32',
                   out_ptr='*fp32' if split > 1 and not native else f'*{dtype}', M='i32', N='i32', K='i32',
                   stride_xm='i32', stride_om='i32', group_size='i32')
        const = dict(HAS_PERM=perm, TILE_SCALES=tile, USE_DOT=dot, DOT_FP32=False, BLOCK_M=bm, BLOCK_N=bn,
                     BLOCK_K=bk, SPLIT_K=split, TILES=tiles)
        report[f'int4 {dtype} {perm} {tile} {dot} {split} {native}'] = build(K._int4_matmul_kernel, sig, const)
    for dq, tile, dot, bm, bn, bk, split, tiles in [(True, True, False, 1, 32, 64, 8, 8), (True, True, True, 16, 64, 64, 4, 16),
                                                    (False, False, True, 16, 64, 64, 1, 64)]:
        sig = dict(x_ptr=f'*{dtype}', packed_ptr='*u8', absmax_ptr='*u8' if dq else '*fp32', nested_ptr='*fp32',
                   offset_ptr='*fp32', levels_ptr='*fp32', dynamic_ptr='*fp32',
                   out_ptr='*fp32' if split > 1 else f'*{dtype}', M='i32', N='i32', K='i32', stride_xm='i32',
                   stride_om='i32', blocksize='i32')
        const = dict(DOUBLE_QUANT=dq, NESTED=256, TILE_SCALES=tile, USE_DOT=dot, DOT_FP32=False, BLOCK_M=bm,
                     BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, TILES=tiles)
        report[f'nf4 {dtype} {dq} {tile} {dot} {split}'] = build(K._nf4_matmul_kernel, sig, const)
    for perm, group, groups, each, bn, split, tiles in [(False, 128, 2, False, 16, 4, 4), (True, 64, 4, True, 8, 1, 16),
                                                        (False, 32, 8, False, 32, 2, 8)]:
        sig = dict(x_ptr=f'*{dtype}', packed_ptr='*u8', scales_ptr='*fp16', zeros_ptr='*u8', perm_ptr='*i32',
                   out_ptr='*fp32' if split > 1 else f'*{dtype}', M='i32', N='i32', K='i32',
                   stride_xm='i32', stride_om='i32')
        const = dict(HAS_PERM=perm, GROUP=group, GROUPS=groups, SCALE_EACH=each, DOT_FP32=False, BLOCK_M=1,
                     BLOCK_N=bn, BLOCK_K=group * groups, SPLIT_K=split, TILES=tiles)
        report[f'gemv {dtype} {perm} g{group}x{groups}-each-{each} False {split}'] = build(K._int4_gemv_kernel, sig, const)
print(json.dumps(report))
'''


@pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed')
def test_kernels_compile_for_hopper():
    "Without a GPU: both kernels compile for sm_90 through Triton's bundled ptxas (tensor-core forms use mma)."
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report) == 22
    for name, r in report.items():   # name: kernel dtype flag tile-scales use-dot split
        assert (r['mma'] > 0) == (name.split()[4] == 'True'), (name, r)


# ---------------------------------------------------------------- 8-bit kernels: W8A16, W8A8 (int8 and FP8)
# (label, out_features, in_features, batch, dtype, config)
W8A16_CASES = [
    ('batch 1', 64, 256, 1, 'float16', None),
    ('ragged batch 3 bf16', 70, 200, 3, 'bfloat16', None),
    ('batch 16', 33, 96, 16, 'float16', None),
    ('split-K uneven', 48, 384, 5, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 3}),
    ('batch 64 bf16', 40, 128, 64, 'bfloat16', None),
    ('batch 1 split-K 4', 64, 1024, 1, 'bfloat16', {'SPLIT_K': 4}),
]
# (label, kind, out_features, in_features, tokens, dtype, config, exact): exact: equal to the reference rounded
# (float16 only: Triton 3.6's interpreter truncates float32 to bfloat16 instead of rounding)
W8A8_CASES = [
    ('int8 batch 16', 'int8', 64, 256, 16, 'float16', {'SPLIT_K': 1}, True),
    ('int8 ragged', 'int8', 70, 200, 37, 'float16', {'SPLIT_K': 1}, True),
    ('int8 ragged bf16', 'int8', 70, 200, 37, 'bfloat16', {'SPLIT_K': 1}, False),
    ('int8 ragged, split-K by default', 'int8', 70, 200, 37, 'float16', None, False),
    ('int8 batch 1', 'int8', 33, 96, 1, 'float16', {'SPLIT_K': 1}, True),
    ('int8 split-K', 'int8', 48, 384, 5, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 3}, False),
    ('int8 two row tiles, grouped', 'int8', 96, 160, 70, 'float16', {'BLOCK_M': 16, 'BLOCK_N': 32, 'SPLIT_K': 1}, True),
    ('fp8 batch 16', 'fp8', 64, 256, 16, 'float16', None, False),
    ('fp8 fast accumulation', 'fp8', 64, 256, 16, 'float16', {'FAST_ACCUM': True}, False),
    ('fp8 ragged bf16', 'fp8', 70, 200, 37, 'bfloat16', None, False),
    ('fp8 batch 1 split-K', 'fp8', 48, 384, 1, 'float16', {'BLOCK_K': 64, 'SPLIT_K': 3}, False),
    ('fp8 two row tiles, grouped', 'fp8', 96, 160, 70, 'bfloat16', {'BLOCK_M': 16, 'BLOCK_N': 32}, False),
]

EIGHT_BIT_SCRIPT = r'''
import dataclasses, json, sys, torch
import triton, triton.language as tl
import quantcourse.kernels as K
from quantcourse.kernels import (FP8Weight, prepare_int8, quantize_fp8_rows, quantize_fp8_weight, relative_error,
                                 token_scales, w8a16_matmul, w8a8_matmul, interpreted)
from quantcourse.outliers import RowwiseInt8Weight, quantize_activations
from quantcourse.scales import quantize_weight
w8a16_cases, w8a8_cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
device = 'cuda' if torch.cuda.is_available() else 'cpu'
assert device == 'cuda' or interpreted()
move = lambda w: dataclasses.replace(w, **{k: v.to(device) for k, v in vars(w).items()})
report = {}
for label, n, k, batch, dtype, config in w8a16_cases:
    g = torch.Generator().manual_seed(0)
    w = prepare_int8(quantize_weight(torch.randn(n, k, generator=g), 8, 'channel', True))
    x = torch.randn(batch, k, generator=g).to(getattr(torch, dtype))
    bias = torch.randn(n, generator=g)
    out = w8a16_matmul(x.to(device), move(w), bias.to(device), config=config).cpu()
    assert out.dtype == x.dtype and out.shape == (batch, n)
    report['w8a16 ' + label] = relative_error(out, x.float() @ w.dequantize().T + bias)
for label, kind, n, k, tokens, dtype, config, exact in w8a8_cases:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g)
    x = (torch.randn(2, tokens, k, generator=g) * 3).to(getattr(torch, dtype))   # (..., in_features) inputs too
    x[0, 0] = 0   # an all-zero token
    rows = x.reshape(-1, k)
    if kind == 'int8':
        weight = prepare_int8(quantize_weight(w, 8, 'channel', True))
        codes, scale = quantize_activations(rows, 'token')
        reference = (codes.double() @ weight.codes.double().T).float() * scale * (weight.absmax / 127)
    else:
        weight = quantize_fp8_weight(w)
        codes, scale = quantize_fp8_rows(rows)
        reference = (codes.float() @ weight.codes.float().T) * scale[:, None] * weight.scale
    reference = reference.to(x.dtype).view(2, tokens, n)
    out = w8a8_matmul(x.to(device), move(weight), config=config).cpu()
    assert out.dtype == x.dtype and out.shape == (2, tokens, n)
    report['w8a8 ' + label] = [relative_error(out, reference), (out.float() - reference.float()).abs().max().item()]
x = (torch.randn(37, 200, generator=torch.Generator().manual_seed(2)) * 3).half()
x[3] = 0
report['token scales int8 equal'] = torch.equal(token_scales(x.to(device)).cpu(), quantize_activations(x, 'token')[1].view(-1))
report['token scales fp8 equal'] = torch.equal(token_scales(x.to(device), 448.0).cpu(), quantize_fp8_rows(x)[1])
x[5, 7], x[9, 1] = float('nan'), float('inf')
out = w8a8_matmul(x.to(device), move(prepare_int8(quantize_weight(torch.randn(16, 200), 8, 'channel', True)))).cpu()
report['non-finite rows'] = (~torch.isfinite(out).all(1)).nonzero().view(-1).tolist()

@triton.jit
def quantize_kernel(x_ptr, inverse_ptr, out_ptr, N: tl.constexpr, FP8: tl.constexpr, ROUND_FP8: tl.constexpr):
    r = tl.arange(0, N)
    q = K._quantize_tile(tl.load(x_ptr + r)[None, :], tl.load(inverse_ptr + tl.arange(0, 1)), FP8, ROUND_FP8)
    tl.store(out_ptr + r[None, :], q.to(tl.float32))
v = torch.cat([torch.randn(4096) * 100, torch.randn(4096) * 0.01, torch.randn(8192) * 1e-3]).clamp(-448, 448)
v[:4] = torch.tensor([31.1, 447.9, -0.5 * 2**-9, 2**-10 * 3])   # carry into 32, the top, ties among subnormals
out = torch.empty_like(v)
quantize_kernel[(1,)](v.to(device), torch.ones(1, device=device), out_ne := out.to(device), N=v.numel(), FP8=True,
                      ROUND_FP8=interpreted())
report['fp8 prologue mismatches'] = int((out_ne.cpu() != v.to(torch.float8_e4m3fn).float()).sum())
quantize_kernel[(1,)](v.to(device) / 3.5, torch.ones(1, device=device), out_ne, N=v.numel(), FP8=False, ROUND_FP8=False)
report['int8 prologue mismatches'] = int((out_ne.cpu() != torch.round(v / 3.5).clamp(-128, 127)).sum())
print(json.dumps(report))
'''


@pytest.fixture(scope='module')
def eight_bit_report():
    "Errors of every 8-bit case and the prologue checks, computed in one subprocess (the interpreter on a CPU)."
    return run_kernels(EIGHT_BIT_SCRIPT, W8A16_CASES, W8A8_CASES)


@pytest.mark.parametrize('case', W8A16_CASES, ids=[c[0] for c in W8A16_CASES])
def test_w8a16_kernel_matches_float32_reference(case, eight_bit_report):
    assert eight_bit_report['w8a16 ' + case[0]] < TOLERANCE[case[4]]


@pytest.mark.parametrize('case', W8A8_CASES, ids=[c[0] for c in W8A8_CASES])
def test_w8a8_kernel_matches_torch_quantization(case, eight_bit_report):
    "Against the same per-token quantization in torch; int8 without split-K: equal after rounding."
    error, largest = eight_bit_report['w8a8 ' + case[0]]
    assert error < TOLERANCE[case[5]]
    if case[7] and not CUDA: assert largest == 0.0, largest


def test_token_scales_are_chapter_03s(eight_bit_report):
    assert eight_bit_report['token scales int8 equal'] and eight_bit_report['token scales fp8 equal']


def test_non_finite_rows_come_out_non_finite(eight_bit_report):
    assert eight_bit_report['non-finite rows'] == [5, 9]


def test_prologue_rounds_like_torch(eight_bit_report):
    "The in-register quantization gives torch's int8 codes and torch's E4M3 values, ties and carries included."
    assert eight_bit_report['fp8 prologue mismatches'] == 0
    assert eight_bit_report['int8 prologue mismatches'] == 0


def test_prepare_int8_reads_chapter_03():
    from quantcourse.outliers import W8A8Linear, RowwiseInt8Weight
    from quantcourse.kernels import prepare_int8
    layer = W8A8Linear.from_linear(torch.nn.Linear(64, 24))
    w = prepare_int8(layer)
    assert w.codes.data_ptr() == layer.weight_codes.data_ptr()
    assert torch.allclose(w.dequantize(), layer.weight().dequantize(), rtol=1e-6, atol=0)
    rows = RowwiseInt8Weight(layer.weight_codes, torch.ones(24))
    assert prepare_int8(rows) is rows
    with pytest.raises(ValueError, match="group_size='channel'"): prepare_int8(quantize_weight(torch.randn(8, 64), 8, 32, True))
    with pytest.raises(ValueError, match='bits=8'): prepare_int8(quantize_weight(torch.randn(8, 64), 4, 'channel', True))
    with pytest.raises(TypeError, match='RowwiseInt8Weight'): prepare_int8(torch.randn(8, 64))


def test_quantize_fp8_rows():
    from quantcourse.kernels import quantize_fp8_rows, quantize_fp8_weight
    codes, scale = quantize_fp8_rows(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.float(), torch.tensor([[224.0, -448.0, 112.0], [0.0, 0.0, 0.0]]))
    w = torch.randn(16, 64)
    q = quantize_fp8_weight(w)
    assert q.shape == (16, 64) and (q.dequantize() - w).abs().max() < 0.07 * w.abs().max()
    with pytest.raises(ValueError, match='2-D'): quantize_fp8_weight(torch.randn(4))


@pytest.fixture
def eight_bit_weights():
    from quantcourse.kernels import prepare_int8, quantize_fp8_weight
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    return prepare_int8(quantize_weight(w, 8, 'channel', True)), quantize_fp8_weight(w)


def test_eight_bit_bad_input(eight_bit_weights):
    from quantcourse.kernels import token_scales, w8a16_matmul, w8a8_matmul
    from quantcourse.outliers import RowwiseInt8Weight
    int8, fp8 = eight_bit_weights
    x = torch.randn(2, 128).half()
    with pytest.raises(TypeError, match='RowwiseInt8Weight'): w8a16_matmul(x, fp8)
    with pytest.raises(TypeError, match='FP8Weight'): w8a8_matmul(x, torch.randn(32, 128))
    with pytest.raises(TypeError, match='x must be float16 or bfloat16'): w8a8_matmul(x.float(), int8)
    with pytest.raises(TypeError, match='x must be float16 or bfloat16'): w8a16_matmul(x.float(), int8)
    with pytest.raises(ValueError, match='in_features=128'): w8a8_matmul(x[:, :64], fp8)
    with pytest.raises(ValueError, match='x must be contiguous'): w8a8_matmul(torch.randn(128, 2).half().T, int8)
    with pytest.raises(TypeError, match='weight.codes must be a 2-D torch.int8'):
        w8a16_matmul(x, RowwiseInt8Weight(int8.codes.float(), int8.absmax))
    with pytest.raises(TypeError, match='weight.codes must be a 2-D torch.float8_e4m3fn'):
        w8a8_matmul(x, type(fp8)(fp8.codes.half(), fp8.scale))
    with pytest.raises(TypeError, match=r'weight.absmax must be float32 .*\.float\(\)'):
        w8a8_matmul(x, RowwiseInt8Weight(int8.codes, int8.absmax.half()))
    with pytest.raises(ValueError, match=r'weight.codes must be contiguous; pass weight.codes.contiguous\(\)'):
        w8a8_matmul(x, RowwiseInt8Weight(int8.codes.T.contiguous().T, int8.absmax))
    with pytest.raises(TypeError, match='x must be a torch.Tensor'): token_scales([[1.0]])


@pytest.mark.skipif(interpreted(), reason='the interpreter takes CPU tensors')
def test_eight_bit_cpu_tensors_need_the_interpreter(eight_bit_weights):
    from quantcourse.kernels import token_scales, w8a16_matmul, w8a8_matmul
    int8, fp8 = eight_bit_weights
    x = torch.randn(2, 128).half()
    for call in (lambda: w8a16_matmul(x, int8), lambda: w8a8_matmul(x, int8), lambda: w8a8_matmul(x, fp8),
                 lambda: token_scales(x)):
        with pytest.raises(ValueError, match='take CUDA tensors'): call()


EIGHT_BIT_COMPILE_SCRIPT = r'''
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import quantcourse.kernels as K
assert not K.interpreted()
HINTED = {'x_ptr', 'codes_ptr', 'absmax_ptr', 'out_ptr', 'N', 'K', 'stride_xm', 'stride_om', 'x_scales_ptr',
          'w_factor_ptr', 'scales_ptr', 'x_codes_ptr'}
def build(kernel, signature, constants, warps=4, stages=3):
    "Compile for sm_90 (H100/H200) through ptxas; which tensor-core instructions the PTX uses."
    signature = dict(signature, **{k: 'constexpr' for k in constants})
    names = list(signature)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(k),): [['tt.divisibility', 16]] for k in names if k in HINTED})
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm['ptx']
    return dict(shared=compiled.metadata.shared, mma=sorted(set(re.findall(r'\b(w?gmma\.[\w.]+|mma\.sync[\w.]+)', ptx))))
report = {}
for dtype in ('fp16', 'bf16'):
    for dot, bm, bn, bk, split in [(False, 1, 32, 128, 8), (True, 16, 64, 128, 1)]:
        sig = dict(x_ptr=f'*{dtype}', codes_ptr='*i8', absmax_ptr='*fp32', out_ptr='*fp32' if split > 1 else f'*{dtype}',
                   M='i32', N='i32', K='i32', stride_xm='i32', stride_om='i32')
        const = dict(USE_DOT=dot, DOT_FP32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, TILES=4)
        report[f'w8a16 {dtype} {dot} {split}'] = build(K._w8a16_matmul_kernel, sig, const)
    for fp8 in (False, True):
        code = '*fp8e4nv' if fp8 else '*i8'
        for given in (False, True):   # x's codes made in the prologue, or given (quantize_tokens)
            sig = dict(x_ptr=f'*{dtype}', x_codes_ptr=code if given else f'*{dtype}', x_scales_ptr='*fp32',
                       codes_ptr=code, w_factor_ptr='*fp32', out_ptr=f'*{dtype}', M='i32', N='i32', K='i32',
                       stride_xm='i32', stride_om='i32')
            const = dict(W_DIVISOR=1.0 if fp8 else 127.0, CODES_GIVEN=given, FP8=fp8, ROUND_FP8=False,
                         FAST_ACCUM=False, GROUP_M=8, USE_DOT=True, DOT_FP32=False,
                         BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, TILES=32)
            report[f'w8a8 {dtype} {"fp8" if fp8 else "int8"}{" given" if given else ""}'] = build(
                K._w8a8_matmul_kernel, sig, const, warps=8)
        for codes in (False, True):
            report[f'token codes {dtype} {fp8} {codes}'] = build(
                K._token_codes_kernel, dict(x_ptr=f'*{dtype}', scales_ptr='*fp32', codes_ptr=code if codes else '*fp32',
                                            M='i32', K='i32', stride_xm='i32'),
                dict(QMAX=448.0 if fp8 else 127.0, CODES=codes, FP8=fp8, ROUND_FP8=False, BLOCK_M=4, BLOCK_K=1024,
                     TILES=4))
print(json.dumps(report))
'''


@pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed')
def test_eight_bit_kernels_compile_for_hopper():
    "Without a GPU: the 8-bit kernels compile for sm_90; W8A8 multiplies on int8 / FP8 E4M3 tensor cores."
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', EIGHT_BIT_COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for dtype in ('fp16', 'bf16'):
        assert report[f'w8a16 {dtype} False 8']['mma'] == [] and report[f'w8a16 {dtype} True 1']['mma']
        for given in ('', ' given'):
            int8, fp8 = report[f'w8a8 {dtype} int8{given}'], report[f'w8a8 {dtype} fp8{given}']
            assert any('s8' in i for i in int8['mma']), int8
            assert any('e4m3' in i for i in fp8['mma']), fp8


LAYER_SCRIPT = r'''
import json, torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from quantcourse.core import KERNELS, kernel_output, use_kernels
from quantcourse.api import quantize_model
from quantcourse.kernels import LAYER_KERNELS, register_layer_kernels, relative_error
from quantcourse.scales import QuantLinear
from quantcourse.nf4 import NF4Linear
from quantcourse.outliers import W8A8Linear
device = 'cuda' if torch.cuda.is_available() else 'cpu'
if device == 'cpu': register_layer_kernels('cpu')  # the interpreter runs them on CPU tensors
torch.manual_seed(0)
linear = nn.Linear(128, 48).to(device)
errors, declined = {}, {}
for label, layer, dtype in [('int4', QuantLinear.from_linear(linear, 4, 32), torch.float16),
                            ('nf4', NF4Linear.from_linear(linear, 64, 'nf4', True, torch.bfloat16), torch.float32),
                            ('w8a8', W8A8Linear.from_linear(linear), torch.bfloat16)]:
    x = torch.randn(3, 128, device=device).to(dtype)
    out = kernel_output(layer, x)
    with use_kernels(False): expected = layer(x)
    errors[label] = relative_error(out.float().cpu(), expected.float().cpu())
declined['float32'] = kernel_output(QuantLinear.from_linear(linear, 4, 32), torch.randn(2, 128, device=device)) is None
declined['65 rows'] = kernel_output(QuantLinear.from_linear(linear, 4, 32),
                                    torch.randn(65, 128, device=device).half()) is None
x = torch.randn(2, 128, device=device, dtype=torch.float16, requires_grad=True)
declined['autograd'] = QuantLinear.from_linear(linear, 4, 32)(x).grad_fn is not None
# a whole model quantized by quantize_model, in float16: logits with and without the kernels
config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
quantize_model(model, 'rtn', bits=4, group_size=32, progress=False)
model = model.half().to(device)
tokens = torch.randint(0, 64, (1, 5), device=device)
with torch.no_grad():
    on = model(tokens).logits
    with use_kernels(False): off = model(tokens).logits
errors['model logits'] = relative_error(on.float().cpu(), off.float().cpu())
print(json.dumps(dict(errors=errors, declined=declined)))
'''


def test_layers_run_their_kernels():
    "Every registered layer kind's kernel output matches its compute; declined inputs; a quantize_model model."
    result = run_kernels(LAYER_SCRIPT)
    tolerance = dict(int4=2e-3, nf4=1.5e-2, w8a8=1.5e-2)
    for label, error in result['errors'].items():
        assert error < tolerance.get(label, 1e-2), (label, error)
    assert all(result['declined'].values()), result['declined']


def test_prepared_is_kept_and_remade():
    "The kernel's form of a layer's weight is made once, shares asymmetric codes, and is remade after a change."
    from quantcourse.kernels import prepared, prepare_int4_layer
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 48), 4, 64)
    kept = prepared(layer, prepare_int4_layer)
    assert prepared(layer, prepare_int4_layer) is kept
    assert kept.packed.data_ptr() == layer.qweight.data_ptr()
    torch.testing.assert_close(kept.dequantize(), layer.weight().dequantize(), rtol=0, atol=0)
    layer.load_state_dict(QuantLinear.from_linear(torch.nn.Linear(256, 48), 4, 64).state_dict())
    again = prepared(layer, prepare_int4_layer)
    assert again is not kept
    torch.testing.assert_close(again.dequantize(), layer.weight().dequantize(), rtol=0, atol=0)


def test_no_kernel_for_the_cpu():
    "Importing the library registers kernels for CUDA only: on a CPU every layer runs its compute."
    import quantcourse.api  # noqa: F401  (imports the kernels module)
    from quantcourse.core import KERNELS
    assert not [key for key in KERNELS if key[1] == 'cpu']
