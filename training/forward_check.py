"""The forward checks: choices made on the next window's training sessions. TrainConfig.cooc_curve_fit
"choose": which of two stackings of the item memory's combiner serves (with or without the learned
curve of the co-occurrence counts). TrainConfig.blend_guard with guard_split "next": whether the
model or its count blend serves (the floor under the model on a log too small for the network).

Why: the co-occurrence curve (ModelConfig.cooc_curve) lifts one log and costs another
(docs/quality.md, "Session of 2026-12-06 (sixth)"), and the held-back slice of window t cannot tell
them apart: stacking fits the curve there, so it favours the curve on both. What the evaluation and
serving meet is the *next* window, scored with the counts of the windows up to t. Window t+1's
training split, scored by the model after window t with those counts, is that condition exactly,
and it is training data: the choice reads no evaluation split. It is made after window t's
evaluation and applies from window t+1's model on, so no model is chosen on sessions of the window
it is evaluated on.

    row.update(stack_choice(model, held, ..., use_curve=check.use_curve))   # fit: both stackings
    row["curve_check"] = check.add_window(curve_gain(model, other, next_sessions(...), ...))  # after t
    check = ForwardCheck.from_rows(rows)                                      # --resume

Decision: the paired per-session NDCG@20 differences (curve minus identity) of every check so far
are pooled; the curve serves once their mean is positive at z > Z_SWITCH (one-sided 95 %), and the
identity (plain log1p counts, the recipe without the curve) otherwise. Sessions whose target the
model cannot know (first seen in window t+1) are left out: both variants miss them.

The guard (`GuardCheck`) pools the model's per-session NDCG@20 and Recall@20 minus its count blend's
(the same tables, the combiner at its start, no network logits: `count_blend_ranks`) on the same
sessions; from the window after the blend is better on either at z > Z_SWITCH, each window's model
serves as the blend (`serve_blend`: `ItemMemory.reset_to_blend`) while its stacked combiner is set
aside, scored by the next check, and put back before the next fit (`resume_stacked`): the network
keeps training as if nothing had happened, and serves again once the pooled evidence turns.

    row.update(serve_blend(trainer))   # fit, after stacking: {"blend_fallback": ...}
    resume_stacked(trainer)            # the next window, before anything else
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from training.data.splits import SessionTensors, available_windows
from training.evaluate import count_blend_ranks, evaluate_model, known_inputs
from training.metrics import per_session
from training.model import ItemMemory, SessionModel
from training.model.scorer import tapping

if TYPE_CHECKING:
    from training.trainer import Trainer

Z_SWITCH = 1.645  # one-sided 95 %: the curve must show its gain, the identity is the default
METRIC = "ndcg@20"
GUARD_METRICS = ("ndcg@20", "recall@20")  # the blend serves where it is better on either


def combiner_state(mem: ItemMemory) -> dict[str, Tensor]:
    """A copy of the item memory's parameters (the combiner: gates, head gate, position weights, curve)."""
    return {name: p.detach().clone() for name, p in mem.named_parameters()}


@torch.no_grad()
def load_combiner(mem: ItemMemory, state: dict[str, Tensor]) -> None:
    """Put `state` (`combiner_state`) back into the item memory's parameters."""
    for name, p in mem.named_parameters():
        p.copy_(state[name])


def hold_curve(model: SessionModel, held: bool) -> None:
    """The fit under cooc_curve_fit "stack" / "choose": the curve reads as it stands, untrained
    (`held`), and is trainable again for stacking (not `held`). No-op without the curve."""
    mem = model.item_memory
    if mem is not None and mem.cooc_curve is not None:
        mem.cooc_curve.slopes.requires_grad_(not held)


