"""training/history.py: the item memory's running counts give exactly the tables of a recount
of every session (what the trainer did before), window after window, with or without ids that
become known only in a later window (--freq-threshold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.splits import SessionTensors
from training.evaluate import known_inputs
from training.history import WindowHistory
from training.model import ModelConfig, SessionModel
from training.trainer import set_memory

ITEM = "item_id-list"
V = 80


def _sessions(n: int, high: int, seed: int) -> SessionTensors:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, n)
    items = np.zeros((n, 6), dtype=np.int64)
    for i, n_i in enumerate(lengths):
        items[i, :n_i] = rng.integers(3, high, n_i)
    return SessionTensors({ITEM: torch.from_numpy(items)}, torch.from_numpy(lengths), torch.arange(n), "test")


def _model() -> SessionModel:
    cfg = ModelConfig(categorical={ITEM: V}, memory=True, memory_k=6, max_len=6)
    return SessionModel(cfg)


def _tables(model: SessionModel) -> dict[str, torch.Tensor]:
    assert model.item_memory is not None
    return {k: v.clone() for k, v in model.item_memory.tables().items()}


@pytest.mark.parametrize("late_ids", [False, True])
def test_running_counts_equal_a_recount(late_ids: bool):
    """Per window: counts of windows < t + the fitted sessions, then + the held-back ones, equal
    `set_memory` of the same sessions; with late ids (known only from a later window) the
    history recounts and still agrees; an empty window and a run that starts late too."""
    known_by = {1: 30, 2: 45, 3: 45, 4: 60, 5: 80}
    # late ids: window w holds ids up to known_by[w + 1], beyond what is known after w
    raw = {
        w: _sessions(0 if w == 3 else 25, known_by[min(w + 1, 5)] if late_ids else known_by[w], w)
        for w in range(1, 6)
    }
    for first in (1, 3):
        history = WindowHistory(Path("unused"), {}, ITEM, None, V)
        history._raw.update(raw)  # the splits as stored (normally read from DATA)
        model, fresh = _model(), _model()
        for t in range(first, 6):
            known = {ITEM: known_by[t]}
            train = known_inputs(raw[t], known, ITEM)[0]
            n = len(train)
            fit, held = train.select(torch.arange(0, n, 2)), train.select(torch.arange(min(1, n), n, 2))
            earlier = [known_inputs(raw[w], known, ITEM)[0] for w in range(1, t)]
            if len(train):
                history.fill_memory(model, t, list(range(1, t)), known, fit)
                set_memory(fresh, [*earlier, fit])
                for k, v in _tables(fresh).items():
                    assert torch.equal(getattr(model.item_memory, k), v), (first, t, "fit", k)
                history.fill_memory(model, t, list(range(1, t)), known, held)
                set_memory(fresh, [*earlier, train])
                for k, v in _tables(fresh).items():
                    assert torch.equal(getattr(model.item_memory, k), v), (first, t, "all", k)
            history.close_window(t)


@pytest.mark.parametrize("first", [1, 3])
def test_window_decay_weighs_each_window_by_its_age(first: int):
    """memory_window_decay G: after window t (its fitted sessions, then every one of them) the tables
    are those of the weighted sum of each window's own counts, sum_w G ** (t - w) * counts(w), with an
    empty window on the way and a run that starts late (a recount); G = 0.5 keeps every weight exact."""
    from training.baselines import BaselineCounts
    from training.history import set_memory_counts

    G = 0.5
    raw = {w: _sessions(0 if w == 3 else 25, 60, w) for w in range(1, 6)}
    known = {ITEM: 60}
    history = WindowHistory(Path("unused"), {}, ITEM, None, V, decay=G)
    history._raw.update(raw)
    model, fresh = _model(), _model()

    def weighted(parts: dict[int, SessionTensors], t: int) -> BaselineCounts:
        total = BaselineCounts(V, sessions=False)
        total.scale(1.0)  # float counts
        for w, st in parts.items():
            c = BaselineCounts(V, sessions=False)
            if len(st):
                c.add_sessions(st.feats[ITEM].numpy(), st.lengths.numpy())
            total.pop = total.pop + G ** (t - w) * c.pop
            total.cooc = total.cooc + G ** (t - w) * c.cooc.astype(np.float64)
            total.succ = total.succ + G ** (t - w) * c.succ.astype(np.float64)
        return total

    changed = False
    for t in range(first, 6):
        train = raw[t]
        n = len(train)
        fit, held = train.select(torch.arange(0, n, 2)), train.select(torch.arange(min(1, n), n, 2))
        earlier = {w: raw[w] for w in range(1, t)}
        if n:
            history.fill_memory(model, t, list(range(1, t)), known, fit)
            set_memory_counts(fresh, weighted({**earlier, t: fit}, t))
            for k, v in _tables(fresh).items():
                assert torch.equal(getattr(model.item_memory, k), v), (t, "fit", k)
            history.fill_memory(model, t, list(range(1, t)), known, held)
            set_memory_counts(fresh, weighted({**earlier, t: train}, t))
            for k, v in _tables(fresh).items():
                assert torch.equal(getattr(model.item_memory, k), v), (t, "all", k)
            # the decay is not a no-op: plain counts give other values
            set_memory(fresh, [*earlier.values(), train])
            changed |= not torch.equal(fresh.item_memory.cooc_val, model.item_memory.cooc_val)
        history.close_window(t)
    assert changed, "the weighted tables never differed from the plain ones"
