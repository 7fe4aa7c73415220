"""Stacking (training/stacking.py, TrainConfig.stack): the item memory's combiner on held-back sessions.

What must hold: it changes the item memory's parameters only (the count gates, head gate and
position weights; not the count tables), uses no leave-one-out (the held-back sessions are not
in the counts), leaves the rest of the model (weights, buffers, requires_grad, train/eval mode)
as it was, is reproducible from its seed, and reports the held-back NDCG@20 before/after and
the mean head gate.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.training.model.test_combiner import batch, make_model
from training.config import TrainConfig
from training.data.splits import SessionTensors
from training.stacking import mean_head_weight, stack_memory


def held_sessions(n: int, seed: int) -> SessionTensors:
    feats, lengths = batch(n, seed)
    return SessionTensors(feats, lengths, torch.arange(n))


def stack_cfg(**kw) -> TrainConfig:
    base = dict(data="-", out="-", stack=3, batch_size=16, memory_lr=0.05, holdout=0.1, patience=1, threads=1)
    return TrainConfig(**{**base, **kw})


def spy_leave_out(monkeypatch, m) -> list[bool]:
    """Record the leave_out flag of every training view of m's item memory (one per step: packed_view
    and rerank_view both build their lists with `_packed_lists`)."""
    seen: list[bool] = []
    real_lists = m.item_memory._packed_lists

    def spy(items, segment, leave_out):
        seen.append(leave_out)
        return real_lists(items, segment, leave_out)

    monkeypatch.setattr(m.item_memory, "_packed_lists", spy)
    return seen


def test_stacking_trains_the_combiner_only_without_leave_one_out(monkeypatch):
    m = make_model(head_gate=True, rerank=True, rank_popular=8, dropout=0.3)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grad_flags = {n: p.requires_grad for n, p in m.named_parameters()}
    seen = spy_leave_out(monkeypatch, m)
    held = held_sessions(40, seed=11)
    out = stack_memory(m, held, stack_cfg(), seed=3, device=torch.device("cpu"))
    assert seen and not any(seen)  # held-back sessions: nothing left out, every step
    assert len(seen) == 3 * math.ceil(40 / 16)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("item_memory.") for k in changed), changed
    assert "item_memory.head_gate.weight" in changed and "item_memory.gate.weight" in changed
    assert not any(k.startswith("item_memory.") and k.split(".")[1] in ("cooc_idx", "pop") for k in changed)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grad_flags and m.training
    assert set(out) == {"holdout_ndcg20_before_stack", "holdout_ndcg20_after_stack", "holdout_head_gate"}
    assert out["holdout_head_gate"] == pytest.approx(mean_head_weight(m, held, torch.device("cpu"), 7))
    assert out["holdout_head_gate"] != pytest.approx(1.0)  # it moved from its start


def test_stacking_is_reproducible_and_seeded():
    outs = []
    for seed in (3, 3, 4):
        m = make_model(head_gate=True)
        stack_memory(m, held_sessions(40, seed=11), stack_cfg(stack=2), seed=seed, device=torch.device("cpu"))
        outs.append(m.item_memory.head_gate.weight.detach().clone())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_stack_epochs_must_not_be_negative():
    with pytest.raises(ValueError, match="stack must be >= 0"):
        stack_cfg(stack=-1)


# --- the blend guard (TrainConfig.blend_guard) ------------------------------------------------------


def test_reset_to_blend_ranks_exactly_as_the_count_blend():
    from training.evaluate import count_blend_metrics, evaluate_model
    from training.model import ItemMemory

    dev = torch.device("cpu")
    # re-ranking ranks the memory's candidates only; with >= 20 popular ones among them, every item of
    # the blend's top 20 is a candidate (an item outside scores its popularity term alone), so the
    # metrics at 20 agree (beyond 20 the candidates run out: not compared)
    for rerank in (False, True):
        m = make_model(head_gate=True, rerank=rerank, rank_popular=20)
        stack_memory(m, held_sessions(40, seed=11), stack_cfg(stack=3), seed=3, device=dev)  # combiner moved
        held = held_sessions(60, seed=12)
        mem = m.item_memory
        blend = count_blend_metrics({k: getattr(mem, k) for k in ItemMemory.TABLES}, m.cfg, held, dev, 16)
        at20 = ("ndcg@20", "recall@20", "mrr@20")
        ours = evaluate_model(m, held, dev, 16)
        assert [ours[k] for k in at20] != [blend[k] for k in at20]  # trained combiner + network logits
        mem.reset_to_blend()
        assert float(mem.head_scale) == 0.0
        ours = evaluate_model(m, held, dev, 16)
        assert [ours[k] for k in at20] == pytest.approx([blend[k] for k in at20], abs=1e-12)


def test_blend_guard_falls_back_only_where_the_blend_scores_better():
    from training.stacking import blend_guard

    dev = torch.device("cpu")
    m = make_model(head_gate=True, rerank=True, rank_popular=20)
    held = held_sessions(60, seed=12)
    with torch.no_grad():  # a combiner that ignores the counts: the network's untrained logits only
        m.item_memory.gate.bias.fill_(-30.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = blend_guard(m, held, dev, 16)
    assert out["blend_fallback"] is True
    assert out["holdout_guard_blend"]["recall@20"] > out["holdout_guard_model"]["recall@20"]
    changed = {k for k in before if not torch.equal(before[k], m.state_dict()[k])}
    assert changed and all(k.startswith("item_memory.") for k in changed)  # the network is untouched
    again = blend_guard(m, held, dev, 16)  # now the blend itself: nothing below it, nothing to change
    assert again["blend_fallback"] is False
    assert again["holdout_guard_model"] == pytest.approx(again["holdout_guard_blend"], abs=1e-12)


def stacked_run(monkeypatch, name: str, spy, data, out, **kw) -> list[dict]:
    """The trained windows' rows of a tiny stacking run (memory, 20 % held back, patience 1, 1 stacking
    epoch; `kw` wins) with training.trainer's `name` replaced by `spy`."""
    import training.trainer as trainer_mod
    from tests.training.train_util import tiny_cfg
    from training.train import train

    monkeypatch.setattr(trainer_mod, name, spy)
    base = dict(holdout=0.2, patience=1, stack=1, model={"memory": True}, evaluate=False, baselines=False)
    return [r for r in train(tiny_cfg(data, out, **{**base, **kw}))["windows"] if r.get("sessions_trained")]


