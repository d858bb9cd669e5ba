"quantize_model, the report, save/load: everything checked before anything changes, failures leave the model as it was."
import copy, json
import pytest, torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from safetensors.torch import save_file
from safetensors import safe_open
from quantcourse.core import QuantizedLinear, METHODS, Method, register_method, linear_names, load_model
from quantcourse.api import quantize_model, save_quantized, load_quantized, QuantReport
from quantcourse.scales import QuantLinear

def tiny_llama(seed=0, hidden=128):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=256, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))

def state(model): return {k: v.clone() for k, v in model.state_dict().items()}
def same_state(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.parametrize('method', sorted(METHODS))
def test_every_method_quantizes_every_block_linear_and_reports(method):
    model = tiny_llama()
    report = quantize_model(model, method, calibration=TOKENS, progress=False)
    assert isinstance(report, QuantReport) and report.method == method
    assert [r['layer'] for r in report.rows] == [n for n in linear_names(tiny_llama()) if n != 'lm_head']
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 21
    assert all(r['error'] is not None and r['error'] >= 0 and r['seconds'] >= 0 for r in report.rows)
    assert report.bytes == sum(r['bytes'] for r in report.rows) and report.bits_per_weight == 8 * report.bytes / report.weights
    frame = report.to_frame()
    assert list(frame.index) == [r['layer'] for r in report.rows] and 'bits_per_weight' in frame
    assert report.totals() in str(report) and report._repr_markdown_()

def test_defaults_are_shared_where_the_meaning_is():
    assert {k: METHODS['rtn'].defaults[k] for k in ('bits', 'group_size', 'symmetric')} == \
           {k: METHODS['gptq'].defaults[k] for k in ('bits', 'group_size', 'symmetric')} == dict(bits=4, group_size=64, symmetric=False)
    assert METHODS['w8a8'].defaults['granularity'] == METHODS['smoothquant'].defaults['granularity'] == 'token'

def test_names_choose_layers():
    model = tiny_llama()
    names = ['model.layers.1.self_attn.k_proj', 'model.layers.2.mlp.down_proj']
    report = quantize_model(model, 'gptq', calibration=TOKENS, names=names, progress=False)
    assert [r['layer'] for r in report.rows] == names
    assert [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)] == names

def test_without_calibration_no_error_is_measured():
    model = tiny_llama()
    report = quantize_model(model, 'nf4', progress=False)
    assert all(r['error'] is None for r in report.rows) and len(report.rows) == 21

@pytest.mark.parametrize('call, error, message', [
    (dict(method='int3'), ValueError, "method 'int3' is unknown"),
    (dict(method='rtn', groupsize=64), TypeError, "rtn has no setting 'groupsize'"),
    (dict(method='rtn', group_size=100), ValueError, r'model\.layers\.0\.self_attn\.q_proj: group_size=100 does not divide'),
    (dict(method='rtn', bits=True), TypeError, 'bits must be an int'),
    (dict(method='nf4', blocksize=48), ValueError, 'power of two'),
    (dict(method='w8a8', granularity='row'), ValueError, 'granularity must be one of'),
    (dict(method='gptq'), ValueError, 'gptq needs calibration'),
    (dict(method='smoothquant', calibration=TOKENS, alpha=2.0), ValueError, r'alpha must lie in \[0, 1\]'),
    (dict(method='rtn', names=['lm_head']), ValueError, 'inside the decoder blocks'),
    (dict(method='rtn', names=['model.layers.9.mlp.up_proj']), ValueError, 'inside the decoder blocks'),
    (dict(method='rtn', calibration=TOKENS.float()), TypeError, 'integer tensor of token ids'),
    (dict(method='rtn', calibration=TOKENS[:0]), ValueError, 'calibration set is empty'),
])
def test_bad_calls_change_nothing(call, error, message):
    model = tiny_llama(); before = state(model)
    call = dict(call); method = call.pop('method')
    with pytest.raises(error, match=message): quantize_model(model, method, progress=False, **call)
    assert same_state(before, state(model)) and not any(isinstance(m, QuantizedLinear) for m in model.modules())

def test_a_failure_half_way_leaves_the_model_as_it_was():
    calls = []
    def fails_in_block_2(linear, statistics, bits, group_size, symmetric):
        calls.append(linear)
        if len(calls) == 15: raise RuntimeError('boom in block 2')
        return QuantLinear.from_linear(linear, bits, group_size, symmetric)
    register_method(Method('fails_late', QuantLinear, METHODS['rtn'].defaults, fails_in_block_2, prepare_block=None))
    try:
        for calibration in (None, TOKENS):
            calls.clear(); model = tiny_llama(); before = state(model)
            with pytest.raises(RuntimeError, match='boom in block 2'): quantize_model(model, 'fails_late', calibration=calibration, progress=False)
            assert same_state(before, state(model)) and not any(isinstance(m, QuantizedLinear) for m in model.modules())
    finally: del METHODS['fails_late']

