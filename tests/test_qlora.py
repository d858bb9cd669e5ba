"Tests for quantcourse.qlora: LoRA parity with peft over bitsandbytes' NF4 Linear4bit on the CPU, frozen bases, saving, bad input."
import json, math, re
import pytest, torch
from torch import nn
from quantcourse.core import import_bitsandbytes
bnb = import_bitsandbytes()  # without its hub kernel fetch (chapter 00)
import peft
import tiny_models
from quantcourse.core import QuantizedLinear, replace_linears
from quantcourse.nf4 import NF4Linear, same_bits
from quantcourse.scales import QuantLinear, arch_from_config
from quantcourse.qlora import (LoRALinear, add_lora, adapter_config, adapter_state_dict, block_linears, load_adapters,
    lora_layers, lr_factor, match_targets, prepare_for_kbit_training, save_adapters, train_lora, trainable_parameters,
    float_weight, lora_delta, merge_lora, merged_linear, training_memory)

R, ALPHA = 4, 8
FORWARD_ATOL, GRAD_ATOL, LOSS_RTOL = 1e-5, 1e-6, 1e-5  # float32 rounding; bnb's CPU kernel dispatches on CPU features

@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    "bitsandbytes compiles some CPU fallbacks with torch.compile; eager gives the same numbers, faster."
    with torch._dynamo.config.patch(disable=True): yield

def batches(n=4, batch=2, seq_len=16, seed=0):
    return torch.randint(3, tiny_models.VOCAB, (n, batch, seq_len), generator=torch.Generator().manual_seed(seed))

def to_bnb_nf4(model):
    "Every block linear as bitsandbytes' NF4 Linear4bit with double quantization, float32 compute."
    def convert(name, linear):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type='nf4')
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type='nf4')
        return layer.to('cpu')
    replace_linears(model, convert, tiny_models.block_linears(model, 'llama'))
    return model

def training_path_logits(model, tokens):
    """Logits in training mode without gradients: on AVX-512 BF16 CPUs bnb's eval-mode no-grad forward repacks the 4-bit weight in place
    for another kernel (about 5e-3 off in logits, and not undone exactly by state_dict), so bnb models run in training mode here."""
    with torch.no_grad(): return model.train()(input_ids=tokens).logits

def peft_lora(model):
    return model.base_model.model

def twins(targets='all-linear', random_b=False):
    "peft's LoRA and ours around the same bnb NF4 tiny Llama (built twice from one seed), ours holding peft's A and B."
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    theirs = peft.get_peft_model(to_bnb_nf4(tiny_models.build('llama')), cfg)
    ours = add_lora(to_bnb_nf4(tiny_models.build('llama')), R, ALPHA, targets=targets)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            twin = peft_lora(theirs).get_submodule(name)
            if random_b: twin.lora_B['default'].weight.normal_(std=0.1)
            layer.lora_A.weight.copy_(twin.lora_A['default'].weight)
            layer.lora_B.weight.copy_(twin.lora_B['default'].weight)
    return theirs, ours

def test_forward_and_gradients_equal_peft_over_bnb():
    theirs, ours = twins(random_b=True)
    assert len(lora_layers(ours)) == 14
    x = batches()[0]
    theirs.train(); ours.train()
    out_t, out_o = theirs(input_ids=x, labels=x), ours(input_ids=x, labels=x)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=0, atol=FORWARD_ATOL)
    out_t.loss.backward(); out_o.loss.backward()
    for name, layer in lora_layers(ours).items():
        for part in ('lora_A', 'lora_B'):
            theirs_grad = getattr(peft_lora(theirs).get_submodule(name), part)['default'].weight.grad
            assert theirs_grad.abs().max() > 0
            torch.testing.assert_close(getattr(layer, part).weight.grad, theirs_grad, rtol=0, atol=GRAD_ATOL)

