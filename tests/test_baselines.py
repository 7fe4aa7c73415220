"""Baselines against hand-computed counts and ranks."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import BASELINES, BaselineCounts, evaluate_baselines, last_input_items

INF = float("inf")
V = 10  # ids 0..2 special, 3..9 real; 9 never appears in training


def pad(sessions: list[list[int]], width: int = 5) -> tuple[np.ndarray, np.ndarray]:
    items = np.zeros((len(sessions), width), dtype=np.int64)
    for i, s in enumerate(sessions):
        items[i, : len(s)] = s
    return items, np.array([len(s) for s in sessions])


TRAIN = [[3, 4, 5], [4, 5], [5, 3, 5], [6, 4], [7, 2]]  # 2 = OOV appears in training


@pytest.fixture()
def counts() -> BaselineCounts:
    c = BaselineCounts(V)
    c.add_sessions(*pad(TRAIN))
    return c


def test_counts_hand_computed(counts):
    assert counts.pop.tolist() == [0, 0, 1, 2, 3, 4, 1, 1, 0, 0]
    C = counts.cooc.toarray()
    assert C[3, 4] == C[4, 3] == 1  # session 0
    assert C[4, 5] == 2  # sessions 0, 1
    assert C[3, 5] == 2  # sessions 0, 2 (counted once per session)
    assert C[5, 5] == 1  # item 5 appears twice in session 2 only
    assert C[3, 3] == 0 and C[4, 4] == 0
    assert C[6, 4] == 1 and C[7, 2] == 1
    S = counts.succ.toarray()
    assert S[3, 4] == 1 and S[4, 5] == 2 and S[5, 3] == 1 and S[3, 5] == 1 and S[6, 4] == 1
    assert S[5, 4] == 0 and S.sum() == 7  # 2 + 1 + 2 + 1 + 1 transitions


def test_adding_windows_equals_adding_all_at_once(counts):
    split = BaselineCounts(V)
    split.add_sessions(*pad(TRAIN[:2]))
    split.add_sessions(*pad(TRAIN[2:]))
    assert np.array_equal(split.pop, counts.pop)
    assert (split.cooc != counts.cooc).nnz == 0 and (split.succ != counts.succ).nnz == 0


def test_popular_ranks_and_misses(counts):
    last = np.array([3, 3, 3, 3, 3])
    targets = np.array([5, 4, 3, 6, 9])
    # pop: 5:4, 4:3, 3:2, 6:1, 7:1 (tie: pessimistic), 9 never seen -> miss
    assert counts.ranks("popular", last, targets).tolist() == [1, 2, 3, 5, INF]


def test_special_ids_never_ranked(counts):
    s = counts.scores("popular", np.array([3]))
    assert np.isneginf(s[0, :3]).all()  # OOV (2) was seen in training, still never ranked
    assert counts.ranks("popular", np.array([3]), np.array([2])).tolist() == [INF]


def test_cooc_knn_ties_broken_by_popularity(counts):
    # last item 4: cooc 3:1, 5:2, 6:1 ; ties between 3 (pop 2) and 6 (pop 1) -> 3 first; then
    # the non-co-occurring items by popularity: 4 itself (pop 3), 7 (pop 1)
    last = np.array([4, 4, 4, 4, 4])
    assert counts.ranks("cooc_knn", last, np.array([5, 3, 6, 4, 7])).tolist() == [1, 2, 3, 4, 5]


def test_successor_knn(counts):
    # after 5: 3 once; after 3: 4 once, 5 once (tie -> popularity: 5 first)
    assert counts.ranks("successor_knn", np.array([5]), np.array([3])).tolist() == [1]
    assert counts.ranks("successor_knn", np.array([3, 3]), np.array([5, 4])).tolist() == [1, 2]
    # item 7 never followed by a real item: pure popularity (5, 4, 3, ...)
    assert counts.ranks("successor_knn", np.array([7]), np.array([5])).tolist() == [1]


def test_empty_input_falls_back_to_popularity(counts):
    last = last_input_items(*pad([[], [6, 4]]))
    assert last.tolist() == [0, 4]
    for name in ("cooc_knn", "successor_knn"):
        assert counts.ranks(name, np.array([0]), np.array([5])).tolist() == [1]


def test_evaluate_baselines_keys_and_chunking(counts):
    items, lengths = pad([[3, 4], [4, 5, 3], [5]])
    targets = np.array([5, 3, 9])
    out = evaluate_baselines(counts, items, lengths, targets)
    assert set(out) == set(BASELINES)
    assert out["popular"]["recall@10"] == pytest.approx(2 / 3)  # 9 is a miss
    small = counts.ranks("cooc_knn", last_input_items(items, lengths), targets, chunk=1)
    assert small.tolist() == counts.ranks("cooc_knn", last_input_items(items, lengths), targets).tolist()


def test_unknown_baseline(counts):
    with pytest.raises(ValueError, match="unknown baseline"):
        counts.scores("nope", np.array([3]))
