"""Baselines against hand-computed counts and ranks."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import BASELINES, BaselineCounts, evaluate_baselines, last_input_items, memory_tables

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


# --- V-SKNN (session-rec VMContextKNN, see training/baselines.py) ---------------------------------
# TRAIN as session sets, oldest first: s0 {3,4,5}, s1 {4,5}, s2 {3,5}, s3 {4,6}, s4 {7} (OOV 2 not indexed).
# Input [3, 4] (n=2): weights 3 -> 1/2, 4 -> 2/2; d=2 distinct items; step 1 = the last click (4).
#   sim: s0 (1/2+1)/2 = 3/4 (step 1), s1 1/2 (step 1), s3 1/2 (step 1), s2 (1/2)/2 = 1/4 (step 2)
#   scores: 3: 3/4 + 1/4/2 = 7/8, 4: 3/4+1/2+1/2 = 7/4, 5: 3/4+1/2+1/8 = 11/8, 6: 1/2
# Input [4, 3] (the decay reversed): s0 3/4 (1), s2 1/2 (1), s1 1/4 (2), s3 1/4 (2)
#   scores: 3: 3/4+1/2 = 5/4, 4: 3/4+1/8+1/8 = 1, 5: 3/4+1/8+1/2 = 11/8, 6: 1/8
# Input [4, 3, 4] (a repeat keeps its last position): 4 -> 3/3, 3 -> 2/3, d=2
#   s0 5/6 (1), s1 1/2 (1), s3 1/2 (1), s2 1/3 (step 3-2+1 = 2)
# k=2: neighbours s0 and s3 (s3 and s1 tie at 1/2: the more recent wins)
#   scores 3: 3/4, 4: 5/4, 5: 3/4, 6: 1/2 -> 3 and 5 tie: popularity puts 5 (pop 4) before 3 (pop 2)
# sample_size=2: only the 2 most recent candidates s2, s3 (s0 and s1 are dropped although more similar)
#   scores 3: 1/8, 5: 1/8, 4: 1/2, 6: 1/2 -> ties by popularity: 4, 6, 5, 3
# fmt: off
VSKNN_CASES = [
    # (id, k, sample_size, input, neighbours [(session, sim, step)], raw scores, ranking of items 3..7)
    ("decay", 100, 500, [3, 4], [(0, 3 / 4, 1), (3, 1 / 2, 1), (1, 1 / 2, 1), (2, 1 / 4, 2)],
     {3: 7 / 8, 4: 7 / 4, 5: 11 / 8, 6: 1 / 2}, [4, 5, 3, 6, 7]),
    ("decay_reversed", 100, 500, [4, 3], [(0, 3 / 4, 1), (2, 1 / 2, 1), (3, 1 / 4, 2), (1, 1 / 4, 2)],
     {3: 5 / 4, 4: 1.0, 5: 11 / 8, 6: 1 / 8}, [5, 3, 4, 6, 7]),
    ("repeat", 100, 500, [4, 3, 4], [(0, 5 / 6, 1), (3, 1 / 2, 1), (1, 1 / 2, 1), (2, 1 / 3, 2)],
     {3: 5 / 6 + 1 / 6, 4: 11 / 6, 5: 5 / 6 + 1 / 2 + 1 / 6, 6: 1 / 2}, [4, 5, 3, 6, 7]),
    ("k2_ties_by_popularity", 2, 500, [3, 4], [(0, 3 / 4, 1), (3, 1 / 2, 1)],
     {3: 3 / 4, 4: 5 / 4, 5: 3 / 4, 6: 1 / 2}, [4, 5, 3, 6, 7]),
    ("recent_sample", 100, 2, [3, 4], [(3, 1 / 2, 1), (2, 1 / 4, 2)],
     {3: 1 / 8, 4: 1 / 2, 5: 1 / 8, 6: 1 / 2}, [4, 6, 5, 3, 7]),
    ("oov_input_ignored", 100, 500, [2, 4], [(3, 1.0, 1), (1, 1.0, 1), (0, 1.0, 1)],
     {3: 1.0, 4: 3.0, 5: 2.0, 6: 1.0}, [4, 5, 3, 6, 7]),
    ("unknown_item_only", 100, 500, [9], [], {}, [5, 4, 3]),  # no neighbour: popularity (6, 7 tie)
]
# fmt: on


@pytest.mark.parametrize(
    "k,sample,inp,neighbours,raw,ranking", [c[1:] for c in VSKNN_CASES], ids=[c[0] for c in VSKNN_CASES]
)
def test_vsknn_hand_computed(k, sample, inp, neighbours, raw, ranking):
    c = BaselineCounts(V, vsknn_k=k, vsknn_sample_size=sample)
    c.add_sessions(*pad(TRAIN[:3]))  # two windows: recency continues across add_sessions calls
    c.add_sessions(*pad(TRAIN[3:]))
    items, lengths = pad([inp])
    nb = c.vsknn_neighbours(items, lengths)
    assert nb["row"].tolist() == [0] * len(neighbours)
    assert nb["session"].tolist() == [s for s, _, _ in neighbours]
    assert nb["sim"] == pytest.approx([x for _, x, _ in neighbours])
    assert nb["step"].tolist() == [x for _, _, x in neighbours]
    got = c.vsknn_scores(items, lengths).toarray()[0]
    expect = np.zeros(V)
    for item, score in raw.items():
        expect[item] = score
    assert got == pytest.approx(expect)
    # ranks of the ranking's items are 1, 2, ... (pessimistic: a tie would push both down)
    n = len(ranking)
    assert c.ranks(
        "vsknn",
        last_input_items(items, lengths).repeat(n),
        np.array(ranking),
        inputs=(items.repeat(n, 0), lengths.repeat(n)),
    ).tolist() == list(range(1, n + 1))


def test_vsknn_batch_equals_one_by_one(counts):
    items, lengths = pad([[3, 4], [4, 3], [], [5], [6, 4, 7, 3]])
    batch = counts.vsknn_scores(items, lengths).toarray()
    for i in range(len(lengths)):
        assert counts.vsknn_scores(items[i : i + 1], lengths[i : i + 1]).toarray()[0] == pytest.approx(
            batch[i]
        )
    targets = np.array([5, 3, 4, 3, 5])
    last = last_input_items(items, lengths)
    full = counts.ranks("vsknn", last, targets, inputs=(items, lengths))
    assert counts.ranks("vsknn", last, targets, chunk=2, inputs=(items, lengths)).tolist() == full.tolist()


def test_vsknn_empty_input_unseen_target_special_ids(counts):
    items, lengths = pad([[], [3, 4], [3, 4], [3, 4]])
    last = last_input_items(items, lengths)
    s = counts.scores("vsknn", last, inputs=(items, lengths))
    pop = counts.pop / (counts.pop.max() + 1.0)
    assert s[0, 3:8].tolist() == pop[3:8].tolist()  # empty input: popularity exactly
    assert np.isneginf(s[:, :3]).all()  # special ids (OOV 2 was seen in training) never ranked
    assert np.isneginf(s[:, 8:]).all()  # 8, 9 never seen in training
    # empty input -> 5 (most popular) first; 9 never seen = miss; OOV target = miss
    ranks = counts.ranks("vsknn", last, np.array([5, 4, 9, 2]), inputs=(items, lengths))
    assert ranks.tolist() == [1, 1, INF, INF]


def test_vsknn_needs_the_inputs(counts):
    with pytest.raises(ValueError, match="inputs="):
        counts.scores("vsknn", np.array([3]))
    with pytest.raises(ValueError, match="vsknn_k"):
        BaselineCounts(V, vsknn_k=0)


def _vsknn_loop(train: list[list[int]], inp: list[int], k: int, sample_size: int) -> dict[int, float]:
    """session-rec's VMContextKNN.predict_next, written as plain loops (defaults: div / div)."""
    sets = [{i for i in s if i >= 3} for s in train]
    n = len(inp)
    pos_map = {item: p / n for p, item in enumerate(inp, 1) if item >= 3}  # later clicks overwrite
    if not pos_map:
        return {}
    relevant = sorted({s for s, items in enumerate(sets) if items & set(pos_map)}, reverse=True)
    sample = relevant[:sample_size]  # most recent first
    sims = [(s, sum(pos_map[i] for i in sets[s] & set(pos_map)) / len(pos_map)) for s in sample]
    neighbours = sorted(sims, key=lambda x: -x[1])[:k]  # stable: ties keep the more recent first
    scores: dict[int, float] = {}
    for s, sim in neighbours:
        step = next(st for st, item in enumerate(reversed(inp), 1) if item in sets[s])
        for item in sets[s]:
            scores[item] = scores.get(item, 0.0) + sim / step
    return scores


