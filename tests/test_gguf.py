"Tests for quantcourse.gguf: the legacy types byte-identical to the `gguf` package, the k-quants to llama.cpp's C, the layer, bad input."
import math
import numpy as np
import pytest, torch
from torch import nn
import torch.nn.functional as F
import gguf
from gguf import GGMLQuantizationType
from safetensors.torch import save_file, load_file
from quantcourse.core import load_model
from quantcourse.gguf import (BLOCK_BYTES, BLOCK_SIZE, LEGACY_TYPES, QK_K, TYPE_NAMES, GGUFLinear, block_min,
                              build_ggml_quants, dequantize, nearest_int, quantize, reference_quantize, round_half_away)
from quantcourse.api import quantize_model, save_quantized, load_quantized
from tiny_models import build, calibration

def theirs(w: np.ndarray, type_name: str) -> np.ndarray:
    return gguf.quants.quantize(w, GGMLQuantizationType[type_name])

def their_values(data: np.ndarray, type_name: str) -> np.ndarray:
    return gguf.quants.dequantize(data, GGMLQuantizationType[type_name])

def weights(shape, seed=0, std=1.0) -> np.ndarray:
    "Normal values; every third block on a grid of eighths (rounding ties), every fifth all zero, one constant block."
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(std)
    blocks = w.reshape(-1, BLOCK_SIZE)
    blocks[::3] = np.round(blocks[::3] * 8) / 8
    blocks[::5] = 0
    blocks[-1] = np.float32(std)      # a constant block: max == min
    return w + np.float32(0.0)         # no negative zeros: numpy's min and C's loop may disagree on their sign

@pytest.fixture(scope='module')
def course_weights():
    model, _ = load_model(device='cpu')
    return {n: p.detach() for n, p in model.named_parameters() if p.ndim == 2}

SHAPES = [(1, 32), (4, 64), (3, 5, 96), (64, 576), (7, 1536)]

@pytest.mark.parametrize('type_name', LEGACY_TYPES)
@pytest.mark.parametrize('std', [1.0, 0.02, 1e-4, 300.0])
def test_bytes_and_values_equal_gguf_on_random_data(type_name, std):
    for seed, shape in enumerate(SHAPES):
        w = weights(shape, seed, std)
        ours = quantize(w, type_name)
        assert ours.dtype == np.uint8 and ours.shape == (*shape[:-1], shape[-1] // 32 * BLOCK_BYTES[type_name])
        np.testing.assert_array_equal(ours, theirs(w, type_name))
        values = dequantize(ours, type_name, shape)
        assert values.dtype == torch.float32 and values.shape == shape
        assert np.array_equal(values.numpy().view(np.uint32), their_values(ours, type_name).view(np.uint32))  # bit for bit

@pytest.mark.parametrize('type_name', LEGACY_TYPES)
def test_exact_ties(type_name):
    "Blocks whose scaled values sit exactly halfway between codes (x*id + 0.5 an integer) round as C does."
    for top in (8.0, 16.0, 15.0, 31.0, 127.0):
        w = np.tile(np.arange(-16, 16, dtype=np.float32) / 2, (3, 1)) * np.float32(top / 16)
        w[1] = -w[1]; w[2, ::2] = 0.25
        np.testing.assert_array_equal(quantize(w, type_name), theirs(w, type_name))

def test_round_half_away_is_c_roundf():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, 126.5, -126.5])
    assert round_half_away(x).tolist() == [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 0.0, 127.0, -127.0]

def test_signed_zero_minimum_follows_c_loop():
    "C keeps the first of equal minima (`if (v < min)`), so the sign of a zero minimum is that of the first zero."
    for first in (0.0, -0.0):
        b = torch.full((1, 32), 0.5); b[0, 0] = first; b[0, 1] = -first
        assert torch.signbit(block_min(b)).item() == (str(first) == '-0.0')
        data = quantize(b, 'Q4_1')
        assert data[0, 3] == (0x80 if str(first) == '-0.0' else 0)  # float16 m's sign bit

