"quantize_model(device=...) on models in CPU memory or offloaded by accelerate, and sharded save/load."
import json
import pytest, torch
from accelerate import cpu_offload, disk_offload
from quantcourse.core import QuantizedLinear, block_inputs
from quantcourse.api import (quantize_model, save_quantized, load_quantized, offloaded_block_inputs, block_copy,
                             check_device, shard_bytes, SHARD_INDEX)
from tiny_models import build, calibration

TOKENS = calibration(2, 24)

def layer_state(model):
    return {f'{n}.{k}': t for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for k, t in m.state_dict().items()}

def offloaded(where, tmp_path, arch='llama'):
    model = build(arch)
    if where == 'memory': return model
    if where == 'cpu': return cpu_offload(model, execution_device='cpu')
    return disk_offload(model, tmp_path/'offload', execution_device='cpu')

@pytest.mark.parametrize('method', ['rtn', 'gptq', 'awq'])
@pytest.mark.parametrize('where', ['memory', 'cpu', 'disk'])
def test_offloaded_quantizes_to_the_same_codes(method, where, tmp_path):
    reference = build('llama'); quantize_model(reference, method, calibration=TOKENS, progress=False)
    model = offloaded(where, tmp_path)
    report = quantize_model(model, method, calibration=TOKENS, progress=False, device='cpu')
    expected, got = layer_state(reference), layer_state(model)
    assert got.keys() == expected.keys() and len(report.rows) == 14
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad(): assert torch.equal(model(TOKENS).logits, reference(TOKENS).logits)
    assert all(next(b.parameters()).device.type == 'cpu' for b in model.model.layers)

@pytest.mark.parametrize('arch', ['gemma3', 'qwen2'])
def test_stand_ins_give_block_inputs_arguments(arch):
    "Per-block arguments (sliding and full attention alternate in gemma3) match those of a real pass."
    hidden, kwargs = block_inputs(build(arch), TOKENS)
    mine_hidden, mine = offloaded_block_inputs(cpu_offload(build(arch), execution_device='cpu'), TOKENS)
    assert torch.equal(hidden, mine_hidden) and len(mine) == len(kwargs)
    for a, b in zip(mine, kwargs):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor): assert torch.equal(a[k], b[k]), k

def test_block_copy_loads_and_leaves_the_model_offloaded():
    plain, model = build('llama'), cpu_offload(build('llama'), execution_device='cpu')
    copied = block_copy(model.model.layers[1], 'cpu')
    assert not any(hasattr(m, '_hf_hook') for m in copied.modules())
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), plain.model.layers[1].state_dict().values()))
    assert next(model.model.layers[1].parameters()).device.type == 'meta'

def test_device_is_checked_before_anything_changes():
    model = build('llama'); before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="device='gpu' is not a device name"):
        quantize_model(model, 'rtn', progress=False, device='gpu')
    with pytest.raises(ValueError, match="device='meta' is not available"): check_device('meta')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not available"):
            quantize_model(model, 'rtn', progress=False, device='cuda')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

def test_device_none_and_cpu_agree_on_every_layer_of_a_partial_run():
    names = ['model.layers.1.mlp.down_proj']
    a, b = build('llama'), build('llama')
    quantize_model(a, 'gptq', calibration=TOKENS, names=names, progress=False)
    quantize_model(b, 'gptq', calibration=TOKENS, names=names, progress=False, device='cpu')
    sa, sb = layer_state(a), layer_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

@pytest.mark.parametrize('where', ['memory', 'disk'])
def test_sharded_save_and_load(where, tmp_path):
    model = offloaded(where, tmp_path, 'qwen2')  # tied embeddings: saved once
    quantize_model(model, 'gptq', calibration=TOKENS, progress=False, device='cpu')
    folder = save_quantized(model, tmp_path/'sharded', max_shard_size='60KB')
    index = json.loads((folder/SHARD_INDEX).read_text())
    files = sorted(p.name for p in folder.glob('*.safetensors'))
    assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
    assert sorted(set(index['weight_map'].values())) == files and index['metadata']['total_size'] > 0
    biggest = max(t.numel() * t.element_size() for t in build('qwen2').state_dict().values())
    assert all(p.stat().st_size < max(60_000, biggest) + 20_000 for p in folder.glob('*.safetensors'))
    for path in (folder, folder/SHARD_INDEX):
        reloaded = load_quantized(path, build('qwen2', seed=1))
        with torch.no_grad(): assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)
    if where == 'disk':  # offloaded: one file would hold the whole model in memory at once
        with pytest.raises(ValueError, match='pass.*max_shard_size'): save_quantized(model, tmp_path/'one.safetensors')
        return
    single = save_quantized(model, tmp_path/'one.safetensors')  # the default stays one file
    assert single.is_file()
    with torch.no_grad(): assert torch.equal(load_quantized(single, build('qwen2', seed=2))(TOKENS).logits, model(TOKENS).logits)

def test_bad_shards(tmp_path):
    assert shard_bytes('1.5KB') == 1500 and shard_bytes(10) == 10
    for bad in (0, -5, '0GB', 'big', 2.5, True):
        with pytest.raises(ValueError, match='max_shard_size'): shard_bytes(bad)
    model = build('llama'); quantize_model(model, 'rtn', progress=False)
    with pytest.raises(ValueError, match='max_shard_size=0'): save_quantized(model, tmp_path/'x', max_shard_size=0)
    folder = save_quantized(model, tmp_path/'s', max_shard_size=50_000)
    with pytest.raises(ValueError, match='no model.safetensors.index.json'): load_quantized(tmp_path, build('llama'))
    next(folder.glob('*.safetensors')).unlink()
    with pytest.raises(ValueError, match='the folder lacks it'): load_quantized(folder, build('llama'))

def test_a_model_loaded_with_a_device_map_offloading_to_disk(tmp_path):
    "transformers' `device_map` (accelerate's hooks, `hf_device_map`): a block and lm_head on disk, the rest on the CPU."
    from transformers import AutoModelForCausalLM
    build('llama').save_pretrained(tmp_path/'base')
    reference = AutoModelForCausalLM.from_pretrained(tmp_path/'base', dtype=torch.float32).eval()
    quantize_model(reference, 'gptq', calibration=TOKENS, progress=False)
    device_map = {'model.embed_tokens': 'cpu', 'model.rotary_emb': 'cpu', 'model.layers.0': 'cpu',
                  'model.layers.1': 'disk', 'model.norm': 'cpu', 'lm_head': 'disk'}
    model = AutoModelForCausalLM.from_pretrained(tmp_path/'base', dtype=torch.float32, device_map=device_map,
                                                 offload_folder=tmp_path/'offload').eval()
    assert model.hf_device_map == device_map and next(model.model.layers[1].parameters()).device.type == 'meta'
    quantize_model(model, 'gptq', calibration=TOKENS, progress=False, device='cpu')
    expected, got = layer_state(reference), layer_state(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad(): assert torch.equal(model(TOKENS).logits, reference(TOKENS).logits)
    folder = save_quantized(model, tmp_path/'q', max_shard_size='50KB')  # lm_head is still on disk
    reloaded = load_quantized(folder, AutoModelForCausalLM.from_pretrained(tmp_path/'base', dtype=torch.float32).eval())
    with torch.no_grad(): assert torch.equal(reloaded(TOKENS).logits, reference(TOKENS).logits)
