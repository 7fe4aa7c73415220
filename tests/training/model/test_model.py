"""SessionModel: config round trip, masking invariants, padding invariance, packing,
tracing, dropout and the XLNet subclass."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import XLNetModel

from training.model import (
    FastDropout,
    ModelConfig,
    SessionModel,
    mask_positions,
    pack_sessions,
)
from training.names import FIRST_REAL_ID

ITEMS, CATS = 40, 9
FEATURES = {"item_id-list": ITEMS, "category-list": CATS}
CONT = ["age_days-list", "weekday_sin-list"]


def make_cfg(**kw) -> ModelConfig:
    return ModelConfig(categorical=dict(FEATURES), continuous=list(CONT), **kw)


def make_batch(lengths: list[int], L: int = 8, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    lens = torch.tensor(lengths)
    real = torch.arange(L)[None, :] < lens[:, None]
    feats = {
        "item_id-list": torch.randint(FIRST_REAL_ID, ITEMS, (n, L), generator=g) * real,
        "category-list": torch.randint(FIRST_REAL_ID, CATS, (n, L), generator=g) * real,
        "age_days-list": torch.rand(n, L, generator=g) * real,
        "weekday_sin-list": torch.rand(n, L, generator=g) * real,
    }
    return feats, lens


def pad_to(feats: dict[str, torch.Tensor], L: int) -> dict[str, torch.Tensor]:
    return {k: torch.nn.functional.pad(v, (0, L - v.shape[1])) for k, v in feats.items()}


@pytest.fixture(scope="module")
def model() -> SessionModel:
    torch.manual_seed(0)
    return SessionModel(make_cfg()).eval()


# --- config ---------------------------------------------------------------------


def test_config_json_round_trip():
    cfg = make_cfg(mask_prob=0.2, objective="clm")
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.n_items == ITEMS
    assert again.feature_names == [*FEATURES, *CONT]


def test_config_from_schema():
    schema = {
        "max_sequence_length": 12,
        "item_list": "item_id-list",
        "categorical": FEATURES,
        "continuous": CONT,
    }
    cfg = ModelConfig.from_schema(schema, n_layer=1)
    assert cfg.max_len == 12 and cfg.n_layer == 1 and cfg.categorical == FEATURES


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"objective": "plm"}, "objective"),
        ({"mask_prob": 0.0}, "mask_prob"),
        ({"mask_prob": 1.0}, "mask_prob"),
        ({"n_head": 3}, "multiple"),
        ({"item_feature": "nope"}, "item_feature"),
    ],
)
def test_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        make_cfg(**kw)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**make_cfg().to_dict(), "surprise": 1})


# --- masking ----------------------------------------------------------------------


@pytest.mark.parametrize("prob", [0.01, 0.15, 0.6, 0.99])
def test_masking_invariants(prob):
    g = torch.Generator().manual_seed(1)
    B, L = 400, 12
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    items = torch.randint(FIRST_REAL_ID, ITEMS, (B, L), generator=g)
    items[torch.rand(B, L, generator=g) < 0.1] = 2  # some OOV items: never masked
    items[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    m = mask_positions(items, lengths, prob, g)
    maskable = (torch.arange(L)[None, :] < lengths[:, None]) & (items >= FIRST_REAL_ID)
    n_maskable, n_masked = maskable.sum(1), m.masked.sum(1)
    assert not (m.masked & ~maskable).any()  # only real positions with real items
    assert (n_masked[n_maskable >= 2] >= 1).all()  # at least one
    assert (n_masked[n_maskable >= 2] < n_maskable[n_maskable >= 2]).all()  # never all
    assert (n_masked[n_maskable < 2] == 0).all()  # nothing to condition on: none
    assert torch.equal(m.targets, items[m.masked])


def test_masking_rate_and_determinism():
    B, L = 2000, 20
    lengths = torch.full((B,), L)
    items = torch.full((B, L), FIRST_REAL_ID)
    a = mask_positions(items, lengths, 0.15, torch.Generator().manual_seed(5))
    b = mask_positions(items, lengths, 0.15, torch.Generator().manual_seed(5))
    assert torch.equal(a.masked, b.masked)
    rate = a.masked.float().mean().item()
    assert 0.15 < rate < 0.2  # Bernoulli(0.15) plus one forced position per session


def test_masking_the_last_item_only():
    """last = p: a share p of the sessions is masked at its last maskable position only (BERT4Rec's
    next-item samples), the rest as before; last = 0 draws exactly the masks of the plain call."""
    g = torch.Generator().manual_seed(2)
    B, L = 4000, 12
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    items = torch.randint(FIRST_REAL_ID, ITEMS, (B, L), generator=g)
    items[torch.rand(B, L, generator=g) < 0.1] = 2  # OOV items: never masked, may end a session
    items[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    maskable = (torch.arange(L)[None, :] < lengths[:, None]) & (items >= FIRST_REAL_ID)
    two = maskable.sum(1) >= 2
    final = torch.where(maskable, torch.arange(L)[None, :], -1).max(1).values  # last maskable position
    only_final = torch.zeros(B, L, dtype=torch.bool)
    only_final[two, final[two]] = True

    plain = mask_positions(items, lengths, 0.3, torch.Generator().manual_seed(7)).masked
    zero = mask_positions(items, lengths, 0.3, torch.Generator().manual_seed(7), last=0.0).masked
    assert torch.equal(plain, zero)
    every = mask_positions(items, lengths, 0.3, torch.Generator().manual_seed(7), last=1.0).masked
    assert torch.equal(every[two], only_final[two]) and not every[~two].any()
    some = mask_positions(items, lengths, 0.3, torch.Generator().manual_seed(7), last=0.4).masked
    assert not (some & ~maskable).any() and (some[two].sum(1) >= 1).all()
    is_last_only = (some == only_final).all(1)[two].float().mean().item()
    base = (plain == only_final).all(1)[two].float().mean().item()  # Bernoulli alone, rarely
    assert 0.36 < is_last_only - 0.6 * base < 0.44
    changed = ~(some == plain).all(1)
    assert (some[changed] == only_final[changed]).all()  # a session is either as before or last-only


def test_the_model_draws_its_masks_at_its_mask_prob_and_mask_last():
    """SessionModel.draw_masks (what training, stacking and `loss` draw) reads cfg.mask_prob and cfg.mask_last."""
    items = torch.full((300, 10), FIRST_REAL_ID)
    lengths = torch.full((300,), 10)
    for last in (0.0, 1.0):
        m = SessionModel(make_cfg(objective="mlm", mask_prob=0.3, mask_last=last))
        got = m.draw_masks(items, lengths, torch.Generator().manual_seed(3)).masked
        want = mask_positions(items, lengths, 0.3, torch.Generator().manual_seed(3), last=last).masked
        assert torch.equal(got, want)
    assert got[:, -1].all() and got.sum() == 300  # mask_last 1: each session's last item only


# --- scores -----------------------------------------------------------------------


def test_scores_shape_and_special_ids(model):
    feats, lengths = make_batch([3, 1, 8, 5])
    with torch.no_grad():
        s = model.next_item_scores(feats, lengths)
    assert s.shape == (4, ITEMS) and s.dtype == torch.float32
    assert torch.isneginf(s[:, :FIRST_REAL_ID]).all()
    assert torch.isfinite(s[:, FIRST_REAL_ID:]).all()


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_padding_does_not_change_scores(objective):
    """The same session alone, with more padding, and batched with longer sessions: same scores."""
    torch.manual_seed(0)
    m = SessionModel(make_cfg(objective=objective)).eval()
    feats, lengths = make_batch([3, 8, 1, 6, 8], L=8)
    with torch.no_grad():
        batched = m.next_item_scores(feats, lengths)
        wider = m.next_item_scores(pad_to(feats, 20), lengths)
        for i in range(len(lengths)):
            n = int(lengths[i])
            alone = m.next_item_scores({k: v[i : i + 1, :n] for k, v in feats.items()}, lengths[i : i + 1])
            fin = torch.isfinite(alone)
            assert torch.allclose(alone[fin], batched[i : i + 1][fin], atol=1e-5, rtol=0)
            assert torch.allclose(alone[fin], wider[i : i + 1][fin], atol=1e-5, rtol=0)


def test_garbage_in_padding_is_ignored(model):
    feats, lengths = make_batch([2, 5], L=8)
    noisy = {k: v.clone() for k, v in feats.items()}
    pad = torch.arange(8)[None, :] >= lengths[:, None]
    noisy["item_id-list"][pad] = 7
    noisy["age_days-list"][pad] = 3.0
    with torch.no_grad():
        a, b = model.next_item_scores(feats, lengths), model.next_item_scores(noisy, lengths)
    fin = torch.isfinite(a)
    # position `lengths` becomes the mask slot; everything after it is hidden by the attention mask
    assert torch.allclose(a[fin], b[fin], atol=1e-5, rtol=0)


def test_empty_input_gets_scores(model):
    feats, _ = make_batch([1, 1])
    with torch.no_grad():
        s = model.next_item_scores({k: v * 0 for k, v in feats.items()}, torch.tensor([0, 0]))
    assert torch.isfinite(s[:, FIRST_REAL_ID:]).all()


def test_trace_matches_eager_for_other_shapes(model):
    feats, lengths = make_batch([3, 8, 1, 5], L=8)
    names = model.cfg.feature_names

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            return self.m.next_item_scores(dict(zip(names, args[:-1])), args[-1])

    w = Wrapper(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(w, (*[feats[n] for n in names], lengths))
        other, olen = make_batch([20, 2, 7], L=20, seed=3)
        args = (*[other[n] for n in names], olen)
        assert torch.allclose(traced(*args), w(*args), atol=1e-6, rtol=0, equal_nan=True)


# --- training loss and packing ---------------------------------------------------------


def test_packing_layout():
    feats, lengths = make_batch([5, 2, 3, 1, 4], L=6)
    p = pack_sessions(feats, lengths)
    assert p.segment.shape[1] == 5  # rows as wide as the longest session
    for s, n in enumerate(lengths.tolist()):
        where = p.segment == s + 1
        assert int(where.sum()) == n
        assert torch.equal(p.feats["item_id-list"][where], feats["item_id-list"][s, :n])
    assert int((p.segment > 0).sum()) == int(lengths.sum())
    assert p.segment.shape[0] == 3  # first-fit decreasing: [5], [4, 1], [3, 2]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_packed_loss_equals_padded_loss(objective):
    torch.manual_seed(0)
    m = SessionModel(make_cfg(objective=objective)).eval()  # eval: no dropout
    feats, lengths = make_batch([5, 2, 3, 1, 4, 8, 2], L=8)
    masking = mask_positions(feats["item_id-list"], lengths, 0.3, torch.Generator().manual_seed(0))
    padded = m.training_loss(feats, lengths, masking=masking)
    grads_padded = torch.autograd.grad(
        padded, [p for p in m.parameters() if p.requires_grad], allow_unused=True
    )
    packed = m.packed_loss(pack_sessions(feats, lengths, masking.masked if objective == "mlm" else None))
    grads_packed = torch.autograd.grad(
        packed, [p for p in m.parameters() if p.requires_grad], allow_unused=True
    )
    assert padded.item() == pytest.approx(packed.item(), abs=1e-5)
    for a, b in zip(grads_padded, grads_packed):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5)


def test_training_loss_trains_every_parameter():
    torch.manual_seed(0)
    m = SessionModel(make_cfg()).train()
    feats, lengths = make_batch([5, 2, 8], L=8)
    loss = m.training_loss(feats, lengths, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    # DDP needs every trainable parameter in the graph
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []


def test_nothing_to_predict_gives_zero_loss():
    torch.manual_seed(0)
    m = SessionModel(make_cfg())
    feats, lengths = make_batch([1, 1])  # one-click sessions: nothing masked
    loss = m.training_loss(feats, lengths, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0
    loss.backward()


# --- building blocks -----------------------------------------------------------------


def test_fast_dropout():
    torch.manual_seed(0)
    d = FastDropout(0.3).train()
    x = torch.ones(200_000)
    y = d(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert torch.equal(d.eval()(x), x)


def test_xlnet_subclass_matches_stock_xlnet(model):
    stock = XLNetModel(model.transformer.config).eval()
    stock.load_state_dict(model.transformer.state_dict())
    x = torch.randn(3, 7, model.cfg.d_model)
    mask = (torch.arange(7)[None, :] < torch.tensor([[7], [3], [1]])).float()
    with torch.no_grad():
        a = stock(inputs_embeds=x, attention_mask=mask).last_hidden_state
        b = model.transformer(inputs_embeds=x, attention_mask=mask).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)


def test_reference_architecture_sizes(model):
    assert model.embeddings["item_id-list"].weight.shape == (ITEMS, 64)
    assert model.input_proj.out_features == 100 and model.mlp.out_features == 64
    c = model.transformer.config
    assert (c.d_model, c.n_head, c.n_layer, c.d_inner, c.attn_type) == (64, 4, 2, 256, "bi")
    assert (c.dropout, c.layer_norm_eps, c.initializer_range) == (0.3, 0.03, 0.01)
    assert model.mask_emb.shape == (100,)


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_fast_dropout_bytes_path(p):
    """p a multiple of 1/256: one 64-bit draw makes seven byte uniforms; the drop rate is p."""
    torch.manual_seed(0)
    d = FastDropout(p).train()
    x = torch.ones(700_001)  # not a multiple of 7
    y = d(x)
    assert abs((y == 0).float().mean().item() - p) < 0.003
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    # every byte column used is uniform: the kept share of each of the 7 columns is 1 - p
    kept = (y[:700_000] != 0).view(-1, 7).float().mean(0)
    assert torch.all((kept - (1 - p)).abs() < 0.01), kept
