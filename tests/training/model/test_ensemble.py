"""The ensemble's scoring (training/model/ensemble.py): the mean of its members' log-softmax over
the candidates they share, traced as served, with one copy of the count tables."""

from __future__ import annotations

import io

import pytest
import torch

from export.inference import TopKRanker, trace_ranker
from tests.training.model.test_combiner import CAT, CONT, ITEM, V, batch, make_model
from training.model import ranking
from training.model.ensemble import Ensemble, mean_log_softmax

INF = float("inf")


def members(n: int = 2) -> list:
    """n re-ranking models with the same count tables and different weights."""
    out = []
    for k in range(n):
        m = make_model(head_gate=True, rerank=True, rank_popular=8)
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        out.append(m.eval())
    return out


def test_mean_log_softmax_averages_each_rows_distribution_and_keeps_minus_inf():
    a = torch.tensor([[1.0, 2.0, -INF, 0.0], [-INF, -INF, -INF, -INF]])
    b = torch.tensor([[10.0, 0.0, 3.0, -INF], [-INF, -INF, -INF, -INF]])
    got = mean_log_softmax([a, b])
    want = (torch.log_softmax(a[:1], 1) + torch.log_softmax(b[:1], 1)) / 2
    assert torch.allclose(got[0, :2], want[0, :2])
    # -inf where either member has it (not a candidate for one of them), and no nan in an empty row
    assert got[0, 2] == -INF and got[0, 3] == -INF
    assert torch.equal(got[1], torch.full((4,), -INF))
    # scale matters: member b's large logits do not outvote a (softmax first, then the mean)
    assert torch.equal(mean_log_softmax([a[:1]]), torch.log_softmax(a[:1], 1))


def test_ensemble_ranks_by_the_mean_of_its_members_log_softmax():
    ms = members(3)
    ens = Ensemble(ms).eval()
    feats, lengths = batch(9, seed=4)
    with torch.no_grad():
        scores, cand = ens.candidate_scores(feats, lengths)
        each = [m.candidate_scores(feats, lengths) for m in ms]
    assert all(torch.equal(c, cand) for _, c in each)
    assert torch.equal(scores, mean_log_softmax([s for s, _ in each]))
    # not any single member's ranking (the weights differ)
    assert not any(torch.equal(s.argsort(1), scores.argsort(1)) for s, _ in each)
    top_s, top_i = ens.next_item_topk(feats, lengths, 5)
    want_s, want_i = ranking.candidate_top_k(scores, cand, 5)
    assert torch.equal(top_i, want_i) and torch.equal(top_s, want_s)
    with pytest.raises(ValueError, match="k=9 must be in"):
        ens.next_item_topk(feats, lengths, 9)


def traced_equals_eager(model) -> tuple:
    """`model` served as traced (TopKRanker, top 5): the traced ranker gives the eager one's ids and scores on
    the batch it was traced with and on another. -> (ranker, traced, the tracing batch's inputs)."""
    names = [ITEM, CAT, CONT]
    ranker = TopKRanker(model, names, 5, V)
    feats, lengths = batch(6, seed=8)
    inputs = (*[feats[n] for n in names], lengths)
    traced = trace_ranker(ranker, inputs)
    other = batch(4, seed=9)
    with torch.no_grad():
        for x in (inputs, (*[other[0][n] for n in names], other[1])):
            want, got = ranker(*x), traced(*x)
            assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])
    return ranker, traced, inputs


def test_ensemble_traced_as_served_equals_eager_and_holds_the_tables_once():
    ms = members(2)
    ens = Ensemble(ms)
    ens.shared_tables()
    mem0, mem1 = ms[0].item_memory, ms[1].item_memory
    assert all(getattr(mem0, n).data_ptr() == getattr(mem1, n).data_ptr() for n in mem0.TABLES)
    ranker, traced, inputs = traced_equals_eager(ens)

    def saved_bytes(module) -> int:
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        return len(buf.getvalue())

    single = trace_ranker(TopKRanker(ms[0], ranker.feature_names, 5, V), inputs)
    table_bytes = sum(t.numel() * t.element_size() for t in mem0.tables().values())
    # the second member adds its network, not a second copy of the tables
    assert saved_bytes(traced) - saved_bytes(single) < saved_bytes(single) - table_bytes + 4096


def test_ensemble_refuses_members_that_would_rank_other_candidates():
    ms = members(2)
    with pytest.raises(ValueError, match="re-ranking"):
        Ensemble([ms[0], make_model(head_gate=True, rerank=False)])
    with pytest.raises(ValueError, match="at least 2 members"):
        Ensemble(ms[:1])
    with torch.no_grad():
        ms[1].item_memory.cooc_val.mul_(2.0)
    ens = Ensemble(ms)
    with pytest.raises(ValueError, match="count table 'cooc_val' differs"):
        ens.shared_tables()
    mem0, mem1 = ms[0].item_memory, ms[1].item_memory
    assert not any(
        getattr(mem0, n).data_ptr() == getattr(mem1, n).data_ptr() for n in mem0.TABLES
    )  # none shared
    with torch.no_grad():  # other neighbour lists: other candidates for the same sessions
        mem1.cooc_idx.copy_(mem1.cooc_idx.roll(1, dims=0))
    feats, lengths = batch(6, seed=4)
    with pytest.raises(RuntimeError, match="ranks other candidates"):
        ens.candidate_scores(feats, lengths)
