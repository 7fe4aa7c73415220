"""The forward check (TrainConfig.cooc_curve_fit "choose"): which of two stackings of the item
memory's combiner serves, chosen on the next window's training sessions.

Why: the co-occurrence curve (ModelConfig.cooc_curve) lifts one log and costs another
(docs/quality.md, "Session of 2026-12-06 (sixth)"), and the held-back slice of window t cannot tell
them apart: stacking fits the curve there, so it favours the curve on both. What the evaluation and
serving meet is the *next* window, scored with the counts of the windows up to t. Window t+1's
training split, scored by the model after window t with those counts, is that condition exactly,
and it is training data: the choice reads no evaluation split. It is made after window t's
evaluation and applies from window t+1's model on, so no model is chosen on sessions of the window
it is evaluated on.

    row.update(stack_choice(model, held, ..., use_curve=check.use_curve))   # fit: both stackings
    row["curve_check"] = check.add(curve_gain(model, other, next_sessions, ...))  # after window t
    check = ForwardCheck.from_rows(rows)                                      # --resume

Decision: the paired per-session NDCG@20 differences (curve minus identity) of every check so far
are pooled; the curve serves once their mean is positive at z > Z_SWITCH (one-sided 95 %), and the
identity (plain log1p counts, the recipe without the curve) otherwise. Sessions whose target the
model cannot know (first seen in window t+1) are left out: both variants miss them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from training.data.splits import SessionTensors, available_windows
from training.evaluate import evaluate_model, known_inputs
from training.metrics import per_session
from training.model import ItemMemory, SessionModel

if TYPE_CHECKING:
    from training.trainer import Trainer

Z_SWITCH = 1.645  # one-sided 95 %: the curve must show its gain, the identity is the default
METRIC = "ndcg@20"


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


def check_next_window(trainer: Trainer, t: int) -> dict[str, Any]:
    """After window t (its evaluation made): the check on window t+1's training split, at most the
    newest TrainConfig.forward_check_sessions of it, scored with the counts of windows <= t (the
    memory as the evaluation left it), between the model's stacking and the one the fit set aside
    (`Trainer.other_combiner`, used up here); the choice is pooled into `trainer.check` and the
    returned metrics row entry. {} where the data has no window t+1."""
    other, trainer.other_combiner = trainer.other_combiner, None
    cfg = trainer.cfg
    if other is None or t + 1 not in available_windows(trainer.data, trainer.schema):
        return {}
    t0 = time.perf_counter()
    st = trainer.history.raw(t + 1)
    if len(st) > cfg.forward_check_sessions:  # the newest (a split's rows follow time)
        st = st.select(torch.arange(len(st) - cfg.forward_check_sessions, len(st)))
    check = trainer.check
    diffs, identity, curve = curve_gain(
        trainer.model, other, check.use_curve, st, trainer.known_sizes(t), trainer.device,
        cfg.eval_batch_size, trainer.age_feature,
    )  # fmt: skip
    entry = check.add(diffs, t + 1, identity, curve)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([int(check.use_curve)], device=trainer.device)
        torch.distributed.broadcast(flag, 0)  # every rank scored the same; rank 0's decision rules
        check.use_curve = entry["use_curve_next"] = bool(flag.item())
    entry["seconds"] = time.perf_counter() - t0  # reading the split and scoring it twice
    return {"curve_check": entry}


def curve_gain(
    model: SessionModel,
    other: dict[str, Tensor],
    use_curve: bool,
    st: SessionTensors,
    known: dict[str, int],
    device: torch.device,
    batch_size: int,
    age_feature: str | None = None,
) -> tuple[np.ndarray, float, float]:
    """Score `st` (sessions of the next window, as known after this one: `known_inputs`) with the
    model as it stands (the curve's stacking if `use_curve`, the identity's otherwise) and with the
    `other` combiner; the model is left as it was.

    Returns (per-session NDCG@20 of the curve minus the identity's, over the sessions whose target
    is known; the mean NDCG@20 with the identity and with the curve over the same sessions)."""
    mem = model.item_memory
    assert mem is not None, "the forward check needs the item memory"
    seen, miss = known_inputs(st, known, model.cfg.item_feature, age_feature)
    ok = torch.nonzero(~miss & (seen.lengths >= 2)).flatten()
    seen = seen.select(ok)
    mine = _per_session(model, seen, device, batch_size)
    own = combiner_state(mem)
    load_combiner(mem, other)
    try:
        theirs = _per_session(model, seen, device, batch_size)
    finally:
        load_combiner(mem, own)
    curve, identity = (mine, theirs) if use_curve else (theirs, mine)
    return (
        curve - identity,
        float(identity.mean()) if len(ok) else 0.0,
        float(curve.mean()) if len(ok) else 0.0,
    )


def _per_session(
    model: SessionModel, st: SessionTensors, device: torch.device, batch_size: int
) -> np.ndarray:
    if len(st) == 0:
        return np.zeros(0)
    ranks: dict[str, np.ndarray] = {}
    evaluate_model(model, st, device, batch_size, ranks_out=ranks)
    return per_session(ranks["model"], METRIC)


@dataclass
class ForwardCheck:
    """The pooled paired differences of every check so far, and the choice they make."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0
    use_curve: bool = False
    slopes: list[float] | None = None  # the curve's stacking of the newest window (stack_choice)

    @property
    def z(self) -> float:
        """The pooled mean difference over its standard error (0 with fewer than 2 sessions or no spread)."""
        if self.n < 2:
            return 0.0
        mean = self.total / self.n
        var = max(0.0, (self.squares - self.n * mean * mean) / (self.n - 1))
        return mean / math.sqrt(var / self.n) if var > 0 else 0.0

    def add(self, diffs: np.ndarray, window: int, identity: float, curve: float) -> dict[str, Any]:
        """Pool one window's differences and choose again; returns the metrics row's entry."""
        d = np.asarray(diffs, dtype=np.float64)
        self.n += len(d)
        self.total += float(d.sum())
        self.squares += float((d * d).sum())
        z = self.z
        self.use_curve = z > Z_SWITCH
        return {
            "window": window,
            "sessions": len(d),
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
            if row.get("curve_check"):
                c = row["curve_check"]
                out.n, out.total, out.squares = (
                    int(c["pooled_sessions"]),
                    c["pooled_total"],
                    c["pooled_squares"],
                )
                out.use_curve = bool(c["use_curve_next"])
            if row.get("cooc_curve_slopes"):
                out.slopes = list(row["cooc_curve_slopes"])
        return out
