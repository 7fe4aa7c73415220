"""Ranking metrics against hand-computed cases (ties, -inf, misses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import KS, metric_keys, metrics_from_ranks, pessimistic_ranks, pessimistic_ranks_np

INF = float("inf")


@pytest.mark.parametrize(
    "scores, target, rank",
    [
        ([0.1, 0.9, 0.5, 0.2], 1, 1),  # strictly best
        ([0.1, 0.9, 0.5, 0.2], 2, 2),
        ([0.1, 0.9, 0.5, 0.5, 0.2], 2, 3),  # a tie counts against the target
        ([0.1, 0.9, 0.5, 0.5, 0.2], 3, 3),  # ... whichever of the tied items it is
        ([0.7, 0.7, 0.7, 0.7], 0, 4),  # all tied: last
        ([-INF, -INF, 1.0, 2.0], 0, 4),  # -inf target ranks below everything, ties included
        ([-INF, -INF, 1.0, 2.0], 2, 2),  # -inf items never outrank a finite target
    ],
)
def test_pessimistic_rank_hand_computed(scores, target, rank):
    s = torch.tensor([scores], dtype=torch.float32)
    assert pessimistic_ranks(s, torch.tensor([target])).tolist() == [rank]
    assert pessimistic_ranks_np(np.array([scores]), np.array([target])).tolist() == [rank]


def test_metrics_hand_computed():
    ranks = np.array([1, 3, 15, 30, 50, INF])
    m = metrics_from_ranks(ranks)
    n = 6
    assert list(m) == metric_keys(KS)
    assert m["recall@10"] == pytest.approx(2 / n)
    assert m["recall@20"] == pytest.approx(3 / n)
    assert m["recall@40"] == pytest.approx(4 / n)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / 2) / n)  # 1/log2(1+1) + 1/log2(3+1)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / 2 + 1 / 4) / n)  # + 1/log2(16)
    assert m["ndcg@40"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / math.log2(31)) / n)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / n)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 15) / n)
    assert m["mrr@40"] == pytest.approx((1 + 1 / 3 + 1 / 15 + 1 / 30) / n)


def test_metrics_boundaries():
    m = metrics_from_ranks(np.array([10.0, 20.0, 40.0, 41.0]))  # rank k is a hit at k, k+1 is not
    assert m["recall@10"] == 0.25 and m["recall@20"] == 0.5 and m["recall@40"] == 0.75
    m = metrics_from_ranks(torch.tensor([1.0]))
    assert all(v == 1.0 for v in m.values())


@pytest.mark.parametrize("ranks", [np.array([]), np.array([0.0]), np.array([np.nan])])
def test_metrics_reject_bad_ranks(ranks):
    with pytest.raises(ValueError):
        metrics_from_ranks(ranks)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-3, 3), min_size=5, max_size=5), min_size=1, max_size=6), st.data())
def test_rank_matches_sorting_definition(rows, data):
    """rank = 1 + #{j != t : s_j >= s_t}, for torch and numpy alike (integer scores make ties likely)."""
    scores = np.array(rows, dtype=np.float64)
    targets = np.array([data.draw(st.integers(0, 4)) for _ in rows])
    want = [1 + sum(scores[i, j] >= scores[i, t] for j in range(5) if j != t) for i, t in enumerate(targets)]
    assert pessimistic_ranks_np(scores, targets).tolist() == want
    assert pessimistic_ranks(torch.from_numpy(scores), torch.from_numpy(targets)).tolist() == want
