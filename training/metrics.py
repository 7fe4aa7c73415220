"""Ranking metrics for next-item prediction with one target per session.

For every evaluation session (none dropped) the rank of the target over the
full catalogue is computed pessimistically: ties never help the target,

    rank = 1 + #{items j != target : score_j >= score_target}

(so a -inf target ranks below every other item). Then, for k in KS,

    Recall@k (= hit rate with one target) = [rank <= k]
    NDCG@k = [rank <= k] / log2(rank + 1)        (IDCG = 1 with one target)
    MRR@k  = [rank <= k] / rank

averaged over sessions. A rank of +inf is a miss (used by the baselines for
targets never seen in training).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

KS = (10, 20, 40)
METRIC_NAMES = ("ndcg", "recall", "mrr")


def metric_keys(ks: tuple[int, ...] = KS) -> list[str]:
    return [f"{m}@{k}" for m in METRIC_NAMES for k in ks]


def pessimistic_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """(B, V) scores, (B,) target ids -> (B,) float64 ranks, 1 = best, ties against the target."""
    ts = scores.gather(1, targets[:, None])  # (B, 1)
    ge = scores >= ts  # (B, V)
    ge.scatter_(1, targets[:, None], False)  # the target does not outrank itself
    return (1 + ge.sum(1)).to(torch.float64)


def pessimistic_ranks_np(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """numpy twin of `pessimistic_ranks` (for the baselines)."""
    rows = np.arange(len(targets))
    ts = scores[rows, targets]
    ge = scores >= ts[:, None]
    ge[rows, targets] = False
    return (1 + ge.sum(1)).astype(np.float64)


def per_session(ranks: np.ndarray | Tensor, metric: str) -> np.ndarray:
    """(N,) one metric ("ndcg@K", "recall@K" or "mrr@K") of each session from its 1-based target
    rank (+inf = a miss): what `metrics_from_ranks` averages."""
    r = ranks.detach().cpu().numpy() if isinstance(ranks, Tensor) else np.asarray(ranks)
    r = r.astype(np.float64)
    name, k = metric.split("@")
    hit = r <= int(k)
    safe = np.where(hit, r, 1.0)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(safe + 1.0), 0.0)
    if name == "recall":
        return hit.astype(np.float64)
    if name == "mrr":
        return np.where(hit, 1.0 / safe, 0.0)
    raise ValueError(f"metric {metric!r}: expected ndcg@K, recall@K or mrr@K")


def metrics_from_ranks(ranks: np.ndarray | Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Mean NDCG@k, Recall@k, MRR@k over sessions from their (1-based) target ranks."""
    r = ranks.detach().cpu().numpy() if isinstance(ranks, Tensor) else np.asarray(ranks)
    r = r.astype(np.float64)
    if r.size == 0:
        raise ValueError("no evaluation sessions: metrics are undefined")
    if np.isnan(r).any() or (r < 1).any():
        raise ValueError("ranks must be >= 1 (use +inf for a miss)")
    out = {f"{m}@{k}": float(per_session(r, f"{m}@{k}").mean()) for m in ("ndcg", "recall", "mrr") for k in ks}
    assert all(math.isfinite(v) for v in out.values())
    return out