def test_every_course_model_weight_every_type(course_weights):
    "All 2-D weights of the course model (211 tensors, 134M weights), in all five types, byte-identical to gguf."
    tensors = {n: w.numpy() for n, w in course_weights.items()}
    assert len(tensors) == 211
    for type_name in LEGACY_TYPES:
        for name, w in tensors.items():
            ours = quantize(w, type_name)
            assert np.array_equal(ours, theirs(w, type_name)), (type_name, name)
        if type_name in ('Q4_0', 'Q8_0'):  # dequantization of a whole layer, bit for bit, on two types
            w = tensors['model.layers.3.mlp.down_proj.weight']; data = quantize(w, type_name)
            assert np.array_equal(dequantize(data, type_name, w.shape).numpy(), their_values(data, type_name))

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_quantize_their_float32_values(dtype):
    w = torch.from_numpy(weights((4, 64))).to(dtype)
    for type_name in LEGACY_TYPES:
        np.testing.assert_array_equal(quantize(w, type_name), theirs(w.float().numpy(), type_name))

def test_bad_input():
    w = torch.from_numpy(weights((4, 64)))
    with pytest.raises(ValueError, match='rows hold 100 values; pad the last dimension to a multiple of 32'):
        quantize(torch.ones(3, 100), 'Q4_0')
    with pytest.raises(ValueError, match=r"unknown GGUF type 'Q7_K'; valid types are Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"):
        quantize(w, 'Q7_K')
    for type_name in K_TYPES:
        with pytest.raises(ValueError, match=f"{type_name} stores rows in blocks of 256, but this weight.s rows hold 576 values; pad the last dimension"):
            quantize(torch.ones(2, 576), type_name)
    with pytest.raises(ValueError, match=r'importance must hold one value per column of weight, shape \(512,\), got \(256,\)'):
        quantize(torch.ones(2, 512), 'Q6_K', importance=np.ones(256, np.float32))
    with pytest.raises(ValueError, match='importance must not contain NaN or Inf|NaN or Inf'):
        quantize(torch.ones(2, 256), 'Q6_K', importance=np.full(256, np.nan, np.float32))
    with pytest.raises(ValueError, match='Q4_K stores rows in blocks of 256, but this weight.s rows hold 576 values'):
        quantize(torch.ones(2, 576), 'Q4_K')
    with pytest.raises(NotImplementedError, match=r'only Q4_K, Q6_K\); pass importance=None'): quantize(torch.ones(2, 256), 'Q5_K', importance=np.ones(256))
    with pytest.raises(ValueError, match='unknown GGUF type'): dequantize(quantize(w, 'Q4_0'), 'q4_0', (4, 64))
    for bad in (math.nan, math.inf, -math.inf):
        x = w.clone(); x[1, 7] = bad
        with pytest.raises(ValueError, match='NaN or Inf'): quantize(x, 'Q8_0')
    with pytest.raises(TypeError, match='floating-point'): quantize(torch.ones(2, 32, dtype=torch.int32), 'Q8_0')
    with pytest.raises(TypeError, match='torch.Tensor'): quantize([[1.0] * 32], 'Q8_0')
    with pytest.raises(ValueError, match='non-empty'): quantize(torch.ones(0, 32), 'Q8_0')
    with pytest.raises(ValueError, match='does not fit in torch.float16'): quantize(w * 1e8, 'Q8_0')
    with pytest.raises(ValueError, match='does not fit in torch.float16'): quantize(w * 1e6 - 1e6, 'Q4_1')
    with pytest.raises(NotImplementedError, match='importance=None'): quantize(w, 'Q4_0', importance=np.ones(64))
    with pytest.raises(ValueError, match='must be 72 uint8 bytes, got 144'): dequantize(quantize(w, 'Q4_0'), 'Q4_0', (4, 32))
    with pytest.raises(ValueError, match='uint8'): dequantize(quantize(w, 'Q4_0').astype(np.int16), 'Q4_0', (4, 64))

def test_subnormal_weights_stay_finite():
    for type_name in TYPE_NAMES:
        w = torch.from_numpy(weights((4, 256))) * 1e-40
        assert torch.isfinite(dequantize(quantize(w, type_name), type_name, w.shape)).all()