@pytest.mark.parametrize("k,sample_size", [(100, 500), (4, 7), (1, 3)])
def test_vsknn_matches_a_plain_loop_version(k, sample_size):
    rng = np.random.default_rng(0)
    V2 = 14  # few items: many shared items, ties and a sample that bites
    train = [rng.integers(2, V2, size=rng.integers(1, 7)).tolist() for _ in range(60)]
    inputs = [rng.integers(2, V2, size=rng.integers(0, 6)).tolist() for _ in range(40)]
    c = BaselineCounts(V2, vsknn_k=k, vsknn_sample_size=sample_size)
    for lo in range(0, 60, 25):  # three windows
        c.add_sessions(*pad(train[lo : lo + 25], width=6))
    got = c.vsknn_scores(*pad(inputs, width=6)).toarray()
    for row, inp in enumerate(inputs):
        expect = np.zeros(V2)
        for item, score in _vsknn_loop(train, inp, k, sample_size).items():
            expect[item] = score
        assert got[row] == pytest.approx(expect, abs=1e-12), (inp, row)


# --- two-hop fill of the item memory's co-occurrence rows (memory_tables(..., hop2=w)) ---------


def test_two_hop_fill_hand_computed(counts):
    """TRAIN's co-occurrences (off the diagonal): 3: {4: 1, 5: 2}, 4: {3: 1, 5: 2, 6: 1},
    5: {3: 2, 4: 2}, 6: {4: 1}, 7: {2: 1}. A row is filled after its own entries with the items
    reached through one of them and never seen with it, s(z) = sum_y log1p(c[a,y]) log1p(c[y,z])."""
    plain = memory_tables(counts, k=5)
    t = memory_tables(counts, k=5, hop2=0.5)
    ln2, ln3 = np.log(2.0), np.log(3.0)
    # 6 -> 4 -> {5 (count 2), 3 (count 1)}: s(5) = ln2 * ln3, s(3) = ln2 * ln2, scaled to the best
    assert t["cooc_idx"][6].tolist() == [4, 5, 3, 0, 0]
    assert t["cooc_val"][6] == pytest.approx([1.0, 0.5, 0.5 * ln2 / ln3, 0.0, 0.0])
    # 3 -> 4 -> 6 (5 is seen with 3, 3 is itself); 5 -> 4 -> 6 too (5's count with itself bridges nothing)
    n3, n5 = int((plain["cooc_val"][3] > 0).sum()), int((plain["cooc_val"][5] > 0).sum())
    assert t["cooc_idx"][3, n3] == 6 and t["cooc_val"][3, n3] == pytest.approx(0.5)
    assert t["cooc_idx"][5, n5] == 6 and t["cooc_val"][5, n5] == pytest.approx(0.5)
    assert (t["cooc_val"][3, n3 + 1 :] == 0).all() and (t["cooc_val"][5, n5 + 1 :] == 0).all()
    # 4 reaches nothing new; 7 reaches only itself (through the OOV id 2): both unchanged
    for a in (4, 7):
        assert np.array_equal(t["cooc_idx"][a], plain["cooc_idx"][a])
        assert np.array_equal(t["cooc_val"][a], plain["cooc_val"][a])
    # the other tables and a full row are untouched; hop2 = 0 is the plain tables
    for name in ("succ_idx", "succ_val", "pop"):
        assert np.array_equal(t[name], plain[name])
    full = memory_tables(counts, k=2, hop2=0.5)
    assert np.array_equal(full["cooc_idx"][4], memory_tables(counts, k=2)["cooc_idx"][4])
    for name, table in memory_tables(counts, k=5, hop2=0.0).items():
        assert np.array_equal(table, plain[name])