def test_loss_curves_coincide_with_peft():
    theirs, ours = twins(targets=['q_proj', 'v_proj'])
    data = batches()
    theirs.train()
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    peft_losses = []
    for step in range(8):
        b = data[step % len(data)]
        loss = theirs(input_ids=b, labels=b).loss
        loss.backward(); opt.step(); opt.zero_grad(); peft_losses.append(loss.item())
    ours_losses = train_lora(ours, data, 8, lr=1e-2, schedule='constant', progress=False)
    assert peft_losses[-1] < peft_losses[0]
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), rtol=LOSS_RTOL, atol=0)

@pytest.mark.parametrize('kind', ['float', 'nf4_dq', 'int4', 'bnb'])
def test_only_adapters_change(kind):
    model = tiny_models.build('llama')
    names = tiny_models.block_linears(model, 'llama')
    make = {'float': None, 'int4': lambda n, l: QuantLinear.from_linear(l, 4, 32),
            'nf4_dq': lambda n, l: NF4Linear.from_linear(l, 64, 'nf4', True)}.get(kind)
    if kind == 'bnb': to_bnb_nf4(model)
    elif make: replace_linears(model, make, names)
    add_lora(prepare_for_kbit_training(model, gradient_checkpointing=False), R, ALPHA)
    assert list(lora_layers(model)) == names and block_linears(model) == []  # adapted layers are not adapted again
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_lora(model, batches(), 5, lr=1e-2, progress=False)
    after = model.state_dict()
    changed = {k for k in after if not same_bits(after[k], before[k])}
    assert changed and all('.lora_A.' in k or '.lora_B.' in k for k in changed), sorted(changed)[:5]
    assert [n for n, p in model.named_parameters() if 'lora_' not in n and (p.requires_grad or p.grad is not None)] == []
    assert trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n)

def test_bfloat16_adapters_and_init():
    base = NF4Linear.from_linear(nn.Linear(128, 64), 64, 'nf4', True)
    lora = LoRALinear(base, R, ALPHA, dtype=torch.bfloat16)
    x = torch.randn(3, 128)
    assert lora.lora_A.weight.dtype == torch.bfloat16 and lora(x).dtype == torch.float32
    assert torch.equal(lora(x), base(x))  # B = 0
    assert lora.lora_A.weight.abs().max() <= 1 / math.sqrt(128)

