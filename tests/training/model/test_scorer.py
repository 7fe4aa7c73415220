"""The candidate scorer (ModelConfig.scorer_hidden, training/model/scorer.py): off, the scores are the
combiner's bit for bit; on, the MLP re-ranks the combiner's best candidates and every other one ranks
below them in the combiner's order, in every scoring path and in the traced model."""

from __future__ import annotations

import pytest
import torch

from tests.training.model.test_combiner import ITEM, batch, make_model
from tests.training.model.test_ensemble import traced_equals_eager
from training.forward_check import load_served, served_state
from training.model.scorer import (
    COUNT_FEATURES,
    FEATURES,
    NETWORK_FEATURES,
    CandidateScorer,
    count_features,
    not_candidates,
)

INF = float("inf")
TOP = 12
RERANK = dict(rerank=True, rank_popular=8, head_gate=True)


def scored_model(on: bool = True, seed: int = 3, network: bool = False, recent: bool = False):
    """A re-ranking model whose scorer holds random weights (and a normalisation), switched `on`;
    `recent`: with the recent counts' input (ModelConfig.scorer_recent), random counts."""
    m = make_model(**RERANK, scorer_hidden=16, scorer_top=TOP, scorer_network=network, scorer_recent=50 if recent else 0)
    sc = m.item_memory.scorer
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if recent:
            m.item_memory.scorer.set_recent(torch.randint(0, 30, m.item_memory.pop.shape, generator=g).float())
        for k in CandidateScorer.PARAMS:
            getattr(sc, k).copy_(torch.randn(getattr(sc, k).shape, generator=g))
        sc.mu.copy_(torch.randn(sc.mu.shape, generator=g))
        sc.sd.copy_(torch.rand(sc.sd.shape, generator=g) + 0.5)
        sc.on.fill_(float(on))
        m.item_memory.head_gate.weight.normal_(0, 0.5, generator=g)  # a head weight other than 1 per session
    return m


def plain_scores(m, feats, lengths):
    """The combiner's scores z of the model's candidates, the scorer switched off."""
    sc = m.item_memory.scorer
    on = sc.on.clone()
    sc.on.zero_()
    try:
        return m.candidate_scores(feats, lengths)
    finally:
        sc.on.copy_(on)


def test_an_unfitted_scorer_changes_no_score_and_draws_no_random_number():
    feats, lengths = batch(7, seed=2)
    plain = make_model(**RERANK)
    off = make_model(**RERANK, scorer_hidden=16, scorer_top=TOP)
    assert off.item_memory.scorer is not None and plain.item_memory.scorer is None
    p, o = plain.state_dict(), off.state_dict()
    assert all(torch.equal(p[k], o[k]) for k in p)  # the same weights: the scorer's buffers are constants
    assert {k for k in o if k not in p} == {f"item_memory.scorer.{n}" for n in ("mu", "sd", *CandidateScorer.PARAMS, "on")}
    with torch.no_grad():
        (s1, c1), (s2, c2) = plain.candidate_scores(feats, lengths), off.candidate_scores(feats, lengths)
        assert torch.equal(c1, c2) and torch.equal(s1, s2)  # bit for bit
        e1, e2 = plain.next_item_scores(feats, lengths), off.next_item_scores(feats, lengths)
    assert torch.equal(torch.isinf(e1), torch.isinf(e2))
    assert torch.allclose(e1[torch.isfinite(e1)], e2[torch.isfinite(e2)], atol=1e-5)


def test_scorer_without_re_ranking_is_not_built():
    m = make_model(scorer_hidden=16)
    assert m.item_memory.scorer is None