# ---------------------------------------------------------------- the layer
def linear(in_features=128, out_features=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)

@pytest.mark.parametrize('type_name', LEGACY_TYPES)
def test_layer_holds_quantize_bytes_and_computes_with_them(type_name, tmp_path):
    lin, x = linear(), torch.randn(5, 128)
    layer = GGUFLinear.from_linear(lin, type_name)
    assert np.array_equal(layer.data.numpy().reshape(-1), quantize(lin.weight, type_name).reshape(-1))
    assert layer.bits_per_weight == layer.weight().bits_per_weight == 8 * BLOCK_BYTES[type_name] / 32
    w = dequantize(layer.data, type_name, (48, 128))
    with torch.no_grad(): assert torch.equal(layer(x), F.linear(x, w, lin.bias))
    save_file(layer.state_dict(), str(tmp_path / 'l.safetensors'))
    fresh = GGUFLinear.from_config(layer.config())
    fresh.load_state_dict(load_file(str(tmp_path / 'l.safetensors')))
    with torch.no_grad(): assert torch.equal(fresh(x), layer(x))
    other = 'Q8_0' if type_name != 'Q8_0' else 'Q4_0'
    with pytest.raises((ValueError, RuntimeError), match='saved from a layer with|size mismatch'):
        GGUFLinear.from_config(dict(layer.config(), type_name=other)).load_state_dict(layer.state_dict())

def test_layer_refuses_ragged_rows_and_unknown_types():
    with pytest.raises(ValueError, match='multiple of 32'): GGUFLinear(100, 8)
    with pytest.raises(ValueError, match='valid types are'): GGUFLinear(64, 8, type_name='F16')
    with pytest.raises(ValueError, match='multiple of 32'): GGUFLinear.from_linear(nn.Linear(48, 8), 'Q8_0')

@pytest.mark.parametrize('type_name', LEGACY_TYPES)
def test_quantize_model_and_save_load(type_name, tmp_path):
    method = f'gguf_{type_name.lower()}'
    model = build('llama')
    report = quantize_model(model, method, progress=False)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 14 and all(m.type_name == type_name for m in layers)
    assert report.bits_per_weight == 8 * BLOCK_BYTES[type_name] / 32
    path = save_quantized(model, tmp_path / 'q.safetensors')
    loaded = load_quantized(path, build('llama', seed=1))
    ids = calibration(2, 16, seed=2)
    with torch.no_grad(): assert torch.equal(loaded(ids).logits, model(ids).logits)

# ---------------------------------------------------------------- llama.cpp's C reference, and Q4_K
@pytest.fixture(scope='module')
def c_reference():
    "llama.cpp's ggml-quants.c built once into the cache (seconds); skipped, with the fix, if its source is absent."
    try: return build_ggml_quants()
    except FileNotFoundError as e: pytest.skip(str(e))

@pytest.mark.parametrize('type_name', LEGACY_TYPES)
def test_legacy_bytes_equal_c_signed_zeros_included(type_name, c_reference):
    for seed, shape in enumerate(SHAPES):
        w = weights(shape, seed)
        w[np.abs(w) < 0.3] = -0.0                          # negative zeros, and blocks of only negative zeros
        w.reshape(-1, 32)[::4] = -0.0
        np.testing.assert_array_equal(quantize(w, type_name), reference_quantize(w, type_name))

K_TYPES = [t for t in TYPE_NAMES if t.endswith('_K')]

def k_weights(shape, seed=0, std=1.0):
    "Normal values and the blocks that take the searches' other paths: zero, constant, all-positive, one outlier."
    w = weights(shape, seed, std)
    sub = w.reshape(-1, 16)
    sub[1::7] = np.abs(sub[1::7])                          # min > 0: the min is clamped to 0
    sub[2::11] = np.float32(std) * 0.5                     # constant sub-blocks: max == min
    sub[3::13, 5] = np.float32(std) * 40                   # an outlier
    w.reshape(-1, QK_K)[2::5] = 0                          # whole super-blocks of zeros
    return w

