"""ModelConfig.repeat_feature: how often a position's item occurs elsewhere in its session, as an input.

Counted over what the position may attend to, never over masked positions (their targets would leak),
per session in packed rows; the same number at inference as in training; zero at the start."""

from __future__ import annotations

import pytest
import torch

from tests.training.model.test_model import make_batch, make_cfg, pad_to
from training.model import SessionModel, mask_positions, pack_sessions
from training.model.packing import PackedSessions
from training.model.repeats import BUCKETS


def counting_model(objective: str) -> SessionModel:
    """A model whose repeat embedding adds the count itself to every input dimension."""
    torch.manual_seed(0)
    m = SessionModel(make_cfg(objective=objective, repeat_feature=True)).eval()
    assert m.repeats is not None
    with torch.no_grad():
        m.repeats.emb.weight.copy_(torch.arange(BUCKETS, dtype=torch.float32)[:, None])
    return m


def counts_of(m: SessionModel, items, segment, visible) -> torch.Tensor:
    x = torch.zeros(*items.shape, m.cfg.d_output)
    return m.repeats(x, items, segment, visible)[..., 0]


def test_counts_per_session_in_a_packed_row_capped_and_unknown_ids_never_match():
    m = counting_model("mlm")
    # one row: session 1 = 5 6 5 5 5 2(OOV) 2(OOV), session 2 = 5 8, then padding
    items = torch.tensor([[5, 6, 5, 5, 5, 2, 2, 5, 8, 0]])
    segment = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 2, 2, 0]])
    visible = segment > 0
    got = counts_of(m, items, segment, visible)
    # 5 occurs 4 times in session 1: 3 others each, capped at 3; OOV never counts; 5 in session 2 is alone
    assert got.tolist() == [[3, 0, 3, 3, 3, 0, 0, 0, 0, 0]]
    masked = torch.tensor([[False, False, True, False, False, False, False, False, False, False]])
    got = counts_of(m, items, segment, visible & ~masked)
    assert got.tolist() == [[2, 0, 0, 2, 2, 0, 0, 0, 0, 0]]  # the masked 5 neither counts nor gets a count


def test_clm_counts_only_earlier_positions():
    m = counting_model("clm")
    items = torch.tensor([[5, 6, 5, 6, 5, 5, 5]])
    segment = torch.ones_like(items)
    got = counts_of(m, items, segment, segment > 0)
    assert got.tolist() == [[0, 0, 1, 1, 2, 3, 3]]


def hidden_states_of_the_loss(m: SessionModel, p) -> torch.Tensor:
    """The (R, W, d_model) hidden states `packed_loss` computes on packed rows `p` (read by a hook)."""
    seen = []
    hook = m.transformer.register_forward_hook(lambda mod, args, out: seen.append(out.last_hidden_state))
    try:
        m.packed_loss(p)
    finally:
        hook.remove()
    return seen[0]


def test_a_masked_item_never_reaches_the_hidden_states():
    """mlm: change the id at every masked position (to a repeat of an input item, or away from one):
    no hidden state of the loss moves, so the feature cannot tell the network what the target is."""
    torch.manual_seed(0)
    m = SessionModel(make_cfg(repeat_feature=True)).eval()
    torch.nn.init.normal_(m.repeats.emb.weight)
    feats, lengths = make_batch([6, 8, 5], L=8, seed=1)
    feats["item_id-list"][:, :4] = torch.tensor([7, 8, 7, 9])  # repeats in every session
    masking = mask_positions(feats["item_id-list"], lengths, 0.4, torch.Generator().manual_seed(2))
    p = pack_sessions(feats, lengths, masking.masked)
    ids = p.feats["item_id-list"]
    other = PackedSessions({**p.feats, "item_id-list": torch.where(p.masked, 7, ids)}, p.segment, p.masked)
    assert not torch.equal(other.feats["item_id-list"], ids)
    with torch.no_grad():
        assert torch.allclose(hidden_states_of_the_loss(m, p), hidden_states_of_the_loss(m, other), atol=1e-6)
        unmasked = PackedSessions({**p.feats, "item_id-list": torch.where(~p.masked & (ids > 2), 7, ids)},
                                  p.segment, p.masked)
        assert not torch.allclose(hidden_states_of_the_loss(m, p), hidden_states_of_the_loss(m, unmasked))


