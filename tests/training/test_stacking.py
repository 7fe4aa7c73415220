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


def test_stacking_trains_the_combiner_only_without_leave_one_out(monkeypatch):
    m = make_model(head_gate=True, rerank=True, rank_popular=8, dropout=0.3)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grad_flags = {n: p.requires_grad for n, p in m.named_parameters()}
    seen = []
    real_view = m.item_memory.packed_view

    def spy(*args, **kw):
        seen.append(kw.get("leave_out", True))
        return real_view(*args, **kw)

    monkeypatch.setattr(m.item_memory, "packed_view", spy)
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
