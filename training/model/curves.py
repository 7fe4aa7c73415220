"""Learned curves of the item memory's counts: PopPrior (ModelConfig.pop_prior), CountCurve
(ModelConfig.cooc_curve).

PopPrior: a learned score per candidate from its popularity alone.

The item memory's popularity term is g_pop * log1p(pop[c]) with a gate g_pop >= 0: linear in the
log-count and never negative. On NowPlaying1M the gate learns ~0 (so the term is off) while the
most played tracks score 0.88x the count blend's NDCG@20 (docs/quality.md, "Session of 2026-12-06
(fifth)"): the co-occurrence sums already grow with an item's popularity, and a linear term cannot
correct them in one band of popularity and not in another. This term is

    prior(c) = f(log1p(pop[c])),  f piecewise linear over the knots x = 0, 1, ..., n - 1

(one knot per unit of log1p: pop 0, 1.7, 6.4, 19, 54, ... ; flat beyond the last), its knot values
learned with the combiner, of any sign, zero at the start (a model starts as it would without it).
It rides in the memory's matrix product as one more column (`ItemMemory._factors`). In training,
where every session is in the counts, each session's own occurrences are left out of pop first
(`delta`), as for the linear term.

CountCurve: the co-occurrence term reads f(log1p(count)) instead of log1p(count), f piecewise linear
over the knots x = 0, 1, ..., n - 1 and extended along its last segment, f(0) = 0 (a count of zero,
as left by leave-one-out, still adds nothing), the identity at the start. Its parameters are the
slopes of the segments, so a segment no count reaches (larger counts than the log holds) keeps slope 1
from wherever the learned part ends, and f stays increasing as long as the slopes stay positive. It lets the combiner weigh
one strong pair against several weak ones (a session-kNN counts the weak ones as much) otherwise than
the logarithm does. Both: pure tensor code, traceable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PopPrior(nn.Module):
    def __init__(self, knots: int):
        super().__init__()
        if knots < 2:
            raise ValueError(f"pop_prior needs at least 2 knots, got {knots}")
        self.values = nn.Parameter(torch.zeros(knots))

    def forward(self, log_pop: Tensor) -> Tensor:
        """log1p(popularity), any shape -> f(log_pop), the same shape (float32)."""
        n = self.values.shape[0]
        x = log_pop.float().clamp(0.0, n - 1.0)
        i = x.floor().long().clamp_(max=n - 2)
        t = x - i.float()
        v = self.values
        return v[i] * (1.0 - t) + v[i + 1] * t

    def delta(self, pop: Tensor, cnt: Tensor, real: Tensor) -> Tensor:
        """Training's leave-one-out: (R, W) the popularity at each position's item, its occurrences
        in the position's session, which positions are real -> the change of f at that item when
        the session is left out of pop, spread over its occurrences (a scatter adds them up)."""
        out = (self(torch.log1p((pop - cnt).clamp(min=0.0))) - self(torch.log1p(pop))) / cnt.clamp(min=1)
        return torch.where(real, out, 0.0)


class CountCurve(nn.Module):
    def __init__(self, knots: int):
        super().__init__()
        if knots < 2:
            raise ValueError(f"cooc_curve needs at least 2 knots, got {knots}")
        self.slopes = nn.Parameter(torch.ones(knots - 1))  # of the segments [0, 1], [1, 2], ...; f(0) = 0

    def forward(self, x: Tensor) -> Tensor:
        """log1p(count) >= 0, any shape -> f(x), the same shape (float32)."""
        n = self.slopes.shape[0] + 1
        x = x.float()
        i = x.floor().long().clamp_(0, n - 2)
        t = x - i.float()  # > 1 past the last knot: the last segment extended
        v = torch.cat([self.slopes.new_zeros(1), self.slopes.cumsum(0)])  # f at the knots
        return v[i] + self.slopes[i] * t