def test_zero_rows_at_the_start_score_as_the_model_without_it():
    torch.manual_seed(0)
    off = SessionModel(make_cfg()).eval()
    on = SessionModel(make_cfg(repeat_feature=True)).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert missing == ["repeats.emb.weight"] and unexpected == []
    feats, lengths = make_batch([3, 8, 1, 6], L=8)
    feats["item_id-list"][:, 1] = feats["item_id-list"][:, 0]  # a repeat in every session longer than one
    with torch.no_grad():
        a, b = off.next_item_scores(feats, lengths), on.next_item_scores(feats, lengths)
        assert torch.equal(a, b)
        torch.nn.init.normal_(on.repeats.emb.weight)
        assert not torch.allclose(on.next_item_scores(feats, lengths)[:, 3:], a[:, 3:])


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_inference_reads_the_counts_training_reads(objective):
    """The hidden state that scores the next item equals the one training computes at that target:
    mlm, the session with its last item masked; clm, the session without its last item."""
    torch.manual_seed(0)
    m = SessionModel(make_cfg(objective=objective, repeat_feature=True)).eval()
    torch.nn.init.normal_(m.repeats.emb.weight)
    feats, lengths = make_batch([5, 7, 3], L=8, seed=4)
    feats["item_id-list"][:, :3] = torch.tensor([9, 10, 9])
    with torch.no_grad():
        if objective == "mlm":  # training on sessions one longer, their last position masked
            full = {k: torch.nn.functional.pad(v, (0, 1)) for k, v in feats.items()}
            full["item_id-list"][torch.arange(3), lengths] = 11
            masked = torch.arange(9)[None, :] == lengths[:, None]
            p = pack_sessions(full, lengths + 1, masked)
            h = hidden_states_of_the_loss(m, p)[p.masked]
        else:
            p = pack_sessions(feats, lengths)
            last = torch.nn.functional.pad(p.segment[:, 1:] != p.segment[:, :-1], (0, 1), value=True)
            h = hidden_states_of_the_loss(m, p)[last & (p.segment > 0)]
        want = m.next_hidden(feats, lengths)
        # packing reorders sessions (first-fit decreasing): compare as sets of rows
        dist = torch.cdist(want, h)
        assert float(dist.min(1).values.max()) < 1e-4


class Scores(torch.nn.Module):
    def __init__(self, m: SessionModel):
        super().__init__()
        self.m = m

    def forward(self, *args):
        return self.m.next_item_scores(dict(zip(self.m.cfg.feature_names, args[:-1])), args[-1])


def test_padding_and_tracing_with_the_feature():
    torch.manual_seed(0)
    m = SessionModel(make_cfg(repeat_feature=True)).eval()
    torch.nn.init.normal_(m.repeats.emb.weight)
    feats, lengths = make_batch([3, 8, 1, 6], L=8)
    feats["item_id-list"][:, 1] = feats["item_id-list"][:, 0]
    names = m.cfg.feature_names
    with torch.no_grad():
        base = m.next_item_scores(feats, lengths)
        assert torch.allclose(base, m.next_item_scores(pad_to(feats, 15), lengths), atol=1e-5, equal_nan=True)
        traced = torch.jit.trace(Scores(m), (*[feats[n] for n in names], lengths))
        other, olen = make_batch([20, 2, 7], L=20, seed=3)
        other["item_id-list"][:, 1] = other["item_id-list"][:, 0]
        args = (*[other[n] for n in names], olen)
        assert torch.allclose(traced(*args), m.next_item_scores(dict(zip(names, args[:-1])), olen), atol=1e-6)


