"""The earlier windows of a run: their training sessions read once, and the item memory's counts
kept running, instead of re-reading every earlier split and recounting it twice per window;
and the per-window counts a model is given (`set_memory`, `set_sample_counts`).

    history = WindowHistory(data, schema, item_feature, age_feature, n_items)
    earlier = history.sessions(before, known)      # {window: SessionTensors} as known after window t
    history.fill_memory(model, t, before, known, fit)   # counts of windows < t + fit -> the item memory
    ...fit...
    history.fill_memory(model, t, before, known, held)  # + the held-back ones: every session <= t
    history.close_window(t)                         # the counts now cover windows <= t

Counting is exact integer addition (training/baselines.py), so counts accumulated window by
window equal a recount of the same sessions and give the same tables (tested). With
ModelConfig.memory_window_decay G < 1 the counts are float and scaled by G at each new window,
so window w's sessions weigh G ** (t - w) after window t (tested against the weighted sum). A recount
only happens when the sessions already counted would read differently now: a value that
reached --freq-threshold after its window was counted was OOV then and is an id now
(`known_inputs`); without a threshold ids follow first appearance and that never happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.baselines import BaselineCounts, iter_memory_tables
from training.data.splits import SessionTensors, available_windows, load_split, newest, split_path
from training.evaluate import holdout_indices, known_inputs
from training.model import SessionModel


class WindowHistory:
    """Training splits of earlier windows (read once) and the item memory's running counts."""

    def __init__(
        self,
        data: Path,
        schema: Mapping[str, Any],
        item_feature: str,
        age_feature: str | None,
        n_items: int,
        keep: bool = True,
        decay: float = 1.0,
    ):
        """keep: hold every split read (a run that reads earlier windows: item memory, cumulative).
        decay: window w's counts weigh decay ** (t - w) in the tables after window t
        (ModelConfig.memory_window_decay; 1: plain counts)."""
        self.data, self.schema, self.keep = data, schema, keep
        self.item, self.age = item_feature, age_feature
        self.n_items = n_items  # the whole vocabulary: tables are sliced to the model's rows
        self._raw: dict[int, SessionTensors] = {}  # window -> its training split as stored
        self._counts: BaselineCounts | None = None  # sessions of `_counted` windows (+ the open window's)
        self._counted: list[int] = []  # windows whose every training session is in _counts
        self._open: list[SessionTensors] = []  # window t's sessions counted so far
        self._counted_known = 0  # item ids known when _counts was last added to
        self._oov_counted = False  # some counted session held an id that was then OOV
        self.decay = decay
        self._at: int | None = None  # the window at which the counts weigh 1 (decay < 1)

    def raw(self, w: int) -> SessionTensors:
        """Window w's training split as stored (read once)."""
        if w in self._raw:
            return self._raw[w]
        st = load_split(split_path(self.data, w, "train"), self.schema)
        if self.keep:
            self._raw[w] = st
        return st

    def known(self, st: SessionTensors, known: dict[str, int]) -> SessionTensors:
        """`st` as the model after a window with `known` ids sees it (`known_inputs`)."""
        return known_inputs(st, known, self.item, self.age)[0]

    def sessions(self, windows: list[int], known: dict[str, int]) -> dict[int, SessionTensors]:
        """{w: window w's training sessions with only `known` ids} for `windows`."""
        return {w: self.known(self.raw(w), known) for w in windows}

    def held_apart(
        self, windows: list[int], known: dict[str, int], fraction: float, seed_of: Callable[[int], int]
    ) -> tuple[list[SessionTensors], list[SessionTensors]]:
        """`windows`' training sessions split as when each was trained (`holdout_indices` with
        seed_of(w): the same rows, whatever ids are known now) -> (fitted parts, held-back parts)."""
        fits, helds = [], []
        for w, st in self.sessions(windows, known).items():
            fit, held = holdout_indices(len(st), fraction, seed_of(w))
            fits.append(st.select(fit))
            helds.append(st.select(held))
        return fits, helds

    def _add(self, st: SessionTensors, counts: BaselineCounts | None = None) -> None:
        """`st`'s sessions added to `counts` (default: the running counts)."""
        counts = self._counts if counts is None else counts
        assert counts is not None
        if len(st):
            counts.add_sessions(st.feats[self.item].numpy(), st.lengths.numpy())

    def _oov(self, w: int, known: dict[str, int]) -> bool:
        """Whether window w's stored sessions hold ids that are OOV with `known` ids."""
        st = self.raw(w)
        return bool(len(st)) and bool((st.feats[self.item] >= known[self.item]).any())

    def fill_memory(
        self, model: SessionModel, t: int, before: list[int], known: dict[str, int], new: SessionTensors
    ) -> None:
        """Fill the model's item memory with the counts of windows `before` and of window t's
        sessions passed so far, `new` (window t's sessions as known after t) included."""
        stale = self._oov_counted and known[self.item] != self._counted_known
        if self._counts is None or set(self._counted) != set(before) or stale:  # (re)count windows < t
            assert not self._open, "a window's sessions are counted with one vocabulary"
            self._counts = self.counts_of(before, t, known)
            self._counted, self._at = list(before), t
            self._oov_counted = any(self._oov(w, known) for w in before)
        elif not len(new) and self._open:
            return  # nothing new: the tables are those of the last call
        if not self._open:
            self._oov_counted |= self._oov(t, known)
            self._age_to(t)
        self._counted_known = known[self.item]
        self._open.append(new)
        self._add(new)
        set_memory_counts(model, self._counts)

    def counts_of(
        self, windows: list[int], t: int, known: dict[str, int], decay: float | None = None
    ) -> BaselineCounts:
        """A fresh count of `windows`' training sessions (<= t) as the item memory holds them after
        window t: ids as `known`, window w weighing decay ** (t - w) (default: this history's decay).
        fill_memory's recount; bench.count_fusion counts its blends here."""
        decay = self.decay if decay is None else decay
        counts = BaselineCounts(self.n_items, sessions=False)  # no V-SKNN index needed
        at = None
        for w in sorted(windows):
            self._age(counts, at, w, decay)
            self._add(self.known(self.raw(w), known), counts)
            at = w
        self._age(counts, at, t, decay)
        return counts

    @staticmethod
    def _age(counts: BaselineCounts, at: int | None, w: int, decay: float) -> None:
        """decay < 1: `counts`, which weigh 1 at window `at` (None: nothing counted yet), scaled to
        weigh 1 at window w."""
        if decay < 1.0 and at is not None and w > at:
            counts.scale(decay ** (w - at))

    def _age_to(self, w: int) -> None:
        """The running counts (`_age`), which weigh 1 at window `_at`, scaled to weigh 1 at window w."""
        assert self._counts is not None
        self._age(self._counts, self._at, w, self.decay)
        self._at = w if self._at is None else max(self._at, w)

    def recent(self, windows: list[int], known: dict[str, int], last: SessionTensors, n: int) -> list[SessionTensors]:
        """The newest `n` training sessions of `windows` (oldest first, read newest first only as far as
        needed) and then `last` (the newest window's, kept whole even beyond n), as known after it."""
        parts, left = [last], n - len(last)
        for w in reversed(windows):
            if left <= 0:
                break
            parts.insert(0, self.known(self.raw(w), known))
            left -= len(parts[0])
        return newest(parts, n)

    def set_recent(self, model: SessionModel, t: int, known: dict[str, int]) -> None:
        """ModelConfig.scorer_recent, once window t is counted: the candidate scorer's recent counts (its
        log1p_pop_recent input) = how often each item occurs in the newest scorer_recent training sessions
        of windows <= t (`recent`, with `known` ids); no-op without them or where window t has none."""
        mem = model.item_memory
        if mem is None or mem.scorer is None or mem.scorer.pop_recent is None:
            return
        last = self.known(self.raw(t), known)
        if not len(last):
            return
        windows = [w for w in available_windows(self.data, self.schema) if w < t]
        V = model.cfg.n_items
        counts = torch.zeros(V)
        for st in self.recent(windows, known, last, model.cfg.scorer_recent):
            if len(st):
                counts += item_counts(st, self.item, V)[:V]
        mem.scorer.set_recent(counts)

    def close_window(self, t: int) -> None:
        """Window t is done: every one of its training sessions was passed to `fill_memory` (or
        it has none), so the counts now cover windows <= t."""
        if self._counts is not None:
            self._counted.append(t)
        self._open = []


