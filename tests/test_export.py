"export_compressed_tensors / load_compressed_tensors: transformers computes our logits, the codes survive bit for bit."
import json
import pytest, torch
pytest.importorskip('compressed_tensors')
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from safetensors.torch import load_file
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from quantcourse.core import QuantizedLinear
from quantcourse.scales import QuantLinear
from quantcourse.api import (quantize_model, export_compressed_tensors, load_compressed_tensors, ct_scheme,
                             to_ct_codes, from_ct_codes)

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
TOLERANCE = 1e-5  # float32 scales: transformers dequantizes exactly our weights, so only float32 rounding could differ

def tiny_llama(seed=0, tied=False):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=tied)).eval()

def quantized(method, tied=False, **settings):
    model = tiny_llama(tied=tied)
    quantize_model(model, method, calibration=TOKENS, progress=False, **settings)
    return model

def layers(model): return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}

def logits(model):
    with torch.no_grad(): return model(TOKENS).logits

CASES = [('rtn', dict(group_size=32), False), ('rtn', dict(group_size=64, symmetric=True), True),
         ('rtn', dict(group_size='channel'), False), ('awq', dict(group_size=32), True),
         ('gptq', dict(group_size=32, act_order=True, static_groups=True), False),
         ('awq_gptq', dict(group_size=64, symmetric=True), False)]

@pytest.mark.parametrize('method, settings, tied', CASES)
def test_transformers_computes_our_logits_and_the_codes_survive(method, settings, tied, tmp_path):
    model = quantized(method, tied, **settings)
    export_compressed_tensors(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
    assert (config['quant_method'], config['format'], config['ignore']) == ('compressed-tensors', 'pack-quantized', ['lm_head'])
    assert config.get('dequantize', False) == (not settings.get('symmetric', False))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(hf), logits(model), rtol=0, atol=TOLERANCE)
    packed = load_file(tmp_path / 'model.safetensors')
    for name, layer in layers(model).items():
        q = QuantLinear.weight(layer)
        local = {k.rpartition('.')[2]: v for k, v in packed.items() if k.rpartition('.')[0] == name}
        assert local['weight_packed'].dtype == torch.int32 and local['weight_packed'].shape == (q.shape[0], q.shape[1] // 8)
        assert torch.equal(unpack_from_int32(local['weight_packed'], 4, q.shape), to_ct_codes(q.codes, q.symmetric))
        decompressed = PackedQuantizationCompressor.decompress(local, ct_scheme(layer.group_size, layer.symmetric))
        assert torch.equal(decompressed['weight'], q.dequantize())
        if not q.symmetric:
            zero = unpack_from_int32(local['weight_zero_point'], 4, q.scale.shape, packed_dim=0)
            assert local['weight_zero_point'].shape == (q.shape[0] // 8, q.scale.shape[1])
            assert torch.equal(from_ct_codes(zero, False), q.zero)
    back = load_compressed_tensors(tmp_path)
    assert layers(back).keys() == layers(model).keys()
    for name, layer in layers(model).items():
        assert type(layers(back)[name]) is type(layer)
        mine, theirs = layer.state_dict(), layers(back)[name].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(back), logits(model))

def test_float16_scales_hold_the_same_codes(tmp_path):
    model = quantized('rtn', group_size=32)
    export_compressed_tensors(model, tmp_path, scale_dtype=torch.float16)
    assert load_file(tmp_path / 'model.safetensors')['model.layers.0.mlp.up_proj.weight_scale'].dtype == torch.float16
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model), rtol=0, atol=1e-2)
    assert torch.equal(logits(load_compressed_tensors(tmp_path)), logits(model))

def test_float_layers_inside_the_blocks_are_ignored(tmp_path):
    model = tiny_llama()
    quantize_model(model, 'rtn', names=['model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.down_proj'], progress=False)
    export_compressed_tensors(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
    assert 'model.layers.0.self_attn.k_proj' in config['ignore'] and 'lm_head' in config['ignore']
    assert 'model.layers.1.mlp.down_proj' not in config['ignore']
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model), rtol=0, atol=TOLERANCE)
    assert torch.equal(logits(load_compressed_tensors(tmp_path)), logits(model))

def test_mixed_settings_are_refused(tmp_path):
    model = tiny_llama()
    quantize_model(model, 'rtn', names=['model.layers.0.self_attn.q_proj'], progress=False)
    quantize_model(model, 'rtn', names=['model.layers.1.mlp.up_proj'], group_size=32, symmetric=True, progress=False)
    with pytest.raises(ValueError, match=r'mix group_size, symmetric = \(64, False\) \(model\.layers\.0\.self_attn\.q_proj\)'):
        export_compressed_tensors(model, tmp_path)
    assert list(tmp_path.iterdir()) == []

def test_a_folder_from_elsewhere_loads_as_quantlinear(tmp_path):
    model = quantized('gptq', group_size=32, act_order=True, static_groups=True)
    export_compressed_tensors(model, tmp_path)
    (tmp_path / 'quantcourse.json').unlink()
    back = load_compressed_tensors(tmp_path)
    assert all(type(m) is QuantLinear and m.method == 'rtn' for m in layers(back).values())
    assert torch.equal(logits(back), logits(model))

@pytest.mark.parametrize('make, kwargs, error, message', [
    (lambda: quantized('nf4'), {}, TypeError, r'model\.layers\.0\.self_attn\.q_proj is a NF4Linear'),
    (lambda: quantized('w8a8'), {}, TypeError, "method 'w8a8'"),
    (lambda: quantized('rtn', bits=8), {}, ValueError, 'bits=8'),
    (lambda: quantized('rtn', bits=3, group_size=32), {}, ValueError, 'bits=3'),
    (lambda: quantized('rtn', group_size='tensor'), {}, ValueError, "group_size='tensor'"),
    (lambda: quantized('gptq', act_order=True), {}, ValueError, 'static_groups=True'),
    (lambda: tiny_llama(), {}, ValueError, 'no quantized layers'),
    (lambda: quantized('rtn'), dict(scale_dtype=torch.bfloat16), ValueError, 'scale_dtype'),
])
def test_bad_input_is_refused_before_writing(make, kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message): export_compressed_tensors(make(), tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []

def test_loading_refuses_other_folders(tmp_path):
    with pytest.raises(ValueError, match='has no config.json'): load_compressed_tensors(tmp_path)
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='not a compressed-tensors pack-quantized model'): load_compressed_tensors(tmp_path)