def test_two_hop_fill_matches_a_plain_loop_version():
    rng = np.random.default_rng(3)
    V2, K = 60, 30
    train = [rng.integers(2, V2, size=rng.integers(2, 7)).tolist() for _ in range(60)]
    c = BaselineCounts(V2, sessions=False)
    c.add_sessions(*pad(train, width=6))
    plain, t = memory_tables(c, K), memory_tables(c, K, hop2=0.7)
    C = c.cooc.toarray()
    filled_rows = capped = 0
    for a in range(V2):
        n = int((plain["cooc_val"][a] > 0).sum())
        assert np.array_equal(t["cooc_idx"][a, :n], plain["cooc_idx"][a, :n])
        s = np.zeros(V2)
        if 0 < n < K:
            for y in plain["cooc_idx"][a, :n]:
                bridge = [z for z, v in zip(plain["cooc_idx"][y, :5], plain["cooc_val"][y, :5]) if v > 0]
                # y's 5 strongest entries (HOP2_BRIDGE); its count with itself bridges nothing
                for z in bridge:
                    if y != a and z != y and C[a, z] == 0 and z != a and z >= 3:
                        s[z] += np.log1p(C[a, y]) * np.log1p(C[y, z])
        s = np.round(s, 9)  # equal scores tie, then popularity decides, then the lower id
        reached = sorted(np.nonzero(s)[0], key=lambda z: (-s[z], -c.pop[z]))
        best = reached[: min(K - n, 10)]  # HOP2_MOST
        capped += len(reached) > 10 and K - n > 10
        assert t["cooc_idx"][a, n : n + len(best)].tolist() == best, a
        if best:
            filled_rows += 1
            assert t["cooc_val"][a, n : n + len(best)] == pytest.approx(
                0.7 * s[best] / s[best].max(), rel=1e-6
            )
        assert (t["cooc_val"][a, n + len(best) :] == 0).all()
    assert filled_rows >= 5 and capped >= 1, (filled_rows, capped)  # the check is not vacuous