def check_next_window(trainer: Trainer, t: int, row: dict[str, Any]) -> dict[str, Any]:
    """After window t (its evaluation made): the checks on window t+1's training split, at most the
    newest TrainConfig.forward_check_sessions of it, scored with the counts of windows <= t (the
    memory as the evaluation left it). The curve's: between the model's stacking and the one the fit
    set aside (`Trainer.other_combiner`, used up here), pooled into `trainer.check`. The guard's
    (where the fit ran `serve_blend`: "blend_fallback" in `row`): the stacked model (the one set aside
    if the blend serves) against its count blend, pooled into `trainer.guard`. Returns the metrics
    row's entries; {} where there is nothing to check or the data has no window t+1."""
    other, trainer.other_combiner = trainer.other_combiner, None
    cfg, model = trainer.cfg, trainer.model
    mem, guard = model.item_memory, "blend_fallback" in row
    scorer = mem is not None and mem.scorer is not None  # its pool and check (training/scorer_fit.py)
    if (
        mem is None
        or (other is None and not guard and not scorer)
        or t + 1 not in available_windows(trainer.data, trainer.schema)
    ):
        return {}
    t0 = time.perf_counter()
    st = trainer.history.raw(t + 1)
    if len(st) > cfg.forward_check_sessions:  # the newest (a split's rows follow time)
        st = st.select(torch.arange(len(st) - cfg.forward_check_sessions, len(st)))
    known, dev, bs = trainer.known_sizes(t), trainer.device, cfg.eval_batch_size
    out: dict[str, Any] = {}
    served = served_state(mem)
    if trainer.guard_combiner is not None:  # the blend serves: check the model that was stacked
        load_served(mem, trainer.guard_combiner)
    try:
        seen = next_sessions(st, known, model.cfg.item_feature, trainer.age_feature)
        tap: list | None = [] if scorer else None  # the scorer's inputs, kept while the pass scores them
        with tapping(mem, tap):
            mine = model_ranks(model, seen, dev, bs)  # the model as it stands, scored once for every check
        if other is not None:
            check = trainer.check
            diffs, identity, curve = curve_gain(model, other, check.use_curve, seen, dev, bs, mine=mine)
            out["curve_check"] = check.add_window(diffs, t + 1, identity, curve)
            check.use_curve = out["curve_check"]["use_curve_next"] = _rank0(check.use_curve, dev)
        if guard:
            diffs_m, ours, blend = blend_gain(model, seen, known[model.cfg.item_feature], dev, bs, mine=mine)
            out["guard_check"] = trainer.guard.add_window(diffs_m, t + 1, ours, blend)
            trainer.guard.use_blend = out["guard_check"]["use_blend_next"] = _rank0(
                trainer.guard.use_blend, dev
            )
        if scorer:
            from training.trainer import _seed

            out["scorer_check"] = trainer.scorer.add_window(
                model, seen, t + 1, dev, bs, trainer.out if trainer.dist.main else None, tap,
                prefixes=round(cfg.scorer_prefixes * len(seen)), seed=_seed(cfg.seed, t, 13),
            )  # fmt: skip
            trainer.scorer.use = out["scorer_check"]["use_scorer_next"] = _rank0(trainer.scorer.use, dev)
    finally:
        load_served(mem, served)
    for entry in out.values():
        entry["seconds"] = time.perf_counter() - t0  # reading the split and scoring it
    return out


def _rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank (each scored the same sessions; GPU round-off may differ)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        f = torch.tensor([int(flag)], device=device)
        torch.distributed.broadcast(f, 0)
        return bool(f.item())
    return flag


def served_state(mem: ItemMemory) -> dict[str, Tensor]:
    """The item memory's combiner (`combiner_state`), head scale and whether the candidate scorer
    re-ranks: what `reset_to_blend` changes."""
    scorer = {} if mem.scorer is None else {"scorer_on": mem.scorer.on.detach().clone()}
    return {**combiner_state(mem), "head_scale": mem.head_scale.detach().clone(), **scorer}


@torch.no_grad()
def load_served(mem: ItemMemory, state: dict[str, Tensor]) -> None:
    """Put a `served_state` back."""
    load_combiner(mem, state)
    mem.head_scale.copy_(state["head_scale"])
    if mem.scorer is not None and "scorer_on" in state:
        mem.scorer.on.copy_(state["scorer_on"])


