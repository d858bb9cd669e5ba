"AWQ: batched losses against the naive loop, exact folding on every architecture, the search, faults."
import copy, math, warnings
import pytest, torch
from torch import nn
from quantcourse import awq
from quantcourse.awq import (awq_model, awq_block, scale_groups, record_block, grid_losses, search_scale,
                             ScaleGroup, channel_means, awq_scales, input_gram, gram_losses, onednn_linear,
                             onednn_linears)
from quantcourse.core import decoder_blocks, block_inputs, linear_groups
from quantcourse.api import quantize_model
from tiny_models import ARCHS, build, calibration as tiny_calibration

ARCH_NAMES = [a for a in ARCHS if ARCHS[a].smoothable]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block_and_groups(model, ids, index=0, **settings):
    _, blocks = decoder_blocks(model)
    hidden, kwargs = block_inputs(model, ids)
    for i in range(index): hidden = blocks[i](hidden, **kwargs[i]); hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    block = copy.deepcopy(blocks[index])
    return block, hidden, kwargs[index], scale_groups(block, linear_groups(block, hidden, kwargs[index]), **settings)


def test_batched_losses_equal_one_call_per_candidate():
    model, ids = build('llama'), tiny_calibration(4, 32)
    block, hidden, kwargs, groups = _block_and_groups(model, ids, gqa_v_to_o=True)
    inputs, replays = record_block(block, hidden, kwargs, [g.names[0] for g in groups], [g.inspect for g in groups])
    for g in groups:
        replay = replays[g.inspect]
        linears = {n.removeprefix(g.inspect).lstrip('.'): block.get_submodule(n) for n in g.names}
        tries = [{n: l.weight * (1 + 0.05 * k) for n, l in linears.items()} for k in range(1, 6)]
        key = lambda n: f'{n}.weight' if n else 'weight'
        naive = [(replay({key(n): w for n, w in t.items()}) - replay.output).pow(2).mean().item() for t in tries]
        got = grid_losses(replay, linears, tries)
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(got, naive)), (g.inspect, got, naive)


def test_gram_losses_equal_the_direct_ones():
    "sum((delta G) * delta) / out with G = X^T X / n is the mean of (X delta^T)^2, with and without oneDNN."
    torch.manual_seed(0)
    x, delta = torch.randn(2, 150, 48) * 3, torch.randn(5, 16, 48) * 0.1
    direct = [(x.reshape(-1, 48) @ d.T).pow(2).mean().item() for d in delta]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = gram_losses(input_gram(x), delta)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, direct)), (grad, got, direct)


def test_onednn_linear_equals_f_linear_and_falls_back():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 40), torch.randn(24, 40), torch.randn(24)
    with torch.no_grad():
        torch.testing.assert_close(onednn_linear(x, w, b), nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(onednn_linear(x.double(), w.double()), nn.functional.linear(x.double(), w.double()))
    w.requires_grad_()
    assert onednn_linear(x, w).grad_fn is not None  # with gradients on: F.linear, so backward works


def test_onednn_linears_put_back_every_forward():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
        with onednn_linears(model):
            with onednn_linears(model):  # nested: the inner one leaves the outer's in place
                torch.testing.assert_close(model(x), expected)
            assert all('forward' in vars(m) for m in (model[0], model[2]))
        with pytest.raises(RuntimeError, match='inside'), onednn_linears(model): raise RuntimeError('inside')
    assert not any('forward' in vars(m) for m in model.modules())


def test_onednn_search_chooses_the_same_alphas(monkeypatch):
    "The grid with oneDNN's products and with F.linear: the same losses to float rounding, the same alphas."
    model, ids = build('llama'), tiny_calibration(4, 32)
    block, hidden, kwargs, groups = _block_and_groups(model, ids, gqa_v_to_o=True)
    inputs, replays = record_block(block, hidden, kwargs, [g.names[0] for g in groups], [g.inspect for g in groups])
    search = lambda g: search_scale(block, g, inputs[g.names[0]], replays[g.inspect], bits=3, group_size=32)
    fast = [search(g) for g in groups]
    monkeypatch.setattr(awq, '_ONEDNN', False)
    for g, (_, alpha, losses) in zip(groups, fast):
        _, plain_alpha, plain = search(g)
        assert alpha == plain_alpha and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses, plain))


@pytest.mark.parametrize('arch', ARCH_NAMES)
def test_folding_keeps_the_function(arch):
    "Scales only (no clip): the float model's logits are unchanged to float tolerance, on every architecture."
    model, ids = build(arch), tiny_calibration(4, 32)
    folded = copy.deepcopy(model)
    factors = awq_model(folded, ids, progress=False, gqa_v_to_o=True)
    assert any(len(f) for f in factors)
    with torch.no_grad(): a, b = model(ids, use_cache=False).logits, folded(ids, use_cache=False).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), folded.named_parameters()) if not torch.equal(p, q)]
    assert changed, 'the factors were folded somewhere'