def test_trainer_runs_the_blend_guard_after_stacking(tiny_synthetic_data, tmp_path, monkeypatch):
    import training.trainer as trainer_mod

    calls = []
    real = trainer_mod.blend_guard

    def spy(model, held, device, batch_size, *rest):
        calls.append(len(held))
        return real(model, held, device, batch_size, *rest)

    rows = stacked_run(monkeypatch, "blend_guard", spy, tiny_synthetic_data, tmp_path / "run", epochs=2, blend_guard=True)
    assert rows and len(calls) == len(rows) and all(n == r["holdout_sessions"] for n, r in zip(calls, rows))
    for r in rows:
        assert isinstance(r["blend_fallback"], bool) and "holdout_ndcg20_after_stack" in r
        assert set(r["holdout_guard_model"]) == set(r["holdout_guard_blend"]) == {"ndcg@20", "recall@20"}
        # stacking starts from the best epoch's weights: its "before" score is early stopping's best
        assert r["holdout_ndcg20_before_stack"] == max(r["holdout_ndcg20_per_epoch"])


def test_stacking_reads_the_pool_with_its_own_counts_left_out(monkeypatch):
    m = make_model(head_gate=True, rerank=True, rank_popular=8)
    seen = spy_leave_out(monkeypatch, m)
    held, pool = held_sessions(20, seed=11), held_sessions(40, seed=12)
    stack_memory(m, held, stack_cfg(stack=2), seed=3, device=torch.device("cpu"), pool=pool)
    # every epoch: ceil(20/16) batches of window t's held-back sessions (not in the counts) and
    # ceil(40/16) of the pool's (in the counts: their own counts left out), in shuffled order
    assert sorted(seen) == sorted([False] * 2 * 2 + [True] * 2 * 3)
    assert seen != [False, False, True, True, True] * 2  # shuffled, not held first then the pool