def set_memory_counts(model: SessionModel, counts: BaselineCounts, release: bool = False) -> None:
    """Copy the item memory tables of `counts` (`baselines.iter_memory_tables`) into the model,
    one table at a time (at 1M items the tables dominate the peak RSS), rows beyond the model's
    vocabulary left out (no id known to the model reaches them). release: `counts` are spent."""
    mem = model.item_memory
    assert mem is not None
    V = model.cfg.n_items
    for name, table in iter_memory_tables(
        counts, model.cfg.memory_k, release=release, hop2=model.cfg.memory_hop2
    ):
        mem.set_table(name, torch.from_numpy(table[:V]))
        del table  # before the next table is built


def set_memory(model: SessionModel, sessions: list[SessionTensors]) -> None:
    """Fill the model's ItemMemory tables with the counts of `sessions`: `baselines.memory_tables`
    of the same counts as the baselines (a run keeps them running: training/history.py)."""
    counts = BaselineCounts(model.cfg.n_items, sessions=False)  # V-SKNN's session index: not needed
    item = model.cfg.item_feature
    for st in sessions:
        if len(st):
            counts.add_sessions(st.feats[item].numpy(), st.lengths.numpy())
    set_memory_counts(model, counts, release=True)


@torch.no_grad()
def item_counts(st: SessionTensors, item: str, n_items: int) -> Tensor:
    """(V,) float: how often each item id occurs in the sessions of `st` (padding excluded)."""
    items = st.feats[item]  # (N, L)
    real = torch.arange(items.shape[1])[None, :] < st.lengths[:, None]  # (N, L)
    return torch.bincount(items[real].long(), minlength=n_items).float()


def set_sample_counts(model: SessionModel, st: SessionTensors) -> None:
    """The sampled loss without the item memory: the negative sampler's counts = items of `st`
    (the sessions trained on; with the memory, its `pop` table serves, see `set_memory`)."""
    if model.cfg.loss == "sampled" and model.item_memory is None and len(st):
        model.set_sample_counts(item_counts(st, model.cfg.item_feature, model.cfg.n_items))
