"""RepeatInput (ModelConfig.repeat_feature): how often a position's item occurs elsewhere in its session.

An input per position, added after masking: the number of other positions of the same session that
show the same item and that the position may attend to (clm: the earlier ones only), capped at
BUCKETS - 1, as an embedding (zero rows at the start, so a model starts as it would without it).
Why: most items of a real log keep item vectors near zero, so without it the network cannot tell
that a session re-visits its items (docs/quality.md, "Session of 2026-12-06 (fifth)").
A masked position neither counts nor gets a count (its target would leak); pad, null and OOV ids
never match. Pure tensor code, traceable.
"""

from __future__ import annotations

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