def test_memory_hop2_must_be_a_pseudo_count():
    from training.model.config import ModelConfig

    with pytest.raises(ValueError, match=r"memory_hop2 must be in \[0, 1\].*got 1.5"):
        ModelConfig(memory_hop2=1.5)


def test_two_hop_fill_of_weighted_counts_far_below_one_fills_no_nan():
    """Weighted counts (bench.count_fusion's decay) can give two-hop scores that round to 0: such an
    item is not filled in (it was, with a 0 / 0 pseudo-count)."""
    from training.baselines import two_hop_fill

    # a -> y with count 1e-5, y -> z with count 1e-5: s(z) = log1p(1e-5) ** 2 ~ 1e-10, rounds to 0
    idx = np.zeros((6, 3), dtype=np.int32)
    val = np.zeros((6, 3), dtype=np.float32)
    idx[3, 0], val[3, 0] = 4, 1e-5
    idx[4, :2], val[4, :2] = [3, 5], [1e-5, 1e-5]
    tie = np.zeros(6)
    out_idx, out_val = two_hop_fill(idx, val, 0.6, tie)
    assert np.isfinite(out_val).all()
    assert np.array_equal(out_idx, idx) and np.array_equal(out_val, val)
    # the same shape with counts of 1 fills 5 into row 3
    val[val > 0] = 1.0
    out_idx, out_val = two_hop_fill(idx, val, 0.6, tie)
    assert out_idx[3, 1] == 5 and out_val[3, 1] == pytest.approx(0.6)
