"The one quantized-layer contract, over every registered method: weight object, layer, state_dict, config, bad input."
import json, math
import pytest, torch
from torch import nn
from safetensors.torch import save_file, load_file
from quantcourse.core import QuantizedLinear, METHODS, layer_classes
import quantcourse.api  # registers every method
from quantcourse.api import _accepted

def make(method: str, linear: nn.Linear, x: torch.Tensor, **settings) -> QuantizedLinear:
    "A layer of `method` for `linear`, through the registry, with the statistics of inputs `x` where it needs them."
    spec = METHODS[method]
    settings = {**spec.defaults, **settings}
    statistics = spec.collect(x) if spec.collect else x
    return spec.quantize(linear, statistics, **_accepted(spec.quantize, settings))

def linear_and_inputs(in_features=128, out_features=48, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
        if bias: linear.bias.copy_(torch.randn(out_features, generator=gen) * 0.1)
    return linear, torch.randn(64, in_features, generator=gen)

METHOD_NAMES = sorted(METHODS)

def test_every_layer_class_is_registered():
    assert set(layer_classes()) == {'rtn', 'gptq', 'nf4', 'w8a8', 'llm_int8', 'gguf', 'hqq', 'rotated', 'mxfp4', 'w4a4'}
    assert all(issubclass(c, QuantizedLinear) for c in layer_classes().values())

@pytest.mark.parametrize('method', METHOD_NAMES)
@pytest.mark.parametrize('bias', [True, False])
def test_weight_object(method, bias):
    linear, x = linear_and_inputs(bias=bias)
    weight = make(method, linear, x).weight()
    for dtype in (torch.float32, torch.bfloat16):
        w = weight.dequantize(dtype)
        assert w.shape == linear.weight.shape and w.dtype == dtype and torch.isfinite(w).all()
    relative = ((weight.dequantize() - linear.weight).norm() / linear.weight.norm()).item()
    assert relative < 0.25  # GPTQ trades weight error for output error: looser than round-to-nearest's
    stored = sum(t.numel() * t.element_size() for t in weight.tensors().values())
    assert weight.bits_per_weight == 8 * stored / linear.weight.numel()
    json.dumps(weight.config())

@pytest.mark.parametrize('method', METHOD_NAMES)
def test_layer_contract(method):
    linear, x = linear_and_inputs()
    layer = make(method, linear, x)
    cls = layer_classes()[layer.method]
    assert isinstance(layer, cls)
    assert layer.bits_per_weight == layer.weight().bits_per_weight
    config = layer.config()
    assert json.loads(json.dumps(config)) == config and config['method'] == layer.method
    with torch.no_grad():
        y, expected = layer(x.view(4, 16, -1)), linear(x.view(4, 16, -1))
        assert y.shape == expected.shape and y.dtype == x.dtype
        # computes like the nn.Linear it replaced (W4A4 rounds the inputs to 4 bits too)
        assert ((y - expected).norm() / expected.norm()).item() < (0.25 if method == 'w4a4' else 0.15)
        if layer.weight_only:  # the layer is its dequantized weight times the input, and nothing else
            torch.testing.assert_close(y, nn.functional.linear(x.view(4, 16, -1), layer.weight().dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
        assert layer(x[:0]).shape == (0, linear.out_features)                 # an empty batch, like nn.Linear
        assert layer(x.view(4, 16, -1)[:, :0]).shape == (4, 0, linear.out_features)

@pytest.mark.parametrize('method', METHOD_NAMES)
def test_from_linear_and_from_config(method, tmp_path):
    "Each layer class builds from an nn.Linear with keyword settings, and an empty one from `config()` loads its state."
    linear, x = linear_and_inputs()
    layer = make(method, linear, x)
    cls = layer_classes()[layer.method]
    settings = {k: v for k, v in layer.config().items() if k not in ('method', 'in_features', 'out_features', 'bias', 'permuted', 'dtype')}
    if cls.__name__ == 'GPTQLinear': settings['hessian'] = METHODS['gptq'].collect(x)
    if settings.get('base') == 'gptq': settings['hessian'] = METHODS['gptq_rot'].collect(x)
    if 'compute_dtype' in settings: settings['compute_dtype'] = None
    again = cls.from_linear(linear, **settings)
    assert type(again) is cls
    save_file(layer.state_dict(), str(tmp_path/'layer.safetensors'))
    fresh = cls.from_config(layer.config())
    fresh.load_state_dict(load_file(str(tmp_path/'layer.safetensors')))
    with torch.no_grad(): assert torch.equal(fresh(x), layer(x))
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), fresh.state_dict().values()))