def test_nearest_int_is_c_magic_number_rounding():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 3.4999998, 4194303.0, 5e6, -3e7, 1e30], np.float32)
    magic = ((x + np.float32(12582912)).view(np.int32) & 0x7FFFFF) - 0x400000
    assert nearest_int(torch.from_numpy(x)).tolist() == magic.tolist()

@pytest.mark.parametrize('type_name', K_TYPES)
@pytest.mark.parametrize('std', [1.0, 0.02, 1e-5, 1e-30, 3000.0])
def test_k_quant_bytes_equal_c_and_gguf_decodes_them(type_name, std, c_reference):
    for seed, shape in enumerate([(1, 256), (4, 512), (3, 2, 768), (64, 1536), (2, 256)]):
        w = k_weights(shape, seed, std)
        ours = quantize(w, type_name)
        assert ours.shape == (*shape[:-1], shape[-1] // 256 * BLOCK_BYTES[type_name])
        np.testing.assert_array_equal(ours, reference_quantize(w, type_name))
        values = dequantize(ours, type_name, shape).numpy()
        assert np.array_equal(values.view(np.uint32), their_values(ours, type_name).reshape(shape).view(np.uint32))

@pytest.mark.parametrize('type_name', K_TYPES)
def test_k_quants_every_course_model_weight(type_name, course_weights, c_reference):
    "The 30 down_proj weights as they are (rows of 1536; every other 2-D weight has rows of 576), and the values of all 211 tensors flattened into super-blocks, every 64th of each."
    holdable = {n: w for n, w in course_weights.items() if w.shape[-1] % QK_K == 0}
    assert len(course_weights) == 211 and len(holdable) == 30 and all(n.endswith('mlp.down_proj.weight') for n in holdable)
    stacked = torch.stack(list(holdable.values()))            # (30, 576, 1536): one call each side
    ours, theirs = quantize(stacked, type_name), reference_quantize(stacked.numpy(), type_name)
    for i, name in enumerate(holdable): assert np.array_equal(ours[i], theirs[i]), name
    offset = K_TYPES.index(type_name)                          # each type sees other super-blocks
    flat = torch.cat([w.reshape(-1, QK_K)[offset::64] for w in course_weights.values()])
    ours = quantize(flat, type_name)
    np.testing.assert_array_equal(ours, reference_quantize(flat.numpy(), type_name))
    values = dequantize(ours, type_name, flat.shape).numpy()
    assert np.array_equal(values.view(np.uint32), their_values(ours, type_name).reshape(flat.shape).view(np.uint32))

@pytest.mark.parametrize('type_name', ['Q4_K', 'Q6_K'])
def test_importance_equals_c_quantize_with_quant_weights(type_name, course_weights, c_reference):
    "quantize(..., importance=) against C's quantize_q4_K / quantize_q6_K with the same quant_weights."
    for seed, (shape, std) in enumerate([((4, 256), 1.0), ((64, 1536), 0.02), ((8, 512), 1e-5), ((16, 768), 3000.0), ((2, 256), 1e-30)]):
        w = k_weights(shape, seed, std)
        importance = np.random.default_rng(seed).exponential(size=shape[-1]).astype(np.float32)
        importance[::17] = 0                                   # zero importance for some columns
        ours = quantize(w, type_name, importance=importance)
        np.testing.assert_array_equal(ours, reference_quantize(w, type_name, importance))
        if std == 1.0: assert not np.array_equal(ours, quantize(w, type_name))
    for layer in (0, 17, 29):                                  # down_proj with random positive importance
        w = course_weights[f'model.layers.{layer}.mlp.down_proj.weight']
        importance = np.random.default_rng(layer).gamma(0.5, size=1536).astype(np.float32) + np.float32(1e-3)
        np.testing.assert_array_equal(quantize(w, type_name, importance=torch.from_numpy(importance)),
                                      reference_quantize(w.numpy(), type_name, importance))

@pytest.mark.parametrize('type_name', K_TYPES)
def test_k_quant_layer(type_name, tmp_path):
    lin, x = linear(512, 16), torch.randn(3, 512)
    layer = GGUFLinear.from_linear(lin, type_name)
    assert layer.bits_per_weight == 8 * BLOCK_BYTES[type_name] / 256
    with torch.no_grad(): assert torch.equal(layer(x), F.linear(x, dequantize(layer.data, type_name, (16, 512)), lin.bias))
    save_file(layer.state_dict(), str(tmp_path / 'l.safetensors'))
    fresh = GGUFLinear.from_config(layer.config()); fresh.load_state_dict(load_file(str(tmp_path / 'l.safetensors')))
    with torch.no_grad(): assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match='multiple of 256'): GGUFLinear(576, 8, type_name=type_name)

