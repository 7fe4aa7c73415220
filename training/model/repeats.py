"""RepeatInput (ModelConfig.repeat_feature): how often a position's item occurs elsewhere in its session.

An input per position, added after masking: the number of other positions of the same session that
show the same item and that the position may attend to (clm: the earlier ones only), capped at
BUCKETS - 1, as an embedding (zero rows at the start, so a model starts as it would without it).
Why: most items of a real log keep item vectors near zero, so without it the network cannot tell
that a session re-visits its items (docs/quality.md, "Session of 2026-12-06 (fifth)").
A masked position neither counts nor gets a count (its target would leak); pad, null and OOV ids
never match. Pure tensor code, traceable.

Also the re-visit rates behind TrainConfig.repeat_reweight (`revisit_rates`, `revisit_weights`): a
training target re-visits its session less often than the evaluation's (the last item, with its whole
session before it); weighing the training targets by the ratio of the two rates corrects that prior.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from training.names import FIRST_REAL_ID

BUCKETS = 4  # an item seen 0, 1, 2, or 3+ times elsewhere in its session


class RepeatInput(nn.Module):
    def __init__(self, dim: int, causal: bool):
        super().__init__()
        self.emb = nn.Embedding(BUCKETS, dim)
        nn.init.zeros_(self.emb.weight)
        self.causal = causal

    def forward(self, x: Tensor, items: Tensor, segment: Tensor, visible: Tensor) -> Tensor:
        """(B, L, dim) inputs after masking, (B, L) item ids, segment ids and which positions show
        their item (real and not masked) -> x + the embedding of each visible position's count."""
        shown = visible & (items >= FIRST_REAL_ID)  # (B, L)
        pos = torch.arange(items.shape[1], device=items.device)
        same = (items[:, :, None] == items[:, None, :]) & (segment[:, :, None] == segment[:, None, :])
        same &= shown[:, :, None] & shown[:, None, :] & (pos[:, None] != pos[None, :])  # (B, Lq, Lk)
        if self.causal:
            same &= pos[None, :] < pos[:, None]  # keys before the query
        count = same.sum(-1).clamp(max=BUCKETS - 1)  # (B, L)
        return x + self.emb(count).to(x.dtype) * shown[:, :, None].to(x.dtype)


def revisit_rates(items: Tensor, lengths: Tensor, masked: Tensor | None) -> tuple[float, float]:
    """(N, L) right-padded sessions, (N,) lengths, (N, L) masked positions (None: clm, every next
    item) -> (share of the sessions of >= 2 items whose last item re-visits an earlier one, share of
    the training targets that re-visit a visible earlier item of their session)."""
    L = items.shape[1]
    pos = torch.arange(L)
    real = pos[None, :] < lengths[:, None]  # (N, L)
    earlier = pos[None, :, None] > pos[None, None, :]  # (1, Lq, Lk) key before the query
    same = items[:, :, None] == items[:, None, :]  # (N, Lq, Lk)
    visible = real if masked is None else real & ~masked
    hit = (same & earlier & visible[:, None, :]).any(2)  # (N, L) a visible earlier key holds the item
    seen = (same & earlier & real[:, None, :]).any(2)  # (N, L) any earlier key does (serving's view)
    multi = lengths >= 2
    r_last = seen[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)][multi].float().mean()
    targets = (masked & real) if masked is not None else (real & (pos[None, :] >= 1))
    r_train = hit[targets].float().mean()
    return float(r_last) if multi.any() else 0.0, float(r_train) if targets.any() else 0.0


def revisit_weights(
    ctx_items: Tensor, ctx: Tensor, targets: Tensor, weights: tuple[float, float] | None
) -> Tensor | None:
    """(M, W) the targets' context items and which positions are context, (M,) targets, (weight of a
    target that re-visits its context, weight of a new one) -> (M,) weights (None: None)."""
    if weights is None:
        return None
    rep = ((ctx_items == targets[:, None]) & ctx).any(1)  # (M,)
    return torch.where(rep, weights[0], weights[1]).float()


def prior_weights(r_last: float, r_train: float) -> tuple[float, float]:
    """Label-shift weights that move the training targets' re-visit share r_train to r_last:
    (r_last / r_train, (1 - r_last) / (1 - r_train)); (1, 1) where either share is 0 or 1."""
    if not (0.0 < r_train < 1.0 and 0.0 < r_last < 1.0):
        return 1.0, 1.0
    return r_last / r_train, (1.0 - r_last) / (1.0 - r_train)


def set_revisit_prior(model: Any, st: Any, generator: torch.Generator) -> dict[str, Any]:
    """TrainConfig.repeat_reweight: set `model.target_weights` (a SessionModel) for a fit on sessions
    `st` (SessionTensors) from the re-visit shares of their last items and of their training targets
    (masked LM: masks drawn once with `generator`); -> the metrics row's entries."""
    item = model.cfg.item_feature
    items, lengths = st.feats[item], st.lengths
    masked = model.draw_masks(items, lengths, generator).masked if model.cfg.objective == "mlm" else None
    r_last, r_train = revisit_rates(items, lengths, masked)
    model.target_weights = prior_weights(r_last, r_train)
    return {"revisit_last": r_last, "revisit_train": r_train, "revisit_weights": list(model.target_weights)}
