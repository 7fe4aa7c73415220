"""Serving top-k without a dense (S, V) score matrix (ModelConfig.rank, SessionModel.next_item_topk).

What must hold:
* rank "exact" is bit-identical to next_item_scores + topk (today's served output),
  eager and traced, also on the serving test artifacts;
* rank "two_stage" returns real ids only, no repeats, scores sorted and equal to
  next_item_scores at those ids (with and without the item memory);
* with a candidate set that covers every item it is the exact ranking;
* candidates hold the session's items, their co-occurrence neighbours, the last item's successors;
* special ids never come back, even with huge special-row vectors and specials in the input;
* the trace keeps the batch dimension dynamic and refuses a stale index;
* "auto" resolves by catalogue size and is recorded; the IVF index holds every item once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.inference import TopKRanker, example_inputs, feature_order, trace_ranker
from tests.sessions_util import random_sessions
from training.baselines import BaselineCounts, memory_tables
from training.checkpoint import load_run
from training.model import ModelConfig, SessionModel, ivf_index
from training.names import FIRST_REAL_ID, ITEM_LIST, PAD_ID

ITEM = ITEM_LIST
V = 300
K_MEM = 6
L = 8


def sessions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return random_sessions(n, V, seed, L, min_len=1)


def make_model(memory: bool, rank: str, **kw) -> SessionModel:
    cfg = ModelConfig(
        categorical={ITEM: V, "category-list": 6},
        objective="clm",
        memory=memory,
        memory_k=K_MEM,
        max_len=L,
        rank=rank,
        **kw,
    )
    torch.manual_seed(0)
    m = SessionModel(cfg)
    if memory:
        items, lengths = sessions(400, seed=1)
        counts = BaselineCounts(V)
        counts.add_sessions(items, lengths)
        with torch.no_grad():  # gates that depend on h
            m.item_memory.gate.weight.normal_(0, 0.3)
        m.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, K_MEM).items()})
    return m.eval()


def batch(n: int, seed: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    items, lengths = sessions(n, seed)
    it = torch.from_numpy(items)
    return {ITEM: it, "category-list": (it % 3 + FIRST_REAL_ID) * (it > 0)}, torch.from_numpy(lengths)


# rank_popular=20 and small lists: a candidate set far smaller than V, so two-stage is not trivially exact
SMALL = dict(rank_popular=20, ivf_list_size=16, ivf_probe=2, ivf_keep=10, rank_context=2)
COVER = dict(rank_popular=V, ivf_list_size=V, ivf_probe=1, ivf_keep=V)  # every item is a candidate


@pytest.mark.parametrize("memory", [False, True])
def test_exact_is_scores_plus_topk_bit_identical(memory):
    m = make_model(memory, "exact")
    feats, lengths = batch(32)
    with torch.no_grad():
        want = torch.topk(m.next_item_scores(feats, lengths), 20, dim=1)
        got = m.next_item_topk(feats, lengths, 20)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("memory", [False, True])
def test_two_stage_real_unique_sorted_and_true_scores(memory):
    m = make_model(memory, "two_stage", **SMALL)
    feats, lengths = batch(64)
    with torch.no_grad():
        scores, ids = m.next_item_topk(feats, lengths, 20)
        full = m.next_item_scores(feats, lengths)
    assert ids.shape == scores.shape == (64, 20)
    assert (ids >= FIRST_REAL_ID).all() and (ids < V).all()
    assert all(len(set(r.tolist())) == 20 for r in ids)
    assert (scores[:, 1:] <= scores[:, :-1]).all()
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, full.gather(1, ids), rtol=1e-5, atol=1e-5)
    # a small candidate set: not the exact ranking for every session (else the test proves nothing)
    assert not torch.equal(ids, torch.topk(full, 20, dim=1).indices)


@pytest.mark.parametrize("memory", [False, True])
def test_two_stage_with_every_item_a_candidate_is_exact(memory):
    m = make_model(memory, "two_stage", **COVER)
    feats, lengths = batch(64)
    with torch.no_grad():
        scores, ids = m.next_item_topk(feats, lengths, 20)
        want_s, want_i = torch.topk(m.next_item_scores(feats, lengths), 20, dim=1)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(scores, want_s, rtol=1e-5, atol=1e-5)


def test_candidates_hold_session_items_neighbours_and_successors():
    m = make_model(True, "two_stage", **SMALL)
    feats, lengths = batch(16)
    items = feats[ITEM]
    mem = m.item_memory
    with torch.no_grad():
        q = m._head_input(m.next_hidden(feats, lengths))
        cand = m.rank_candidates(items, lengths, q)
    assert (cand[:, 1:] >= cand[:, :-1]).all()  # sorted per row
    for b in range(16):
        n = int(lengths[b])
        have = set(cand[b].tolist())
        want = set(items[b, :n].tolist())
        for it in items[b, max(0, n - 2) : n].tolist():  # rank_context = 2 last items
            want |= {int(j) for j, v in zip(mem.cooc_idx[it], mem.cooc_val[it]) if v > 0}
        last = int(items[b, n - 1])
        want |= {int(j) for j, v in zip(mem.succ_idx[last], mem.succ_val[last]) if v > 0}
        want |= set(m.rank_pop_ids.tolist())
        assert want <= have


@pytest.mark.parametrize("memory", [False, True])
def test_specials_never_returned(memory):
    m = make_model(memory, "two_stage", **SMALL)
    feats, lengths = batch(16)
    feats[ITEM][:, 0] = torch.where(lengths > 1, 2, feats[ITEM][:, 0])  # an OOV id in the sessions
    with torch.no_grad():
        q = m._head_input(m.next_hidden(feats, lengths))
        m.embeddings[ITEM].weight[1:FIRST_REAL_ID] = 100.0 * q.mean(0)  # specials would win every ranking
        _, ids = m.next_item_topk(feats, lengths, 20)  # the table changed: the index is rebuilt
    assert (ids >= FIRST_REAL_ID).all()
    assert PAD_ID not in m.ivf_members[m.ivf_members != PAD_ID].tolist()


@pytest.mark.parametrize("rank", ["exact", "two_stage"])
def test_trace_with_another_batch_size(rank):
    m = make_model(True, rank, **SMALL)
    names = list(m.cfg.feature_names)
    ranker = TopKRanker(m, names, 10, V)
    feats, lengths = batch(8)
    inputs = (*[feats[n] for n in names], lengths)
    traced = trace_ranker(ranker, inputs)  # checks 8 and 4 sessions itself
    for n in (1, 3, 13):
        f, ln = batch(n, seed=10 + n)
        args = (*[f[k] for k in names], ln)
        with torch.no_grad():
            want, got = ranker(*args), traced(*args)
        assert torch.equal(want[1], got[1])
        torch.testing.assert_close(want[0], got[0], rtol=0, atol=1e-6)


def test_trace_refuses_a_stale_index():
    m = make_model(False, "two_stage", **SMALL)
    feats, lengths = batch(4)
    with torch.no_grad():
        m.embeddings[ITEM].weight.mul_(2.0)  # after the last prepare_ranking
        with pytest.raises(RuntimeError, match="prepare_ranking"):
            torch.jit.trace(
                lambda f, ln: m.next_item_topk({ITEM: f, "category-list": f}, ln, 5), (feats[ITEM], lengths)
            )


def test_two_stage_k_larger_than_popular_set_is_refused():
    m = make_model(False, "two_stage", **SMALL)
    feats, lengths = batch(4)
    with pytest.raises(ValueError, match="rank_popular"):
        m.next_item_topk(feats, lengths, 21)


@pytest.mark.parametrize(
    "n_items, rank, want",
    [
        (V, "auto", "exact"),
        (1000, "auto", "two_stage"),
        (V, "two_stage", "two_stage"),
        (1000, "exact", "exact"),
    ],
)
def test_rank_auto_resolves_by_size_and_is_recorded(n_items, rank, want):
    cfg = ModelConfig(categorical={ITEM: n_items}, rank=rank, two_stage_min_items=1000)
    assert cfg.rank == want
    assert ModelConfig.from_dict(cfg.to_dict()).rank == want


@pytest.mark.parametrize(
    "field, value", [("rank", "ivf"), ("ivf_probe", 0), ("rank_popular", 0), ("rank_context", -1)]
)
def test_bad_rank_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(categorical={ITEM: V}, **{field: value})


def test_ivf_index_holds_every_item_once():
    x = torch.randn(1000, 8)
    centroids, members = ivf_index(x, list_size=64)
    assert centroids.shape == (members.shape[0], 8) and members.shape[1] == 64
    got = members[members >= 0].sort().values
    assert torch.equal(got, torch.arange(1000))
    again = ivf_index(x, list_size=64)
    assert torch.equal(again[1], members)  # deterministic


def test_served_artifact_output_is_unchanged(artifacts, schema):
    """The exported (exact) ranker gives today's output: next_item_scores + topk, traced and eager."""
    model, _ = load_run(artifacts[1])
    assert model.cfg.rank == "exact"
    n_items = schema["categorical"][ITEM_LIST]
    ranker = TopKRanker(model, feature_order(schema), 10, n_items)
    inputs = example_inputs(schema, batch=8)
    traced = trace_ranker(ranker, inputs)
    feats = dict(zip(feature_order(schema), inputs[:-1]))
    with torch.no_grad():
        want_s, want_i = torch.topk(model.next_item_scores(feats, inputs[-1]), 10, dim=1)
        got_s, got_i = traced(*inputs)
    assert torch.equal(got_i, want_i.long()) and torch.equal(got_s, want_s.float())