OTHER_SETTINGS = {'rtn': dict(bits=3), 'gptq': dict(bits=3), 'nf4': dict(quant_type='fp4'), 'fp4': dict(quant_type='nf4'),
                  'w8a8': dict(granularity='tensor'), 'llm_int8': dict(threshold=None), 'smoothquant': dict(granularity='tensor'),
                  'awq': dict(bits=3), 'awq_gptq': dict(bits=3),
                  'hqq': dict(bits=3), 'rtn_rot': dict(bits=3), 'hqq_rot': dict(bits=3), 'gptq_rot': dict(bits=3), 'mxfp4': dict(fmt='nvfp4'), 'nvfp4': dict(fmt='mxfp4'),
                  'w4a4': dict(rotate_input=True),
                  **{f'gguf_{t}': dict(type_name='Q8_0' if t != 'q8_0' else 'Q4_0') for t in ('q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0')}}

@pytest.mark.parametrize('method', METHOD_NAMES)
def test_state_with_other_settings_is_refused(method):
    linear, x = linear_and_inputs()
    layer = make(method, linear, x)
    other = dict(layer.config(), **OTHER_SETTINGS[method])
    with pytest.raises((ValueError, RuntimeError), match='saved from a layer with|size mismatch'):
        layer_classes()[layer.method].from_config(other).load_state_dict(layer.state_dict())

@pytest.mark.parametrize('method', METHOD_NAMES)
def test_bad_inputs_to_the_layer(method):
    linear, x = linear_and_inputs()
    layer = make(method, linear, x)
    with pytest.raises(TypeError, match='floating-point'): layer(torch.ones(2, 128, dtype=torch.long))
    with pytest.raises(TypeError, match='torch.Tensor'): layer([[1.0] * 128])
    with pytest.raises(ValueError, match='must have 128 features'): layer(torch.ones(2, 64))

@pytest.mark.parametrize('method', METHOD_NAMES)
@pytest.mark.parametrize('magnitude', [1e-40, 1e-37, 1e-3, 1e4])
def test_extreme_magnitudes(method, magnitude):
    "Tiny (even subnormal) and large weights quantize without an internal error or a silent NaN; too large ones are refused."
    linear, x = linear_and_inputs()
    with torch.no_grad(): linear.weight.div_(linear.weight.abs().max()).mul_(magnitude)
    layer = make(method, linear, x)
    assert torch.isfinite(layer.weight().dequantize()).all()
    with torch.no_grad(): assert torch.isfinite(layer(x)).all()

@pytest.mark.parametrize('method', ['rtn', 'gptq', 'w8a8', 'smoothquant'])
def test_weights_beyond_float16_scales_are_refused_clearly(method):
    linear, x = linear_and_inputs()
    with torch.no_grad(): linear.weight.mul_(1e30)
    with pytest.raises(ValueError, match='does not fit in torch.float16'): make(method, linear, x)

@pytest.mark.parametrize('magnitude', [1e-44, 1e-40, 1e-38, 3e38])
def test_double_quantization_at_extreme_magnitudes(magnitude):
    "The 8-bit code of subnormal block scales divides instead of multiplying by an infinite reciprocal; huge ones keep a finite mean."
    linear, x = linear_and_inputs()
    with torch.no_grad(): linear.weight.div_(linear.weight.abs().max()).mul_(magnitude)
    layer = make('nf4', linear, x, double_quant=True)
    assert torch.isfinite(layer.weight().dequantize()).all()