def test_trainer_keeps_earlier_held_back_sessions_out_of_the_network_for_stacking(
    tiny_synthetic_data, tmp_path, monkeypatch
):
    import training.trainer as trainer_mod
    from tests.training.train_util import tiny_cfg
    from training.train import train

    calls = []
    real = trainer_mod.Trainer.fit

    def spy(self, t, st, held=None, pool=None, lag=None):
        calls.append((t, set(st.session_id.tolist()), set(held.session_id.tolist()), pool))
        return real(self, t, st, held, pool, lag)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", spy)
    cfg = tiny_cfg(
        tiny_synthetic_data, tmp_path / "run", epochs=1, holdout=0.2, patience=1, stack=1, stack_pool=10_000,
        train_on="cumulative", model={"memory": True}, evaluate=False, baselines=False,
    )  # fmt: skip
    rows = [r for r in train(cfg)["windows"] if r.get("sessions_trained")]
    assert len(calls) == len(rows) >= 2
    held_so_far: set[int] = set()
    for i, (_t, fit_ids, held_ids, pool) in enumerate(calls):
        pool_ids = set(pool.session_id.tolist()) if pool is not None else set()
        assert pool_ids == held_so_far  # every earlier window's held-back slice, the same sessions
        assert not (fit_ids & (held_ids | pool_ids))  # the network never trains on any of them
        if i:  # cumulative: the earlier windows' other sessions are trained on again
            assert fit_ids & calls[i - 1][1]
        assert rows[i].get("stack_pool_sessions", 0) == len(pool_ids)
        held_so_far |= held_ids
    assert held_so_far and calls[-1][3] is not None and len(calls[-1][3]) > 0


def test_blend_guard_can_score_the_training_windows_valid_split(tiny_synthetic_data, tmp_path, monkeypatch):
    import training.trainer as trainer_mod
    from tests.training.train_util import tiny_cfg
    from training.data.splits import load_schema, load_split, split_path
    from training.train import train

    calls = []
    real = trainer_mod.blend_guard

    def spy(model, st, device, batch_size, miss=None, known=None):
        calls.append((set(st.session_id.tolist()), miss, known))
        return real(model, st, device, batch_size, miss, known)

    monkeypatch.setattr(trainer_mod, "blend_guard", spy)
    cfg = tiny_cfg(
        tiny_synthetic_data, tmp_path / "run", epochs=1, holdout=0.2, patience=1, stack=1, blend_guard=True,
        guard_split="valid", model={"memory": True}, evaluate=False, baselines=False,
    )  # fmt: skip
    rows = [r for r in train(cfg)["windows"] if r.get("sessions_trained")]
    schema = load_schema(tiny_synthetic_data)
    assert rows and len(calls) == len(rows)
    for (ids, miss, known), r in zip(calls, rows):
        valid = load_split(split_path(tiny_synthetic_data, r["train_window"], "valid"), schema)
        assert ids == set(valid.session_id.tolist())  # window t's valid split, not its held-back slice
        assert miss is not None and miss.shape == (len(valid),) and known == r["items_known"]
        assert r["guard_sessions"] == len(valid)
    with pytest.raises(ValueError, match="guard_split must be one of \\('held', 'valid', 'next'\\), got 'test'"):
        TrainConfig(data="-", out="-", guard_split="test")