def test_the_loss_trains_the_feature():
    torch.manual_seed(0)
    m = SessionModel(make_cfg(repeat_feature=True)).train()
    feats, lengths = make_batch([5, 2, 8], L=8)
    feats["item_id-list"][:, 1] = feats["item_id-list"][:, 0]
    loss = m.training_loss(feats, lengths, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert m.repeats.emb.weight.grad is not None and float(m.repeats.emb.weight.grad.abs().sum()) > 0


def test_clm_a_later_item_never_reaches_an_earlier_hidden_state():
    """clm: each session's last item made a repeat of its first (or not): the hidden states before it,
    which predict it, do not move."""
    torch.manual_seed(0)
    m = SessionModel(make_cfg(objective="clm", repeat_feature=True)).eval()
    torch.nn.init.normal_(m.repeats.emb.weight)
    feats, lengths = make_batch([6, 8, 5], L=8, seed=1)
    p = pack_sessions(feats, lengths)
    last = torch.nn.functional.pad(p.segment[:, 1:] != p.segment[:, :-1], (0, 1), value=True) & (p.segment > 0)
    first = torch.nn.functional.pad(p.segment[:, 1:] != p.segment[:, :-1], (1, 0), value=True) & (p.segment > 0)
    ids = p.feats["item_id-list"]
    changed = ids.clone()
    changed[last] = ids[first]  # the sessions in a row follow each other, first and last in the same order
    other = PackedSessions({**p.feats, "item_id-list": changed}, p.segment, None)
    with torch.no_grad():
        a, b = hidden_states_of_the_loss(m, p), hidden_states_of_the_loss(m, other)
    assert torch.allclose(a[~last], b[~last], atol=1e-6)
    assert not torch.allclose(a[last], b[last])


# --- TrainConfig.repeat_reweight: the re-visit prior of the training targets ------------------------


def test_revisit_rates_count_last_items_and_visible_training_targets():
    from training.model.repeats import prior_weights, revisit_rates

    items = torch.tensor([[5, 6, 5, 7], [8, 9, 8, 0], [3, 4, 0, 0], [7, 0, 0, 0]])
    lengths = torch.tensor([4, 3, 2, 1])
    # last items: 7 (new), 8 (re-visit), 4 (new); the one-item session has none
    masked = torch.tensor(
        [[False, False, True, True], [True, False, True, False], [False, True, False, False], [False] * 4]
    )
    r_last, r_train = revisit_rates(items, lengths, masked)
    assert r_last == pytest.approx(1 / 3)
    # masked targets: 5 at 2 (5 visible at 0: re-visit), 7 at 3 (new), 8 at 0 (nothing before), 8 at 2
    # (its earlier 8 is masked: not visible), 4 at 1 (new) -> 1 of 5
    assert r_train == pytest.approx(1 / 5)
    r_last, r_train = revisit_rates(items, lengths, None)  # clm: every next item
    # positions >= 1: 6 n, 5 r, 7 n | 9 n, 8 r | 4 n -> 2 of 6
    assert r_train == pytest.approx(2 / 6)
    assert prior_weights(1 / 3, 1 / 5) == pytest.approx((5 / 3, (2 / 3) / (4 / 5)))
    assert prior_weights(0.2, 0.0) == (1.0, 1.0)


def test_weighted_rerank_loss_weighs_each_target():
    """SessionModel.target_weights: re-ranking's cross-entropy is the weighted mean of each target's
    loss, re-visits of the memory's context at the first weight, the others at the second; (1, 1) is
    the plain loss."""
    from tests.training.model.test_combiner import batch, make_model
    from training.model.repeats import revisit_weights

    m = make_model(objective="mlm", mask_prob=0.4, rerank=True, rank_popular=8).eval()
    feats, lengths = batch(24, seed=5)
    feats["item_id-list"][:, 2] = feats["item_id-list"][:, 0] * (lengths > 2)  # re-visits
    masking = mask_positions(feats["item_id-list"], lengths, 0.4, torch.Generator().manual_seed(1))
    p = pack_sessions(feats, lengths, masking.masked)
    seen = {}
    real_ce = m.item_memory.rerank_ce

    def spy(h, view, head, cols, sets, targets, weights=None):
        per = []  # each target's own loss: the weighted mean with a one-hot weight
        for i in range(targets.shape[0]):
            one = torch.zeros(targets.shape[0])
            one[i] = 1.0
            per.append(real_ce(h, view, head, cols, sets, targets, one) if sets.target_ok[i] else torch.tensor(0.0))
        seen["per"], seen["ok"] = torch.stack(per), sets.target_ok
        seen["rep"] = revisit_weights(view.context.items, view.context.ctx, targets, (1.0, 0.0))
        return real_ce(h, view, head, cols, sets, targets, weights)

    m.item_memory.rerank_ce = spy
    with torch.no_grad():
        plain = m.packed_loss(p)
        m.target_weights = (1.0, 1.0)
        assert float(m.packed_loss(p)) == pytest.approx(float(plain), rel=1e-6)
        m.target_weights = (3.0, 0.5)
        got = float(m.packed_loss(p))
    per, ok, rep = seen["per"], seen["ok"], seen["rep"].bool()
    assert bool((rep & ok).any()) and bool((~rep & ok).any())
    w = torch.where(rep, 3.0, 0.5) * ok
    assert got == pytest.approx(float((per * w).sum() / w.sum()), rel=1e-5)
    assert got != pytest.approx(float(plain), rel=1e-3)


def test_repeat_reweight_needs_the_rerank_cross_entropy():
    from training.checkpoint import RunError
    from training.config import check_model
    from training.model import ModelConfig

    ok = ModelConfig(categorical={"item_id-list": 300}, memory=True, rerank=True)
    check_model(ok, 0.0, repeat_reweight=True)
    for bad, ls in ((ModelConfig(categorical={"item_id-list": 300}, memory=True), 0.0), (ok, 0.1)):
        with pytest.raises(RunError, match="--repeat-reweight weighs the re-ranking cross-entropy"):
            check_model(bad, ls, repeat_reweight=True)


def test_the_trainer_sets_the_revisit_prior_of_each_window(tiny_synthetic_data, tmp_path):
    """--repeat-reweight through the trainer: every trained window's row records the shares of its
    fitted sessions and the weights they give (`prior_weights`); off, nothing is recorded."""
    from tests.training.train_util import tiny_cfg
    from training.model.repeats import prior_weights
    from training.train import train

    model = {"memory": True, "rerank": True, "rank_popular": 8, "memory_k": 8}
    on = train(tiny_cfg(tiny_synthetic_data, tmp_path / "on", repeat_reweight=True, model=model))
    rows = [r for r in on["windows"] if r.get("fit_sessions")]
    assert rows
    for r in rows:
        assert 0.0 <= r["revisit_train"] <= 1.0 and 0.0 <= r["revisit_last"] <= 1.0
        assert r["revisit_weights"] == pytest.approx(list(prior_weights(r["revisit_last"], r["revisit_train"])))
    off = train(tiny_cfg(tiny_synthetic_data, tmp_path / "off", model=model))
    assert not any("revisit_weights" in r for r in off["windows"])