def test_tied_value_factors_fold_under_grouped_query_attention():
    model, ids = build('llama'), tiny_calibration(4, 32)  # 4 query heads, 2 key/value heads
    block, hidden, kwargs, groups = _block_and_groups(model, ids, gqa_v_to_o=True)
    tied = next(g for g in groups if g.kind == 'heads')
    assert (tied.source, tied.names, tied.repeat, tied.head_dim) == ('self_attn.v_proj', ['self_attn.o_proj'], 2, 32)
    assert not any(g.kind == 'heads' for g in scale_groups(block, linear_groups(block, hidden, kwargs)))
    before = block(hidden, **kwargs); before = before[0] if isinstance(before, tuple) else before
    awq.fold_group(block, tied, torch.rand(64) + 0.5)
    after = block(hidden, **kwargs); after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_search_is_never_worse_than_round_to_nearest():
    model, ids = build('qwen2'), tiny_calibration(4, 32)
    block, hidden, kwargs, groups = _block_and_groups(model, ids)
    inputs, replays = record_block(block, hidden, kwargs, [g.names[0] for g in groups], [g.inspect for g in groups])
    for g in groups:
        factors, alpha, losses = search_scale(block, g, inputs[g.names[0]], replays[g.inspect], bits=3, group_size=32)
        assert losses[int(alpha * 20)] == min(losses) <= losses[0] and factors.shape == (block.get_submodule(g.names[0]).in_features,)


@pytest.mark.parametrize('coarse', [2, 3])
def test_coarse_search_measures_the_coarse_grid_then_next_to_its_best(coarse):
    "coarse=c: alphas 0, c, 2c, ..., then those within c-1 of the best of them; the same losses as the full grid."
    model, ids = build('llama'), tiny_calibration(4, 32)
    block, hidden, kwargs, groups = _block_and_groups(model, ids)
    inputs, replays = record_block(block, hidden, kwargs, [g.names[0] for g in groups], [g.inspect for g in groups])
    for g in groups:
        args = (block, g, inputs[g.names[0]], replays[g.inspect])
        _, _, full = search_scale(*args, bits=3, group_size=32)
        _, alpha, losses = search_scale(*args, bits=3, group_size=32, coarse=coarse)
        tried = [i for i, loss in enumerate(losses) if loss is not None]
        first_best = min(range(0, 20, coarse), key=full.__getitem__)
        near = range(max(0, first_best - coarse + 1), min(20, first_best + coarse))
        assert tried == sorted(set(range(0, 20, coarse)) | set(near))
        torch.testing.assert_close(torch.tensor([losses[i] for i in tried]), torch.tensor([full[i] for i in tried]))
        assert alpha == min(tried, key=full.__getitem__) / 20


def test_a_nan_loss_skips_that_alpha_with_a_warning(monkeypatch):
    model, ids = build('llama'), tiny_calibration(2, 16)
    block, hidden, kwargs, groups = _block_and_groups(model, ids)
    inputs, replays = record_block(block, hidden, kwargs, [groups[0].names[0]], [groups[0].inspect])
    monkeypatch.setattr(awq, 'grid_losses', lambda *a: [float('nan'), 1.0, 0.5, float('inf')])
    with pytest.warns(UserWarning, match=r"alpha=0.0 gives a loss of nan at model.layers.0.self_attn"):
        _, alpha, _ = search_scale(block, groups[0], inputs[groups[0].names[0]], replays[groups[0].inspect], grid=4,
                                   group_size=32, label='model.layers.0.')
    assert alpha == 0.5
    monkeypatch.setattr(awq, 'grid_losses', lambda *a: [float('nan')] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='every alpha gives a NaN or infinite loss at self_attn'):
            search_scale(block, groups[0], inputs[groups[0].names[0]], replays[groups[0].inspect], grid=4, group_size=32)


def test_reported_baseline_is_rtn_of_the_unscaled_layer():
    "Block 0 sees the same inputs in both runs: AWQ's rtn_error is RTN's own error on the unscaled layer."
    model, ids = build('llama'), tiny_calibration(4, 32)
    awq_rows = {r['layer']: r for r in quantize_model(copy.deepcopy(model), 'awq', calibration=ids, progress=False,
                                                      group_size=32).rows}
    rtn_rows = {r['layer']: r for r in quantize_model(copy.deepcopy(model), 'rtn', calibration=ids, progress=False,
                                                      group_size=32).rows}
    for name in ('model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj'):
        assert math.isclose(awq_rows[name]['rtn_error'], rtn_rows[name]['error'], rel_tol=1e-4)
    assert sum(r['error'] < r['rtn_error'] for r in awq_rows.values()) > len(awq_rows) / 2


@pytest.mark.parametrize('settings, message', [(dict(grid=1), 'grid must be'), (dict(grid=2.5), 'grid must be'),
                                               (dict(group_size=48), 'does not divide'), (dict(bits=1), 'bits'),
                                               (dict(coarse=0), 'coarse must be')])
def test_bad_settings_change_nothing(settings, message):
    model, ids = build('llama'), tiny_calibration(2, 16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=message):
        quantize_model(model, 'awq', calibration=ids, progress=False, **settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_scales_and_means_checks():
    with pytest.raises(ValueError, match='NaN or Inf'): channel_means(torch.tensor([[1.0, float('nan')]]))
    s = awq_scales(torch.tensor([0.0, 1.0, 4.0]), 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


def test_awq_on_a_bfloat16_model():
    "A bfloat16 model is searched and scaled in bfloat16 (the factors take the weights' dtype)."
    model = build('llama').to(torch.bfloat16)
    calibration = tiny_calibration()
    quantize_model(model, 'awq', calibration=calibration, group_size=16, clip=True, duo=True,
                   progress=False)
    with torch.no_grad(): logits = model(calibration).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