@pytest.mark.parametrize("stack_last", [False, True])
def test_mlm_stacking_with_stack_last_masks_each_sessions_last_item_only(monkeypatch, stack_last):
    """TrainConfig.stack_last under masked LM: every held-back session of two or more items is masked
    at its last item and nowhere else (the evaluation's task); without it, the model's own masks."""
    m = make_model(head_gate=True, rerank=True, rank_popular=8, objective="mlm", mask_prob=0.3)
    seen = []
    real = m.packed_loss

    def spy(p, *args, **kw):
        seen.append((p.masked.clone(), p.segment.clone(), kw.get("last_only")))
        return real(p, *args, **kw)

    monkeypatch.setattr(m, "packed_loss", spy)
    held = held_sessions(40, seed=11)
    stack_memory(m, held, stack_cfg(stack=2, stack_last=stack_last), seed=3, device=torch.device("cpu"))
    assert seen
    for masked, segment, last_only in seen:
        assert last_only is False  # packed_loss's last_only is the causal notion
        ends = torch.nn.functional.pad(segment[:, 1:] != segment[:, :-1], (0, 1), value=True) & (segment > 0)
        sizes = torch.bincount(segment[segment > 0])
        multi = ends & (sizes[segment] >= 2)  # the last item of each session of two or more items
        if stack_last:
            assert torch.equal(masked, multi)
        else:
            assert int(masked.sum()) > int(multi.sum())  # random positions, several per long session


# --- stacking on the earlier windows' counts (TrainConfig.stack_lag) ---------------------------------


def test_stacking_with_lag_reads_the_earlier_counts_and_gives_the_tables_back(monkeypatch):
    """stack_memory(lag=counts): every stacking step and both held-back scores read the tables of
    `counts`; afterwards the memory holds its own tables again, and only the combiner moved."""
    import copy

    from tests.sessions_util import random_sessions
    from training.baselines import BaselineCounts
    from training.evaluate import evaluate_model
    from training.history import set_memory_counts

    m = make_model(head_gate=True)
    mem = m.item_memory
    own = {k: v.clone() for k, v in mem.tables().items()}
    items, lengths = random_sessions(30, mem.pop.shape[0], seed=9, max_len=6, min_len=2)
    lag = BaselineCounts(mem.pop.shape[0], sessions=False)
    lag.add_sessions(items, lengths)
    lagged = copy.deepcopy(m)
    set_memory_counts(lagged, lag)
    want = {k: v.clone() for k, v in lagged.item_memory.tables().items()}
    assert not torch.equal(want["cooc_val"], own["cooc_val"])
    held, dev = held_sessions(40, seed=11), torch.device("cpu")
    want_before = evaluate_model(lagged, held, dev, 7)["ndcg@20"]
    seen = []
    real = m.packed_loss

    def spy(*a, **kw):
        seen.append(all(torch.equal(getattr(mem, k), v) for k, v in want.items()))
        return real(*a, **kw)

    monkeypatch.setattr(m, "packed_loss", spy)
    out = stack_memory(m, held, stack_cfg(stack=2), seed=3, device=dev, before=0.123, lag=lag)
    assert seen and all(seen)  # every step on the earlier counts
    assert out["holdout_ndcg20_before_stack"] == pytest.approx(want_before)  # re-scored, not the 0.123 given
    assert all(torch.equal(getattr(mem, k), v) for k, v in own.items())  # its own tables back
    with torch.no_grad():  # the score after: the stacked combiner on the earlier counts
        for k in want:
            lagged.item_memory.set_table(k, want[k])
        lagged.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[-1] not in want}, strict=False)
    assert out["holdout_ndcg20_after_stack"] == pytest.approx(evaluate_model(lagged, held, dev, 7)["ndcg@20"])


def test_trainer_stacks_on_the_windows_before_with_stack_lag(tiny_synthetic_data, tmp_path, monkeypatch):
    """--stack-lag: the first trained window stacks as without it (no earlier counts); each later
    one on the counts of the windows before it, fewer than the memory then holds."""
    import training.trainer as trainer_mod

    calls = []
    real = trainer_mod.stack_memory

    def spy(model, *a, lag=None, **kw):
        calls.append((None if lag is None else int(lag.pop.sum()), float(model.item_memory.pop.sum())))
        return real(model, *a, lag=lag, **kw)

    rows = stacked_run(monkeypatch, "stack_memory", spy, tiny_synthetic_data, tmp_path / "run", epochs=1, stack_lag=True)
    assert len(calls) == len(rows) >= 2
    assert calls[0][0] is None
    for lag_clicks, memory_clicks in calls[1:]:
        assert lag_clicks is not None and 0 < lag_clicks < memory_clicks