def serve_blend(trainer: Trainer) -> dict[str, Any]:
    """The fit, after stacking (blend_guard, guard_split "next"): where the guard's checks so far
    chose the count blend, set the stacked combiner aside (`Trainer.guard_combiner`) and let the
    model serve as the blend. Returns the metrics row's entry."""
    mem = trainer.model.item_memory
    assert mem is not None, "the blend guard needs the item memory"
    if trainer.guard.use_blend:
        trainer.guard_combiner = served_state(mem)
        mem.reset_to_blend()
    return {"blend_fallback": trainer.guard.use_blend}


def resume_stacked(trainer: Trainer) -> None:
    """Before a window: the stacked combiner set aside by `serve_blend` back into the model, whose
    training goes on from it (the blend served the window before, the network was not reset)."""
    if trainer.guard_combiner is not None:
        mem = trainer.model.item_memory
        assert mem is not None
        load_served(mem, trainer.guard_combiner)
        trainer.guard_combiner = None


def next_sessions(
    st: SessionTensors, known: dict[str, int], item_feature: str, age_feature: str | None = None
) -> SessionTensors:
    """Sessions of the next window as known after this one (`known_inputs`), those whose target is
    unknown (every method misses it) or which have no input left out."""
    seen, miss = known_inputs(st, known, item_feature, age_feature)
    return seen.select(torch.nonzero(~miss & (seen.lengths >= 2)).flatten())