# llama.cpp's mixes (llama-quant.cpp's llama_tensor_get_type for a dense Llama)
from quantcourse.gguf import MIXES, gguf_mix, gguf_name, llama_tensors, mix_bits, use_more_bits

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)

def test_use_more_bits_is_llama_cpp_layer_choice():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]

def test_q4_k_m_on_llama3_8b_shapes():
    tensors = llama_tensors(LLAMA3_8B)
    types = gguf_mix(tensors, 'Q4_K_M')
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert [i for i in range(32) if types[f'blk.{i}.attn_v.weight'] == 'Q6_K'] == more
    assert [i for i in range(32) if types[f'blk.{i}.ffn_down.weight'] == 'Q6_K'] == more
    assert {types[f'blk.{i}.{r}.weight'] for i in range(32) for r in ('attn_q', 'attn_k', 'attn_output', 'ffn_up', 'ffn_gate')} == {'Q4_K'}
    assert (types['output.weight'], types['token_embd.weight'], types['output_norm.weight']) == ('Q6_K', 'Q4_K', 'F32')
    assert abs(mix_bits(tensors, types) - 4.894) < 1e-3

def test_q3_k_m_rules_and_fallbacks_on_the_course_model():
    model, _ = load_model(device='cpu')
    tensors = {gguf_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    q3 = gguf_mix(tensors, 'Q3_K_M')
    # attn_v: Q5_K in layers 0-1 (-> Q5_1 on rows of 576), Q4_K after (-> Q5_0); ffn_down (rows of 1536): Q5_K in layer 0 (30 // 16 = 1)
    assert [q3[f'blk.{i}.attn_v.weight'] for i in range(3)] == ['Q5_1', 'Q5_1', 'Q5_0']
    assert [q3[f'blk.{i}.ffn_down.weight'] for i in range(2)] == ['Q5_K', 'Q4_K']
    assert q3['blk.4.attn_output.weight'] == 'Q5_0' and q3['blk.4.attn_q.weight'] == 'Q4_0'
    assert q3['token_embd.weight'] == 'Q8_0'
    assert {gguf_mix(tensors, 'F16')[n] for n in tensors if 'norm' not in n} == {'F16'}
    assert gguf_mix(tensors, 'Q4_0')['token_embd.weight'] == 'Q8_0'   # Q6_K for tied embeddings, then its fallback

def test_gguf_mix_refuses_unknown_mix_and_names():
    with pytest.raises(ValueError, match='unknown mix'): gguf_mix(llama_tensors(LLAMA3_8B), 'Q4_K_XL')
    with pytest.raises(ValueError, match='not a parameter'): gguf_name('model.layers.0.block_sparse_moe.gate.weight')

# GGUF files: written through gguf's GGUFWriter, read back by gguf and by transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from quantcourse.gguf import dequantized_model, permute_rows, read_gguf, write_gguf

@pytest.fixture(scope='module')
def tiny_llama():
    "A random Llama with the course tokenizer's vocabulary, rows of 64 (k-quants fall back) and 256 (ffn_down keeps them)."
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()

@pytest.mark.parametrize('mix', ['F16', 'Q4_K_M'])
def test_transformers_reads_our_file_as_our_dequantized_model(tiny_llama, tmp_path, mix):
    path = write_gguf(tiny_llama, tmp_path/f'tiny-{mix}.gguf', mix)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ours = dequantized_model(tiny_llama, mix)
    ids = torch.tensor([[1, 504, 3100, 281, 9, 42, 17000, 2]])
    with torch.no_grad(): assert torch.equal(theirs(ids).logits, ours(ids).logits)   # tolerance zero
    types = {t.name: t.tensor_type.name for t in read_gguf(path).tensors}
    # four layers: use_more_bits holds for layers 2 and 3 (4 // 8 = 0, 7 * 4 // 8 = 3, (2 - 0) % 3 == 2)
    assert [types[f'blk.{i}.ffn_down.weight'] for i in range(4)] == (['F16'] * 4 if mix == 'F16' else ['Q4_K', 'Q4_K', 'Q6_K', 'Q6_K'])
    assert types['blk.1.attn_q.weight'] == ('F16' if mix == 'F16' else 'Q5_0')

def test_permute_rows_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = torch.randn(192, 64)
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(permute_rows(w, 3).numpy(), 3, 3)
    assert np.array_equal(back, w.numpy())

def test_a_file_that_does_not_parse_is_named(tmp_path):
    (tmp_path/'junk.gguf').write_bytes(b'GGUF' + bytes(20))
    with pytest.raises(ValueError, match='junk.gguf is not a GGUF file'): read_gguf(tmp_path/'junk.gguf')

# llama.cpp itself (the cached build of llama-cpp-python that `make llama-cpp` makes) runs our files
from quantcourse.gguf import greedy_ids, import_llama_cpp, llama_cpp_folder, llama_greedy, llama_logits, llama_quantize, open_llama

def llama_cpp_or_skip():
    try: return import_llama_cpp()
    except ModuleNotFoundError as e: pytest.skip(f"llama-cpp-python is not built in {llama_cpp_folder()} (`make llama-cpp` builds it): {e}")

@pytest.fixture(scope='module')
def tiny_files(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp('tiny-gguf')
    return {mix: write_gguf(tiny_llama, folder/f'tiny-{mix}.gguf', mix) for mix in ('F32', 'Q4_K_M')}

def test_llama_model_quantize_gives_our_q4_k_m_bytes(tiny_files, tmp_path):
    llama_cpp_or_skip()
    theirs = read_gguf(llama_quantize(tiny_files['F32'], tmp_path/'llama-Q4_K_M.gguf', 'Q4_K_M'))
    ours = {t.name: t for t in read_gguf(tiny_files['Q4_K_M']).tensors}
    assert sorted(ours) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert (t.tensor_type, t.data.tobytes()) == (ours[t.name].tensor_type, ours[t.name].data.tobytes()), t.name

@pytest.mark.parametrize('mix', ['Q2_K', 'Q4_1', 'Q5_0', 'Q5_1', 'Q3_K_M'])
def test_llama_model_quantize_gives_our_bytes_for_more_mixes(tmp_path, mix):
    """Rows of 256 (every k-quant fits) and four query heads per key-value head (Q2_K's attn_v is Q4_K)."""
    llama_cpp_or_skip()
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    source, ours = write_gguf(model, tmp_path/'f32.gguf', 'F32'), write_gguf(model, tmp_path/f'ours-{mix}.gguf', mix)
    theirs = read_gguf(llama_quantize(source, tmp_path/f'llama-{mix}.gguf', mix))
    ours = {t.name: t for t in read_gguf(ours).tensors}
    assert sorted(ours) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert (t.tensor_type, t.data.tobytes()) == (ours[t.name].tensor_type, ours[t.name].data.tobytes()), t.name
    if mix == 'Q2_K':
        assert (ours['blk.0.attn_v.weight'].tensor_type.name, ours['blk.0.ffn_down.weight'].tensor_type.name,
                ours['blk.0.attn_q.weight'].tensor_type.name) == ('Q4_K', 'Q3_K', 'Q2_K')

def test_llama_cpp_computes_our_dequantized_model(tiny_llama, tiny_files):
    """F32: llama.cpp's logits within 1e-4 of ours (float32 key-value cache) and the same greedy tokens; Q4_K_M: its
    8-bit rounding of activations moves them by less than half of what the 4-bit weights themselves move them."""
    llama_cpp_or_skip()
    ids = [1, 504, 3100, 281, 9, 42, 17000, 2, 77, 300]
    with torch.no_grad(): float_logits = tiny_llama(torch.tensor([ids])).logits[0]
    for mix in ('F32', 'Q4_K_M'):
        ours = dequantized_model(tiny_llama, mix)
        with torch.no_grad(): expected = ours(torch.tensor([ids])).logits[0]
        with open_llama(tiny_files[mix], n_ctx=64, logits_all=True, n_threads=1, type_k=0, type_v=0) as llm:
            gap = (llama_logits(llm, ids) - expected).abs()
            same_greedy = llama_greedy(llm, ids, 8) == greedy_ids(ours, ids, 8)
        if mix == 'F32':
            assert gap.max() < 1e-4
            assert same_greedy
        else: assert gap.mean() < (expected - float_logits).abs().mean() / 2

def test_open_llama_closes_the_model_when_the_block_ends(tiny_files):
    llama_cpp_or_skip()
    with open_llama(tiny_files['F32'], n_ctx=64, n_threads=1) as llm: assert llm.n_vocab() > 0
    assert llm._model.model is None  # llama_model_free has run

# llama.cpp's tests/test-quantize-fns.cpp: data 0.1 + 2 cos(i), n = 4096; its "rmse" is sqrt(sum d^2) / n
QUANTIZE_FNS_THRESHOLDS = {'Q2_K': 0.0075, 'Q3_K': 0.0040}   # every other type: MAX_QUANTIZATION_TOTAL_ERROR = 0.002

@pytest.mark.parametrize('type_name', TYPE_NAMES)
def test_llama_cpp_test_quantize_fns_thresholds(type_name, c_reference):
    x = torch.from_numpy((0.1 + 2.0 * np.cos(np.arange(4096, dtype=np.float32))).astype(np.float32)).view(1, -1)
    back = dequantize(quantize(x, type_name), type_name, x.shape).double()
    total_error = math.sqrt(((back - x.double()) ** 2).sum().item()) / x.numel()
    assert total_error < QUANTIZE_FNS_THRESHOLDS.get(type_name, 0.002)
    c_back = dequantize(reference_quantize(x.numpy(), type_name), type_name, x.shape).double()
    assert math.sqrt(((back - c_back) ** 2).sum().item()) / x.numel() < 1e-4   # MAX_QUANTIZATION_REFERENCE_ERROR

# the importance matrix: llama-imatrix's mean of x^2 per input column, handed to Q4_K/Q6_K by dequantized_model
from quantcourse.gguf import collect_importance, stored_values

def test_collect_importance_is_mean_square_input_and_reaches_the_k_quants(tiny_llama):
    ids = torch.tensor([[1, 504, 3100, 281, 9, 42, 17000, 2], [5, 6, 7, 8, 9, 10, 11, 12]])
    importance = collect_importance(tiny_llama, ids)
    assert len(importance) == 4 * 7 and sum(len(m._forward_pre_hooks) for m in tiny_llama.modules()) == 0
    inputs = []
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad(): tiny_llama(ids)
    handle.remove()
    expected = (inputs[0].reshape(-1, 256) ** 2).mean(0)
    assert torch.allclose(importance['blk.1.ffn_down.weight'], expected, rtol=1e-5, atol=0)
    plain, weighted = dequantized_model(tiny_llama, 'Q4_K_M'), dequantized_model(tiny_llama, 'Q4_K_M', importance)
    w = tiny_llama.model.layers[1].mlp.down_proj.weight.detach()   # Q4_K in layer 1 of 4
    assert torch.equal(weighted.model.layers[1].mlp.down_proj.weight, stored_values(w, 'Q4_K', importance['blk.1.ffn_down.weight']))
    assert not torch.equal(weighted.model.layers[1].mlp.down_proj.weight, plain.model.layers[1].mlp.down_proj.weight)
    # the Q5_0 fallbacks (rows of 64) are quantized as without it
    assert torch.equal(weighted.model.layers[1].self_attn.q_proj.weight, plain.model.layers[1].self_attn.q_proj.weight)