# --- stacking on every prefix (TrainConfig.stack_prefixes) -------------------------------------------


def test_prefixes_are_every_prefix_of_two_or_more_items_with_the_rest_zeroed():
    feats = {
        "item": torch.tensor([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [3, 4, 0, 0, 0]]),
        "x": torch.tensor([[0.5, 0.25, 2.0, 0.0, 0.0], [1.0, 0, 0, 0, 0], [3.0, 4.0, 0, 0, 0]]),
    }
    st = SessionTensors(feats, torch.tensor([3, 1, 2]), torch.tensor([10, 11, 12]))
    p = st.prefixes()
    assert p.lengths.tolist() == [2, 3, 2]
    assert p.session_id.tolist() == [10, 10, 12]
    assert p.feats["item"].tolist() == [[5, 6, 0, 0, 0], [5, 6, 7, 0, 0], [3, 4, 0, 0, 0]]
    assert p.feats["x"].tolist() == [[0.5, 0.25, 0, 0, 0], [0.5, 0.25, 2.0, 0, 0], [3.0, 4.0, 0, 0, 0]]
    assert p.feats["x"].dtype == torch.float32
    empty = SessionTensors({"item": torch.tensor([[4, 0]])}, torch.tensor([1]), torch.tensor([0])).prefixes()
    assert len(empty) == 0


def test_mlm_stacking_with_prefixes_fits_every_prefix_masked_at_its_last_item(monkeypatch):
    """TrainConfig.stack_prefixes under masked LM: each epoch reads every prefix of two or more items
    of every held-back session once, masked at its last item and nowhere else."""
    m = make_model(head_gate=True, rerank=True, rank_popular=8, objective="mlm", mask_prob=0.3)
    item = m.cfg.item_feature
    seen: list[tuple[int, ...]] = []
    real = m.packed_loss

    def spy(p, *args, **kw):
        seg, items = p.segment, p.feats[item]
        for s in seg.unique():
            if s == 0:
                continue
            at = seg == s
            masked = p.masked[at]
            assert masked[-1] and int(masked.sum()) == 1  # the last item only
            seen.append(tuple(items[at].tolist()))
        return real(p, *args, **kw)

    monkeypatch.setattr(m, "packed_loss", spy)
    held = held_sessions(30, seed=5)
    stack_memory(m, held, stack_cfg(stack=2, stack_prefixes=True), seed=3, device=torch.device("cpu"))
    want = []
    for row, n in zip(held.feats[item].tolist(), held.lengths.tolist(), strict=True):
        want += [tuple(row[:k]) for k in range(2, n + 1)]
    assert sorted(seen) == sorted(want * 2)  # two epochs


def test_clm_stacking_ignores_prefixes_it_already_fits_every_next_item():
    """Under clm the plain stacking's loss is already every prefix's next item: --stack-prefixes
    changes nothing, bit for bit."""
    held = held_sessions(30, seed=5)
    out = []
    for prefixes in (False, True):
        m = make_model(head_gate=True, rerank=True, rank_popular=8, objective="clm")
        stack_memory(m, held, stack_cfg(stack=2, stack_prefixes=prefixes), seed=3, device=torch.device("cpu"))
        out.append({k: v.clone() for k, v in m.item_memory.state_dict().items()})
    assert out[0].keys() == out[1].keys()
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_prefixes_refuse_the_pool_whose_sessions_are_counted_whole():
    """A pooled session is in the counts whole: a prefix of it could not leave out the pairs of its
    target with the session's later items, so the two options are refused together, by name."""
    with pytest.raises(ValueError, match="stack_prefixes cannot be combined with stack_pool \\(got stack_pool=2\\)"):
        stack_cfg(stack_prefixes=True, stack_pool=2)
    assert stack_cfg(stack_prefixes=True).stack_prefixes and stack_cfg(stack_pool=2).stack_pool == 2