def test_prepare_casts_16bit_and_checkpoints():
    model = tiny_models.build('llama').to(torch.bfloat16)
    prepare_for_kbit_training(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert trainable_parameters(model) == 0 and {b.gradient_checkpointing for b in model.model.layers} == {True}
    add_lora(model, R, ALPHA)
    losses = train_lora(model, batches(), 3, lr=1e-2, progress=False)  # checkpointed backward reaches the adapters
    assert losses[-1] < losses[0]

def test_saved_adapters_load_in_peft_and_ours(tmp_path):
    _, ours = twins(random_b=True)
    save_adapters(ours, tmp_path)
    config = json.loads((tmp_path/'adapter_config.json').read_text())
    assert config['peft_type'] == 'LORA' and config['r'] == R and config['lora_alpha'] == ALPHA
    assert 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in adapter_state_dict(ours)
    x = batches()[0]
    loaded_peft = peft.PeftModel.from_pretrained(to_bnb_nf4(tiny_models.build('llama')), tmp_path)
    loaded_ours = load_adapters(to_bnb_nf4(tiny_models.build('llama')), tmp_path)
    expected = training_path_logits(ours, x)
    torch.testing.assert_close(training_path_logits(loaded_peft, x), expected, rtol=0, atol=FORWARD_ATOL)
    assert torch.equal(training_path_logits(loaded_ours, x), expected)
    assert all(same_bits(a, b) for a, b in zip(adapter_state_dict(loaded_ours).values(), adapter_state_dict(ours).values()))

def test_lr_schedule():
    assert [lr_factor(s, 10, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert math.isclose(lr_factor(6, 10, 2), 0.5) and lr_factor(9, 10, 2, 'constant') == 1.0

@pytest.mark.parametrize('kwargs, error, words', [
    (dict(r=0), ValueError, 'r must be >= 1'), (dict(r=2.0), TypeError, 'r must be an int'),
    (dict(alpha=0), ValueError, 'alpha must be > 0'), (dict(alpha=-1.0), ValueError, 'alpha must be > 0'),
    (dict(dropout=1.0), ValueError, 'dropout must lie in [0, 1)'), (dict(dropout=-0.1), ValueError, 'dropout must lie in [0, 1)'),
    (dict(targets=['q_proj', 'qproj']), ValueError, "targets ['qproj'] match no linear layer"),
    (dict(targets='q_proj'), TypeError, "targets must be 'all-linear' or a list"),
])
def test_bad_settings(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        add_lora(tiny_models.build('llama'), **{**dict(r=R, alpha=ALPHA), **kwargs})

def test_unfrozen_base_and_nan_loss():
    with pytest.raises(ValueError, match='base_layer must be frozen'): LoRALinear(nn.Linear(8, 8))
    model = add_lora(tiny_models.build('llama'), R, ALPHA)
    with torch.no_grad(): model.model.layers[0].mlp.down_proj.lora_B.weight.fill_(float('nan'))
    with pytest.raises(ValueError, match='the loss is nan at step 1'): train_lora(model, batches(), 3, progress=False)
    model = add_lora(tiny_models.build('llama'), R, ALPHA)
    with torch.no_grad(): model.model.layers[0].mlp.down_proj.lora_A.weight.fill_(1e30)
    with pytest.raises(ValueError, match=r'at step \d'): train_lora(model, batches(), 3, lr=10.0, progress=False)
    with pytest.raises(ValueError, match='no trainable parameters'): train_lora(tiny_models.build('llama').requires_grad_(False), batches(), 2)
    with pytest.raises(ValueError, match='no LoRA adapters'): adapter_config(tiny_models.build('llama'))

def random_adapters(model):
    "Rank-R adapters on every block linear with a random B, so that the update is not zero."
    add_lora(model, R, ALPHA)
    with torch.no_grad():
        for layer in lora_layers(model).values(): layer.lora_B.weight.normal_(std=0.05)
    return model

def test_merge_float_equals_base_plus_update():
    model = random_adapters(tiny_models.build('llama'))
    layer = model.model.layers[1].self_attn.o_proj
    expected_weight = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(merged_linear(layer).weight, expected_weight, rtol=0, atol=1e-6)
    x = batches()[0]
    with torch.no_grad():
        before = model(input_ids=x).logits
        merge_lora(model)
        assert lora_layers(model) == {} and type(model.model.layers[1].self_attn.o_proj) is nn.Linear
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=1e-4)

@pytest.mark.parametrize('make', [lambda l: NF4Linear.from_linear(l, 64, 'nf4', True),
                                  lambda l: QuantLinear.from_linear(l, 4, 32)], ids=['nf4_dq', 'int4'])
def test_merge_requantizes_under_the_contract(make):
    model = tiny_models.build('llama')
    replace_linears(model, lambda n, l: make(l), tiny_models.block_linears(model, 'llama'))
    random_adapters(model)
    layer = model.model.layers[0].mlp.down_proj
    base, merged = layer.base_layer, merged_linear(layer)
    torch.testing.assert_close(merged.weight, float_weight(base) + lora_delta(layer), rtol=0, atol=0)
    merge_lora(model)
    new = model.model.layers[0].mlp.down_proj
    assert type(new) is type(base) and new.config() == base.config() and new.bits_per_weight == base.bits_per_weight
    assert torch.equal(float_weight(new), float_weight(make(merged)))
    assert not torch.equal(float_weight(new), float_weight(base))

def test_gptq_base_trains_bit_identical_and_merge_needs_calibration():
    from quantcourse.api import quantize_model
    model = tiny_models.build('llama')
    quantize_model(model, 'gptq', calibration=batches(2, 2, 32, seed=1).view(4, 32), bits=4, group_size=32, progress=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(prepare_for_kbit_training(model, gradient_checkpointing=False), R, ALPHA)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == 'GPTQLinear'
    losses = train_lora(model, batches(), 4, lr=1e-2, progress=False)
    assert losses[-1] < losses[0]
    after = {k.replace('.base_layer', ''): v for k, v in model.state_dict().items() if 'lora_' not in k}
    assert after.keys() == base.keys() and all(same_bits(after[k], base[k]) for k in base)
    with pytest.raises(ValueError, match=re.escape('merge_lora(model, requantize=False)')): merge_lora(model)
    merge_lora(model, requantize=False)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear

def test_training_memory_counts_real_tensors():
    model = tiny_models.build('llama')
    arch = arch_from_config(model.config)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    for setup, optimizer in [('full', 'adamw'), ('lora', 'adamw'), ('qlora', 'adamw'), ('qlora', 'adamw8bit')]:
        m = tiny_models.build('llama')
        if setup == 'qlora':
            replace_linears(m, lambda n, l: NF4Linear.from_linear(l, 64, 'nf4', True), tiny_models.block_linears(m, 'llama'))
        if setup == 'full': m.requires_grad_(True)
        else: add_lora(m, R, ALPHA, targets=['q_proj', 'down_proj'])
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params) if optimizer == 'adamw' else bnb.optim.AdamW8bit(params)
        x = batches()[0]
        m(input_ids=x, labels=x).loss.backward(); grads = size(p.grad for p in params); opt.step()
        states = [v for s in opt.state.values() for k, v in s.items() if k in ('exp_avg', 'exp_avg_sq', 'state1', 'state2', 'absmax1', 'absmax2')]
        buffers = [b for mod in m.modules() if isinstance(mod, QuantizedLinear) for n, b in mod.named_buffers(recurse=False) if n != 'qconfig']
        counted = dict(weights=size(p for n, p in m.named_parameters() if 'lora_' not in n) + size(buffers),
                       adapters=size(p for n, p in m.named_parameters() if 'lora_' in n), gradients=grads, optimizer=size(states))
        formula = training_memory(arch, setup, R, ['q_proj', 'down_proj'], optimizer=optimizer, nbytes=4)
        assert {k: formula[k] for k in counted} == counted, (setup, optimizer)

def test_training_memory_bad_input():
    for kwargs, error, words in [(dict(setup='qlora4'), ValueError, 'setup must be one of'),
                                 (dict(optimizer='sgd'), ValueError, 'optimizer must be one of'),
                                 (dict(targets=['qproj']), ValueError, "targets must be 'all-linear' or names"),
                                 (dict(r=0), ValueError, 'r must be >= 1')]:
        with pytest.raises(error, match=re.escape(words)): training_memory('Llama-3 8B', **kwargs)
    with pytest.raises(ValueError, match='is unknown'): training_memory('Llama-9 1B')
    with pytest.raises(TypeError, match='arch must be an Arch'): training_memory(3)


def test_lora_over_the_4bit_autograd_function_matches_the_reference_path():
    "QLoRA through NF4Linear's CUDA path (linear_4bit, forced on the CPU): same output and grads of A, B and x."
    from quantcourse.nf4 import FAST_PATHS, linear_4bit
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(96, 64), 64, 'nf4', True, compute_dtype=torch.float32)
    lora = LoRALinear(base, r=R, alpha=ALPHA)
    with torch.no_grad(): lora.lora_B.weight.normal_(std=0.1)
    x = torch.randn(3, 5, 96)
    def run():
        lora.zero_grad(); xi = x.clone().requires_grad_()
        y = lora(xi); (y * torch.linspace(-1, 1, 64)).sum().backward()
        return y.detach(), lora.lora_A.weight.grad.clone(), lora.lora_B.weight.grad.clone(), xi.grad
    reference = run()
    FAST_PATHS['cpu'] = linear_4bit
    try: fast = run()
    finally: del FAST_PATHS['cpu']
    for a, b in zip(fast, reference): torch.testing.assert_close(a, b, rtol=0, atol=GRAD_ATOL)