@pytest.mark.parametrize("network, recent", [(False, False), (True, False), (False, True), (True, True)])
def test_the_mlp_re_ranks_the_combiners_best_and_the_rest_stays_below_in_its_order(network, recent):
    m = scored_model(network=network, recent=recent)
    sc, mem = m.item_memory.scorer, m.item_memory
    feats, lengths = batch(9, seed=4)
    with torch.no_grad():
        got, cand = m.candidate_scores(feats, lengths)
        z, cand_z = plain_scores(m, feats, lengths)
        fo = m.unknown_to_oov(feats)
        items = fo[ITEM]
        context, lists = mem._session_view(items, lengths)
        f = count_features(mem.pop, context, lists, cand, lengths)
        h = m.next_hidden(fo, lengths)
        raw = m.item_logits(h).gather(1, cand)  # the network's own logits, ungated
        gates = torch.cat([torch.nn.functional.softplus(mem.gate(h)), mem.head_weight(h)], 1)
    assert torch.equal(cand, cand_z)
    bad = not_candidates(cand)
    assert torch.equal(torch.isinf(got) & (got < 0), bad)  # -inf exactly where z is (specials, repeats)
    for b in range(cand.shape[0]):
        ok = (~bad[b]).nonzero().flatten()
        zb = z[b, ok]
        order = zb.argsort(descending=True, stable=True)
        top, rest = ok[order[:TOP]], ok[order[TOP:]]
        # the top slots' scores are the MLP's, from the features by hand
        ls = zb[order[:TOP]] - torch.logsumexp(zb, 0)
        rank = torch.log1p(torch.arange(len(top), dtype=torch.float32))
        x = torch.cat([f[b, top], ls[:, None], rank[:, None]], 1)
        if recent:  # after the count features: log1p of the candidate's recent count
            x = torch.cat([f[b, top], torch.log1p(sc.pop_recent[cand[b, top]])[:, None], x[:, f.shape[2] :]], 1)
            assert sc.names[f.shape[2]] == "log1p_pop_recent" and sc.names.index("z_log_softmax") == f.shape[2] + 1
        if network:
            rb = raw[b, ok]
            hls = rb[order[:TOP]] - torch.logsumexp(rb, 0)
            x = torch.cat([x, hls[:, None], gates[b].expand(len(top), -1)], 1)
            assert x.shape[1] == len(FEATURES) + recent + len(NETWORK_FEATURES)
        want = CandidateScorer.mlp((x - sc.mu) / sc.sd, {k: getattr(sc, k) for k in CandidateScorer.PARAMS})
        assert torch.allclose(got[b, top], want, atol=1e-5)
        assert len(rest) > 0 and float(got[b, rest].max()) < float(got[b, top].min())
        # the rest in z's order, spaced as z is
        assert torch.allclose(got[b, rest] - got[b, rest].max(), z[b, rest] - z[b, rest].max(), atol=1e-4)
    # not the combiner's ranking
    assert not torch.equal(got.argsort(1, descending=True)[:, :5], z.argsort(1, descending=True)[:, :5])


def test_count_features_by_hand():
    m = make_model(**RERANK, scorer_hidden=16, scorer_top=TOP)
    mem = m.item_memory
    items = torch.tensor([[5, 9, 5, 0, 0, 0]])
    lengths = torch.tensor([3])
    cand = mem.session_candidates(items, lengths)
    context, lists = mem._session_view(items, lengths)
    f = count_features(mem.pop, context, lists, cand, lengths)
    col = {name: i for i, name in enumerate(COUNT_FEATURES)}
    j5 = int((cand[0] == 5).nonzero()[0])
    j9 = int((cand[0] == 9).nonzero()[0])
    # repeats per distance bin: item 5 at distances 0 and 2, item 9 at distance 1
    assert f[0, j5, col["repeats_d0"]] == 1 and f[0, j5, col["repeats_d2"]] == 1 and f[0, j5, col["repeats_d1"]] == 0
    assert f[0, j9, col["repeats_d1"]] == 1
    assert torch.allclose(f[0, :, col["log1p_length"]], torch.log1p(torch.tensor(3.0)))
    assert torch.allclose(f[0, j9, col["log1p_pop"]], torch.log1p(mem.pop[9]))
    # the last item's successors: log1p of the successor counts of item 5
    succ = dict(zip(mem.succ_idx[5].tolist(), mem.succ_val[5].tolist()))
    for j, c in enumerate(cand[0].tolist()):
        if j and cand[0, j - 1] == c:
            continue  # a repeat holds nothing
        want = torch.log1p(torch.tensor(succ.get(c, 0.0))) if c in succ else torch.tensor(0.0)
        assert torch.allclose(f[0, j, col["succ_log"]], want), c
    # co-occurrence at distance 1 = item 9's row
    cooc9 = dict(zip(mem.cooc_idx[9].tolist(), mem.cooc_val[9].tolist()))
    c = next(c for c, v in cooc9.items() if v > 0 and c >= 3)
    j = int((cand[0] == c).nonzero()[0])
    assert torch.allclose(f[0, j, col["cooc_log_d1"]], torch.log1p(torch.tensor(cooc9[c])))
    assert f[0, j, col["cooc_items_d1"]] == 1