@pytest.mark.parametrize('sequential', [True, False])
def test_each_layer_sees_the_float_inputs_unless_sequential(sequential):
    """sequential=False: every layer is calibrated on what the float model feeds it, all of a block's layers
    included (none quantized mid-pass); sequential=True: on what the quantized layers before it compute."""
    seen = []
    def rtn_recording(linear, statistics, bits, group_size, symmetric):
        seen.append(statistics.clone())
        return QuantLinear.from_linear(linear, 2, group_size, symmetric)
    register_method(Method('recording', QuantLinear, METHODS['rtn'].defaults, rtn_recording, needs_calibration=True,
                           sequential=sequential))
    try:
        model, float_model = tiny_llama(), tiny_llama()
        float_inputs = {}
        hooks = [m.register_forward_pre_hook(lambda m, args, n=n: float_inputs.__setitem__(n, args[0].clone()))
                 for n, m in float_model.named_modules() if isinstance(m, nn.Linear) and n != 'lm_head']
        with torch.no_grad(): float_model(TOKENS)
        for h in hooks: h.remove()
        report = quantize_model(model, 'recording', calibration=TOKENS, progress=False)
    finally: del METHODS['recording']
    names = [row['layer'] for row in report.rows]
    gaps = {n: (x - float_inputs[n]).abs().max().item() for n, x in zip(names, seen)}
    assert [gaps[f'model.layers.0.self_attn.{p}_proj'] for p in 'qkv'] == [0, 0, 0]
    if sequential: assert max(gaps.values()) > 1e-3
    else: assert max(gaps.values()) < 1e-5, gaps

def test_smoothquant_failure_leaves_the_norms_as_they_were():
    "SmoothQuant changes norms before it quantizes: on a failure in a later block they are the original ones."
    model = tiny_llama(); before = state(model)
    original = METHODS['smoothquant'].quantize
    calls = []
    def fails(linear, statistics, **settings):
        calls.append(1)
        if len(calls) == 10: raise RuntimeError('boom')
        return original(linear, statistics, **settings)
    METHODS['smoothquant'].quantize = fails
    try:
        with pytest.raises(RuntimeError, match='boom'): quantize_model(model, 'smoothquant', calibration=TOKENS, progress=False)
    finally: METHODS['smoothquant'].quantize = original
    assert same_state(before, state(model))

# ---------------------------------------------------------------- save and load
@pytest.mark.parametrize('method', sorted(METHODS))
def test_save_and_load_bit_identical(method, tmp_path):
    model = tiny_llama()
    quantize_model(model, method, calibration=TOKENS, progress=False)
    path = save_quantized(model, tmp_path/'q.safetensors')
    reloaded = load_quantized(path, tiny_llama(seed=1))  # other float weights: everything must come from the file
    with torch.no_grad(): assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in model.modules()]

def test_load_without_a_model_uses_the_base_model_named_in_the_file(tmp_path):
    "The path for a hub id, tested on a local copy: the file names the model it was made from."
    tiny_llama().save_pretrained(tmp_path/'base')
    model = LlamaForCausalLM.from_pretrained(tmp_path/'base').eval()
    quantize_model(model, 'rtn', progress=False)
    path = save_quantized(model, tmp_path/'q.safetensors')
    import quantcourse.api as api
    loaded = api.load_model
    api.load_model = lambda name: (LlamaForCausalLM.from_pretrained(name).eval(), None)  # no tokenizer in this folder
    try: reloaded = load_quantized(path)
    finally: api.load_model = loaded
    with torch.no_grad(): assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)

def test_load_refuses_what_does_not_fit(tmp_path):
    model = tiny_llama(); quantize_model(model, 'rtn', progress=False)
    path = save_quantized(model, tmp_path/'q.safetensors')
    with pytest.raises(ValueError, match=r'model\.layers\.0\.self_attn\.q_proj: the file holds a layer'):
        load_quantized(path, tiny_llama(hidden=192))
    tensors = {}
    with safe_open(str(path), 'pt') as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta['quantcourse'])
    saved['layers']['model.layers.1.mlp.up_proj']['method'] = 'awq'
    save_file(tensors, str(tmp_path/'unknown.safetensors'), metadata={'quantcourse': json.dumps(saved)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: method 'awq' is unknown"):
        load_quantized(tmp_path/'unknown.safetensors', tiny_llama())
    save_file(tensors, str(tmp_path/'corrupt.safetensors'), metadata={'quantcourse': '{"layers": [1, 2'})
    with pytest.raises(ValueError, match='metadata is corrupted'): load_quantized(tmp_path/'corrupt.safetensors', tiny_llama())
    (tmp_path/'truncated.safetensors').write_bytes(path.read_bytes()[:64])
    with pytest.raises(ValueError, match='not a readable safetensors file'): load_quantized(tmp_path/'truncated.safetensors', tiny_llama())
    save_file({'x': torch.zeros(1)}, str(tmp_path/'foreign.safetensors'))
    with pytest.raises(ValueError, match='not written by `save_quantized`'): load_quantized(tmp_path/'foreign.safetensors', tiny_llama())
    with pytest.raises(ValueError, match='no quantized layers'): save_quantized(tiny_llama(), tmp_path/'float.safetensors')