def blend_gain(
    model: SessionModel,
    seen: SessionTensors,
    known_items: int,
    device: torch.device,
    batch_size: int,
    *,
    mine: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Score `seen` (`next_sessions`) with the model as it stands (`mine`: its ranks there, if already
    scored) and with its count blend (the same tables, only the `known_items` ids ranked). Returns
    ({metric: per-session model minus blend}, the model's means, the blend's means) for NDCG@20 and
    Recall@20."""
    mem = model.item_memory
    assert mem is not None, "the blend guard needs the item memory"
    if len(seen) == 0:
        zero = {m: 0.0 for m in GUARD_METRICS}
        return {m: np.zeros(0) for m in GUARD_METRICS}, zero, dict(zero)
    ranks = model_ranks(model, seen, device, batch_size) if mine is None else mine
    tables = {k: getattr(mem, k) for k in ItemMemory.TABLES}
    blend = count_blend_ranks(tables, model.cfg, seen, device, batch_size, known_items).double().numpy()
    ours = {m: per_session(ranks, m) for m in GUARD_METRICS}
    theirs = {m: per_session(blend, m) for m in GUARD_METRICS}
    diffs = {m: ours[m] - theirs[m] for m in GUARD_METRICS}
    return (
        diffs,
        {m: float(v.mean()) for m, v in ours.items()},
        {m: float(v.mean()) for m, v in theirs.items()},
    )


def curve_gain(
    model: SessionModel,
    other: dict[str, Tensor],
    use_curve: bool,
    seen: SessionTensors,
    device: torch.device,
    batch_size: int,
    *,
    mine: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """Score `seen` (sessions of the next window, as known after this one: `next_sessions`) with the
    model as it stands (the curve's stacking if `use_curve`, the identity's otherwise; `mine`: its
    ranks there, if already scored) and with the `other` combiner; the model is left as it was.

    Returns (per-session NDCG@20 of the curve minus the identity's, over the sessions whose target
    is known; the mean NDCG@20 with the identity and with the curve over the same sessions)."""
    mem = model.item_memory
    assert mem is not None, "the forward check needs the item memory"
    ours = per_session(model_ranks(model, seen, device, batch_size) if mine is None else mine, METRIC)
    own = combiner_state(mem)
    load_combiner(mem, other)
    try:
        theirs = per_session(model_ranks(model, seen, device, batch_size), METRIC)
    finally:
        load_combiner(mem, own)
    curve, identity = (ours, theirs) if use_curve else (theirs, ours)
    return (
        curve - identity,
        float(identity.mean()) if len(seen) else 0.0,
        float(curve.mean()) if len(seen) else 0.0,
    )


def model_ranks(model: SessionModel, st: SessionTensors, device: torch.device, batch_size: int) -> np.ndarray:
    """(N,) target ranks of the model as it stands on `st` (the evaluation's served ranking)."""
    if len(st) == 0:
        return np.zeros(0)
    ranks: dict[str, np.ndarray] = {}
    evaluate_model(model, st, device, batch_size, ranks_out=ranks)
    return ranks["model"]


@dataclass
class Pooled:
    """Paired differences pooled over every check so far: how many, their sum and sum of squares."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, diffs: np.ndarray) -> None:
        d = np.asarray(diffs, dtype=np.float64)
        self.n, self.total, self.squares = (
            self.n + len(d),
            self.total + float(d.sum()),
            self.squares + float((d * d).sum()),
        )

    @property
    def z(self) -> float:
        """The pooled mean over its standard error; 0 with fewer than 2 or no spread."""
        if self.n < 2:
            return 0.0
        mean = self.total / self.n
        var = max(0.0, (self.squares - self.n * mean * mean) / (self.n - 1))
        return mean / math.sqrt(var / self.n) if var > 0 else 0.0

    def entry(self) -> list[float]:
        """As a metrics row holds it: [n, total, squares]."""
        return [self.n, self.total, self.squares]


@dataclass
class ForwardCheck(Pooled):
    """The curve's pooled differences (curve minus identity), and the choice they make."""

    use_curve: bool = False
    slopes: list[float] | None = None  # the curve's stacking of the newest window (stack_choice)

    def add_window(self, diffs: np.ndarray, window: int, identity: float, curve: float) -> dict[str, Any]:
        """Pool one window's differences and choose again; returns the metrics row's entry."""
        self.add(diffs)
        z = self.z
        self.use_curve = z > Z_SWITCH
        return {
            "window": window,
            "sessions": len(diffs),
            f"{METRIC}_identity": identity,
            f"{METRIC}_curve": curve,
            "pooled_sessions": self.n,
            "pooled_total": self.total,
            "pooled_squares": self.squares,
            "pooled_gain": self.total / self.n if self.n else 0.0,
            "z": z,
            "use_curve_next": self.use_curve,
        }

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> ForwardCheck:
        """The state after the metrics rows of a run (--resume): the newest check and curve."""
        out = cls()
        for row in rows:
            if c := row.get("curve_check"):
                out.n, out.total, out.squares = (
                    int(c["pooled_sessions"]),
                    c["pooled_total"],
                    c["pooled_squares"],
                )
                out.use_curve = bool(c["use_curve_next"])
            if row.get("cooc_curve_slopes"):
                out.slopes = list(row["cooc_curve_slopes"])
        return out


@dataclass
class GuardCheck:
    """The guard's pooled differences (model minus count blend) per metric, and its choice."""

    pooled: dict[str, Pooled] = field(default_factory=lambda: {m: Pooled() for m in GUARD_METRICS})
    use_blend: bool = False

    def add_window(
        self, diffs: dict[str, np.ndarray], window: int, model: dict[str, float], blend: dict[str, float]
    ) -> dict[str, Any]:
        """Pool one window's differences and choose again; returns the metrics row's entry."""
        for m in GUARD_METRICS:
            self.pooled[m].add(diffs[m])
        zs = {m: self.pooled[m].z for m in GUARD_METRICS}
        self.use_blend = any(z < -Z_SWITCH for z in zs.values())
        return {
            "window": window,
            "sessions": len(diffs[GUARD_METRICS[0]]),
            "model": model,
            "blend": blend,
            "pooled": {m: self.pooled[m].entry() for m in GUARD_METRICS},
            "z": zs,
            "use_blend_next": self.use_blend,
        }

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> GuardCheck:
        """The state after the metrics rows of a run (--resume): the newest guard check."""
        out = cls()
        for row in rows:
            if c := row.get("guard_check"):
                out.pooled = {m: Pooled(int(c["pooled"][m][0]), *c["pooled"][m][1:]) for m in GUARD_METRICS}
                out.use_blend = bool(c["use_blend_next"])
        return out