def test_exact_scores_are_the_candidates_scores_with_the_scorer_on():
    m = scored_model()
    feats, lengths = batch(6, seed=6)
    with torch.no_grad():
        s, cand = m.candidate_scores(feats, lengths)
        exact = m.next_item_scores(feats, lengths)
    keep = torch.isfinite(s)
    assert torch.allclose(exact.gather(1, cand)[keep], s[keep], atol=1e-5)
    n_finite = torch.isfinite(exact).sum(1)
    assert torch.equal(n_finite, keep.sum(1))  # -inf everywhere else


def test_blend_turns_the_scorer_off_and_the_served_state_brings_it_back():
    m = scored_model()
    mem = m.item_memory
    state = served_state(mem)
    mem.reset_to_blend()
    assert float(mem.scorer.on) == 0.0
    load_served(mem, state)
    assert float(mem.scorer.on) == 1.0


@pytest.mark.parametrize("network, recent", [(False, False), (True, False), (False, True)])
def test_traced_with_the_scorer_on_equals_eager(network, recent):
    m = scored_model(network=network, recent=recent)
    ranker, traced, inputs = traced_equals_eager(m)
    with torch.no_grad():
        on = traced(*inputs)[1]
        # and it re-ranks: switched off (the trace reads the same buffer), the top-5 differ
        m.item_memory.scorer.on.zero_()
        plain = ranker(*inputs)[1]
        assert torch.equal(traced(*inputs)[1], plain) and not torch.equal(plain, on)


def test_config_rejects_bad_scorer_settings():
    from training.model import ModelConfig

    with pytest.raises(ValueError, match="scorer_hidden must be >= 0"):
        ModelConfig(scorer_hidden=-1)
    with pytest.raises(ValueError, match="scorer_top >= 1, got 0 and 0"):
        ModelConfig(scorer_top=0)
    with pytest.raises(ValueError, match="scorer_members must be >= 1 .*, got 0"):
        ModelConfig(scorer_members=0)
    with pytest.raises(ValueError, match=r"scorer_recent must be >= 0 sessions \(0 = off\), got -5"):
        ModelConfig(scorer_recent=-5)


def test_the_recent_counts_grow_with_the_vocabulary_and_refuse_a_wrong_shape():
    m = scored_model(recent=True)
    mem = m.item_memory
    V = mem.pop.shape[0]
    before = mem.scorer.pop_recent.clone()
    mem.grow(V + 7)
    assert mem.scorer.pop_recent.shape == (V + 7,) and torch.equal(mem.scorer.pop_recent[:V], before)
    assert not mem.scorer.pop_recent[V:].any() and mem.pop.shape == (V + 7,)
    with pytest.raises(ValueError, match=rf"recent counts: shape \({V},\), expected \({V + 7},\)"):
        mem.scorer.set_recent(torch.zeros(V))
    # without the setting there is no table to set, and the state holds none
    plain = scored_model()
    assert plain.item_memory.scorer.pop_recent is None
    assert not any("pop_recent" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="no recent counts"):
        plain.item_memory.scorer.set_recent(torch.zeros(V))


def test_train_config_rejects_a_negative_or_missing_prefix_share(tmp_path):
    from training.config import TrainConfig

    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match=f"scorer_prefixes must be >= 0 \\(0 = none\\), got {bad}"):
            TrainConfig(data=tmp_path, out=tmp_path / "run", scorer_prefixes=bad)


def test_an_ensemble_ranks_by_its_members_re_ranked_scores():
    from training.model.ensemble import Ensemble, mean_log_softmax

    ms = [scored_model(seed=s) for s in (3, 4)]
    ens = Ensemble(ms).eval()
    feats, lengths = batch(7, seed=2)
    with torch.no_grad():
        scores, cand = ens.candidate_scores(feats, lengths)
        each = [m.candidate_scores(feats, lengths) for m in ms]
        plain = [plain_scores(m, feats, lengths)[0] for m in ms]
    assert torch.equal(scores, mean_log_softmax([s for s, _ in each]))
    assert not torch.equal(scores, mean_log_softmax(plain))  # the members' scorers took part
