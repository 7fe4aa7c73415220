"""Re-ranking the item memory's candidates (ModelConfig.rerank).

What must hold:
* the candidates of a target are exactly: its context items, the co-occurrence-list entries
  of every context item with a count > 0, the last item's successor-list entries with a
  count > 0 (in training after leaving the session's own counts out), the rank_popular
  most popular ids; checked against a plain-Python loop, for inference and for training
  (clm and mlm), with truncated lists;
* `next_item_scores` gives -inf to every other item;
* the training loss on the union of the batch's candidates (no (M, V) anything) equals the
  loss of (M, V) scores masked to each row's candidates, targets outside them dropped
  (ce, gbce, label smoothing; full and sampled loss modes; clm and mlm);
* the served top-k (candidate path) equals the exact masked top-k, eager and traced, and its
  candidate count does not depend on the catalogue size;
* a run trained with rerank exports and its traced model ranks as the eager one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.inference import TopKRanker, example_inputs, trace_ranker
from tests.sessions_util import random_sessions
from training.baselines import BaselineCounts, memory_tables
from training.model import (
    HeadFactors,
    ModelConfig,
    PackedTargets,
    SessionModel,
    mask_positions,
    pack_sessions,
)
from training.model.item_memory import _term_index
from training.names import FIRST_REAL_ID, ITEM_LIST

ITEM = ITEM_LIST
V = 120
K = 4  # truncated lists: most items have more neighbours than this
L = 6
POP = 5


def make_model(**kw) -> SessionModel:
    """A rerank model with random item vectors and gates that depend on h (no ties by construction)."""
    settings = dict(
        categorical={ITEM: V}, max_len=L, embedding_dim=16, d_output=16, d_model=16, n_head=2, n_layer=1,
        d_inner=32, dropout=0.0, objective="clm", memory=True, memory_k=K, rerank=True, head_gate=True,
        rank_popular=POP,
    )  # fmt: skip
    torch.manual_seed(0)
    m = SessionModel(ModelConfig(**{**settings, **kw}))
    items, lengths = random_sessions(60, V, seed=1, max_len=L, min_len=2)
    counts = BaselineCounts(m.cfg.n_items)
    counts.add_sessions(items, lengths)
    m.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, K).items()})
    with torch.no_grad():
        m.item_memory.gate.weight.normal_(0, 0.3)
        if m.item_memory.head_gate is not None:
            m.item_memory.head_gate.weight.normal_(0, 0.3)
        if m.item_memory.pop_prior is not None:  # ModelConfig.pop_prior: of both signs, bent at every knot
            m.item_memory.pop_prior.values.normal_(0, 1.0)
        if m.item_memory.cooc_curve is not None:  # ModelConfig.cooc_curve: far from the logarithm
            m.item_memory.cooc_curve.slopes.normal_(0, 1.0)
    return m.eval()


def loop_candidates(mem, ctx: list[int], own: list[int] | None = None) -> set[int]:
    """The candidate set by the definition, in plain Python. ctx: the context items in order;
    own: the whole session when it is in the counts (training), whose contribution is left out."""
    cooc_idx, cooc_val = mem.cooc_idx.tolist(), mem.cooc_val.tolist()
    succ_idx, succ_val = mem.succ_idx.tolist(), mem.succ_val.tolist()

    def own_cooc(a: int, c: int) -> int:
        if own is None:
            return 0
        return int(own.count(a) >= 2) if a == c else int(a in own and c in own)

    def own_succ(a: int, c: int) -> int:
        return 0 if own is None else sum(1 for x, y in zip(own, own[1:]) if (x, y) == (a, c))

    out = set(ctx) | set(mem.popular_ids().tolist())
    for a in ctx:
        out |= {c for c, n in zip(cooc_idx[a], cooc_val[a]) if n - own_cooc(a, c) > 0}
    if ctx:
        a = ctx[-1]
        out |= {c for c, n in zip(succ_idx[a], succ_val[a]) if n - own_succ(a, c) > 0}
    return {c for c in out if c >= FIRST_REAL_ID}


def packed(items: np.ndarray, lengths: np.ndarray, objective: str):
    """Packed rows and where the targets sit (as SessionModel.packed_loss finds them)."""
    it, lens = torch.from_numpy(items), torch.from_numpy(lengths)
    masked = None
    if objective == "mlm":
        masked = mask_positions(it, lens, 0.4, torch.Generator().manual_seed(0)).masked
    p = pack_sessions({ITEM: it}, lens, masked)
    seg = p.segment
    if objective == "clm":
        where = F.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), (1, 0))
        ctx_ok = seg > 0
    else:
        where, ctx_ok = p.masked, ~p.masked
    return p, PackedTargets(*where.nonzero(as_tuple=True), ctx_ok)


def training_loop_sets(mem, p, tgt: PackedTargets, items: np.ndarray, lengths: np.ndarray) -> list[set[int]]:
    """loop_candidates of every packed target, from the original sessions."""
    seg = p.segment
    out = []
    for r, q in zip(tgt.row.tolist(), tgt.pos.tolist()):
        s = int(seg[r, q]) - 1
        start = int((seg[r] == s + 1).nonzero()[0])
        session = items[s, : lengths[s]].tolist()
        ctx = [session[j] for j in range(q - start) if bool(tgt.ctx_ok[r, start + j])]
        out.append(loop_candidates(mem, ctx, own=session))
    return out


def as_sets(cand: torch.Tensor) -> list[set[int]]:
    return [{c for c in row if c >= FIRST_REAL_ID} for row in cand.tolist()]


# --- the candidate sets ------------------------------------------------------------


def test_popular_ids_are_the_most_counted_real_ids():
    m = make_model()
    mem = m.item_memory
    pop = mem.pop[FIRST_REAL_ID:]
    ids = mem.popular_ids()
    assert ids.shape == (POP,) and bool((ids >= FIRST_REAL_ID).all())
    assert torch.equal(mem.pop[ids].sort(descending=True).values, pop.sort(descending=True).values[:POP])
    mem.set_table("pop", torch.arange(V, dtype=torch.float32))  # new counts: recomputed
    assert set(mem.popular_ids().tolist()) == set(range(V - POP, V))


def test_inference_candidates_and_masking_match_a_loop():
    m = make_model()
    items, lengths = random_sessions(40, V, seed=2, max_len=L, min_len=1)
    lengths[:3] = 0  # empty sessions: the popular ids only
    it, lens = torch.from_numpy(items), torch.from_numpy(lengths)
    with torch.no_grad():
        scores = m.next_item_scores({ITEM: it}, lens)  # (B, V)
        served = m.item_memory.session_candidates(it, lens)  # (B, C)
    assert served.shape[1] == L + L * K + K + POP
    for b in range(len(lengths)):
        want = loop_candidates(m.item_memory, items[b, : lengths[b]].tolist())
        assert set(torch.isfinite(scores[b]).nonzero().flatten().tolist()) == want, b
        assert as_sets(served[b : b + 1])[0] == want, b
    assert bool((served[:, 1:] >= served[:, :-1]).all())  # sorted per row


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_training_candidates_leave_the_session_out_and_match_a_loop(objective):
    m = make_model(objective=objective)
    mem = m.item_memory
    items, lengths = random_sessions(60, V, seed=1, max_len=L, min_len=2)  # the sessions in the counts
    p, tgt = packed(items, lengths, objective)
    context, lists = mem.packed_view(p.feats[ITEM], p.segment, tgt)
    got = as_sets(mem.candidates(context, lists))
    want = training_loop_sets(mem, p, tgt, items, lengths)
    assert len(got) == len(want) > 100
    assert got == want
    # leaving the session out matters here: some pairs exist only through the session itself
    kept = as_sets(mem.candidates(*mem.packed_view(p.feats[ITEM], p.segment, tgt, leave_out=False)))
    assert any(a != b for a, b in zip(got, kept)) and all(a <= b for a, b in zip(got, kept))
    # the training path's flat entries: the same sets, as the union columns and a per-row mark
    for leave_out, sets in ((True, want), (False, kept)):
        view = mem.rerank_view(p.feats[ITEM], p.segment, tgt, leave_out=leave_out)
        targets = p.feats[ITEM][tgt.row, tgt.pos]
        cols, found = mem.rerank_columns(view, targets)
        assert cols.tolist() == sorted(set().union(*sets) | set(targets.tolist()))
        member = mem.member(found, len(targets), len(cols))
        assert [set(cols[row].tolist()) for row in member] == sets
        assert found.target_ok.tolist() == [t in c for t, c in zip(targets.tolist(), sets)]
        # a count term lands on its cell exactly where that cell is a candidate (popularity
        # corrections also name the session's later items, which need not be)
        tm, tids, _ = _term_index(view)
        ok = [i in sets[m] for m, i in zip(tm.tolist(), tids.tolist())]
        sink = len(targets) * POP + len(found.pair_m)
        assert (found.term_at != sink).tolist() == ok and (leave_out is False or not all(ok))
        pairs = found.pair_m * len(cols) + found.pair_col  # each pair once, in CSR order
        assert bool((pairs[1:] > pairs[:-1]).all())
        assert found.crow.tolist() == [0, *torch.bincount(found.pair_m, minlength=len(targets)).cumsum(0).tolist()]


# (head_repeats, pop_prior); the popularity prior's cases also have the co-occurrence curve (cooc_curve 3)
PRIOR_CASES = [(True, 0), (False, 0), (True, 3), (False, 3)]


def curves(pop_prior: int) -> dict:
    return dict(pop_prior=pop_prior, cooc_curve=pop_prior)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
@pytest.mark.parametrize("leave_out", [True, False])
@pytest.mark.parametrize("head_repeats,pop_prior", PRIOR_CASES)
def test_flat_entry_scores_equal_the_list_scores_and_their_gradients(objective, leave_out, head_repeats, pop_prior):
    """rerank_scores (flat entries, training) = combine over packed_view's (M, W, K) lists at every
    candidate, -inf elsewhere; the gradients of the gates, the position weights and h agree (also
    with the head's logit left out at the context items, head_repeats off, and with the popularity
    prior, whose knots get the same gradients too)."""
    m = make_model(objective=objective, head_repeats=head_repeats, **curves(pop_prior))
    mem = m.item_memory
    items, lengths = random_sessions(60, V, seed=2, max_len=L, min_len=2)
    p, tgt = packed(items, lengths, objective)
    it = p.feats[ITEM]
    view = mem.rerank_view(it, p.segment, tgt, leave_out=leave_out)
    cols, found = mem.rerank_columns(view, it[tgt.row, tgt.pos])
    member = mem.member(found, len(tgt.row), len(cols))
    assert member.any(1).all() and not member.all()
    h = torch.randn(len(tgt.row), 16, requires_grad=True)
    w = torch.randn(len(cols), 16, requires_grad=True)
    weights = torch.randn(len(tgt.row), len(cols))
    params = [h, w, mem.w_cooc, mem.w_rep, mem.gate.weight]
    if pop_prior:
        params += [mem.pop_prior.values, mem.cooc_curve.slopes]

    def run(scores_fn):
        for t in params:
            t.grad = None
        out = scores_fn()
        torch.where(member, out, 0.0).mul(weights).sum().backward()
        return out.detach(), [t.grad.clone() for t in params]

    got, got_g = run(lambda: mem.rerank_scores(h, view, HeadFactors(h, w), cols, member))
    want, want_g = run(
        lambda: mem.combine(h, *mem.packed_view(it, p.segment, tgt, leave_out=leave_out), HeadFactors(h, w), cols)
    )
    assert torch.equal(torch.isinf(got), ~member)
    assert torch.equal(got[member], want[member])  # the same additions in the same order
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
@pytest.mark.parametrize("leave_out", [True, False])
@pytest.mark.parametrize("head_repeats,pop_prior", PRIOR_CASES)
def test_candidate_only_cross_entropy_equals_the_masked_dense_one(objective, leave_out, head_repeats, pop_prior):
    """rerank_ce (the popular block + one dot product per other candidate pair, no (M, U) tensor)
    = cross-entropy of rerank_scores' (M, U) masked scores over the targets among their
    candidates; and the same gradients for h, the item vectors, the gates and position weights
    (and the popularity prior's knots)."""
    m = make_model(objective=objective, head_repeats=head_repeats, **curves(pop_prior))
    mem = m.item_memory
    items, lengths = random_sessions(60, V, seed=1, max_len=L, min_len=2)  # the sessions in the counts
    p, tgt = packed(items, lengths, objective)
    it = p.feats[ITEM]
    targets = it[tgt.row, tgt.pos]
    view = mem.rerank_view(it, p.segment, tgt, leave_out=leave_out)
    cols, found = mem.rerank_columns(view, targets)
    member = mem.member(found, len(targets), len(cols))
    sink = len(targets) * POP + len(found.pair_m)
    assert leave_out is False or bool((found.term_at == sink).any())  # some terms name no candidate
    keep = member[torch.arange(len(targets)), torch.searchsorted(cols, targets)]
    assert 0 < int(keep.sum()) < len(keep) and int(found.pair_m.numel()) > 0
    h = torch.randn(len(targets), 16, requires_grad=True)
    w = torch.randn(len(cols), 16, requires_grad=True)
    params = (h, w, mem.w_cooc, mem.w_rep, mem.gate.weight, mem.gate.bias)
    params += (mem.pop_prior.values, mem.cooc_curve.slopes) if pop_prior else ()

    def run(loss_fn):
        for t in params:
            t.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [t.grad.clone() for t in params]

    def fresh_view():  # the prior's leave-one-out corrections are in a view's graph: one per backward
        return mem.rerank_view(it, p.segment, tgt, leave_out=leave_out)

    def dense():
        logits = mem.rerank_scores(h, fresh_view(), HeadFactors(h, w), cols, member)
        return F.cross_entropy(logits[keep], torch.searchsorted(cols, targets)[keep])

    got, got_g = run(lambda: mem.rerank_ce(h, fresh_view(), HeadFactors(h, w), cols, found, targets))
    want, want_g = run(dense)
    assert torch.allclose(got, want, rtol=1e-5), (got.item(), want.item())
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# --- the training loss --------------------------------------------------------------


def dense_reference(m: SessionModel, p, tgt: PackedTargets, sets: list[set[int]], h: torch.Tensor, **loss):
    """The loss over (M, V) scores masked to each row's candidates, targets outside them dropped."""
    items = p.feats[ITEM]
    table = m.embeddings[ITEM].weight
    logits = m.item_memory.packed_scores(h, items, p.segment, tgt, HeadFactors(m._head_input(h), table))
    member = torch.zeros_like(logits, dtype=torch.bool)
    for r, s in enumerate(sets):
        member[r, sorted(s)] = True
    logits = logits.masked_fill(~member, float("-inf"))
    targets = items[tgt.row, tgt.pos]
    keep = member[torch.arange(len(targets)), targets]
    assert 0 < int(keep.sum()) < len(keep)  # some targets are outside their candidates
    return m._loss(logits[keep], targets[keep], **loss)


@pytest.mark.parametrize(
    "objective, kw, smoothing",
    [
        ("clm", {}, 0.0),
        ("mlm", {}, 0.0),
        ("clm", {"loss_fn": "gbce"}, 0.0),
        ("clm", {}, 0.2),
        ("clm", {"loss": "sampled", "negatives": 3}, 0.0),  # re-ranking ignores the sampled columns
        ("clm", {"head_gate": False, "head_logits": False}, 0.0),
        ("mlm", {"head_repeats": False}, 0.0),
        ("clm", {"head_repeats": False}, 0.2),
    ],
)
def test_union_column_loss_equals_the_dense_masked_loss(objective, kw, smoothing, monkeypatch):
    m = make_model(objective=objective, **kw)
    mem = m.item_memory
    items, lengths = random_sessions(60, V, seed=1, max_len=L, min_len=2)  # the sessions in the counts
    items, lengths = items[:12], lengths[:12]
    p, tgt = packed(items, lengths, objective)
    seen = {}
    real_scores, real_ce = mem.rerank_scores, mem.rerank_ce

    def spy_scores(h, view, head, cols, member):  # the dense path (gbce, label smoothing)
        seen["h"], seen["cols"] = h, cols
        return real_scores(h, view, head, cols, member)

    def spy_ce(h, view, head, cols, sets, targets, weights=None):  # cross-entropy over the candidates only
        seen["h"], seen["cols"] = h, cols
        return real_ce(h, view, head, cols, sets, targets, weights)

    monkeypatch.setattr(mem, "rerank_scores", spy_scores)
    monkeypatch.setattr(mem, "rerank_ce", spy_ce)
    got = m.packed_loss(p, smoothing, torch.Generator().manual_seed(0))
    assert seen["cols"] is not None and seen["cols"].shape[0] < V - FIRST_REAL_ID  # not every item
    sets = training_loop_sets(mem, p, tgt, items, lengths)
    if not m.cfg.head_logits:
        m.cfg.head_logits = True  # the reference reads the head; zero it instead
        m.item_memory.head_scale.fill_(0.0)
    want = dense_reference(m, p, tgt, sets, seen["h"], label_smoothing=smoothing)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got.item(), want.item())
    got.backward()  # and it trains the network and the combiner
    assert mem.gate.weight.grad is not None and m.transformer.layer[0].ff.layer_1.weight.grad is not None


def test_loss_without_any_target_among_its_candidates_is_zero_and_connected():
    m = make_model(rank_popular=1)
    tables = {k: torch.zeros_like(v) for k, v in m.item_memory.tables().items()}
    tables["pop"][10] = 1.0  # the one popular id, not a target below
    m.item_memory.set_tables(**tables)
    p, _ = packed(np.array([[5, 6, 7]]), np.array([3]), "clm")
    loss = m.packed_loss(p)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_head_repeats_off_scores_the_context_items_by_the_counts_alone():
    """head_repeats off: at the items of a session the score is the count terms' alone (the network's
    logit left out, once per item however often the session holds it); every other item's score is
    the same as with the head's logits, bit for bit."""
    on, off, counts = make_model(), make_model(head_repeats=False), make_model()
    counts.item_memory.head_scale.fill_(0.0)  # no network logits anywhere
    items, lengths = random_sessions(64, V, seed=5, max_len=L, min_len=1)
    items[0, :4], lengths[0] = [7, 9, 7, 7], 4  # an item the session holds three times
    feats, lens = {ITEM: torch.from_numpy(items)}, torch.from_numpy(lengths)
    with torch.no_grad():
        s_on, s_off, s_counts = (m.next_item_scores(feats, lens) for m in (on, off, counts))
    own = torch.zeros_like(s_on, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        own[b, items[b, :n].tolist()] = True
    assert torch.equal(s_off[~own], s_on[~own])
    assert torch.allclose(s_off[own], s_counts[own], rtol=0, atol=1e-5)
    assert (s_on[own] - s_counts[own]).abs().max() > 0.1  # the network's logits are there with the flag on


# --- serving ---------------------------------------------------------------------------


def assert_same_top_k(
    got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Equal scores; equal ids wherever a score is not tied (within round-off) with a neighbour."""
    (gs, gi), (ws, wi) = got, want
    assert torch.allclose(gs, ws, rtol=0, atol=1e-5)
    gap = (ws[:, 1:] - ws[:, :-1]).abs() > 1e-4  # (B, k-1)
    clear = F.pad(gap, (0, 1), value=True) & F.pad(gap, (1, 0), value=True)
    assert torch.equal(gi[clear], wi[clear].long())


@pytest.mark.parametrize("head_repeats,pop_prior", PRIOR_CASES)
def test_served_top_k_is_the_exact_masked_top_k(monkeypatch, head_repeats, pop_prior):
    m = make_model(head_repeats=head_repeats, **curves(pop_prior))
    assert m.cfg.rank == "two_stage"  # "auto" under rerank: the memory's candidates at any catalogue size
    items, lengths = random_sessions(64, V, seed=3, max_len=L, min_len=1)
    feats, lens = {ITEM: torch.from_numpy(items)}, torch.from_numpy(lengths)
    with torch.no_grad():
        want = torch.topk(m.next_item_scores(feats, lens), POP, dim=1)
        with monkeypatch.context() as mp:  # the candidate path never scores the whole catalogue
            mp.setattr(m.item_memory, "combine", None)
            got = m.next_item_topk(feats, lens, POP)
    assert_same_top_k(got, want)
    assert bool((got[1] >= FIRST_REAL_ID).all()) and bool(torch.isfinite(got[0][:, 0]).all())
    with pytest.raises(ValueError, match="re-ranking top-k"):
        m.next_item_topk(feats, lens, POP + 1)
    m.cfg.rank = "exact"  # scores every item and masks: the same top-k, bit for bit the masked scores'
    with torch.no_grad():
        exact = m.next_item_topk(feats, lens, POP)
    assert torch.equal(exact[0], want[0]) and torch.equal(exact[1], want[1])


def test_candidate_count_does_not_grow_with_the_catalogue():
    small, large = make_model(), make_model(categorical={ITEM: 20_000})
    items, lengths = random_sessions(8, V, seed=3, max_len=L, min_len=1)
    it, lens = torch.from_numpy(items), torch.from_numpy(lengths)
    assert (
        small.item_memory.session_candidates(it, lens).shape
        == large.item_memory.session_candidates(it, lens).shape
    )


@pytest.mark.parametrize("head_repeats,pop_prior", PRIOR_CASES)
def test_traced_ranker_equals_eager_under_rerank(head_repeats, pop_prior):
    m = make_model(head_repeats=head_repeats, **curves(pop_prior))
    ranker = TopKRanker(m, [ITEM], POP, V, {ITEM: V}, L)
    schema = {"categorical": {ITEM: V}, "max_sequence_length": L}
    traced = trace_ranker(ranker, example_inputs(schema, batch=8))  # checks two batch sizes itself
    items, lengths = random_sessions(32, V, seed=4, max_len=L, min_len=1)
    it, lens = torch.from_numpy(items), torch.from_numpy(lengths)
    with torch.no_grad():
        got = traced(it, lens)
        eager = ranker(it, lens)
        exact = torch.topk(m.next_item_scores({ITEM: it}, lens), POP, dim=1)
    assert torch.equal(got[1], eager[1]) and torch.allclose(got[0], eager[0], atol=1e-6)
    assert_same_top_k(got, exact)
    m.item_memory.set_table("pop", m.item_memory.pop.flip(0))  # the popular ids are now stale in a trace
    with pytest.raises(RuntimeError, match="prepare_ranking"):
        torch.jit.trace(ranker, (it, lens), check_trace=False)


@pytest.mark.slow
def test_a_rerank_run_exports_and_serves_its_eager_ranking(tiny_synthetic_data, tmp_path):
    """The real recipe's re-ranking, trained by the Trainer, through export's trace (export/tracing.py)."""
    from export.repository import ExportConfig
    from export.tracing import trace_run
    from training.checkpoint import load_run
    from training.config import TrainConfig
    from training.schema import Schema
    from training.train import train

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(tiny_synthetic_data), out=str(run), end_window=2, epochs=2, holdout=0.2, patience=1,
        stack=1, threads=1, progress=False, batch_size=32,
        model=dict(objective="clm", memory=True, memory_k=8, rerank=True, head_gate=True, rank_popular=20),
    )  # fmt: skip
    row = train(cfg)["windows"][0]
    assert {"holdout_ndcg20_before_stack", "holdout_ndcg20_after_stack", "holdout_head_gate"} <= set(row)
    schema = Schema.load(tiny_synthetic_data)
    traced, cards = trace_run(run, tiny_synthetic_data, schema, ExportConfig(run=run, data=tiny_synthetic_data,
                                                                             out=tmp_path / "repo", top_k=10))  # fmt: skip
    model, _ = load_run(run)
    inputs = example_inputs(schema, batch=16)
    feats = dict(zip(schema.features, inputs[:-1]))
    with torch.no_grad():
        got = traced(*inputs)
        want = torch.topk(model.eval().next_item_scores(feats, inputs[-1]), 10, dim=1)
    assert_same_top_k(got, want)


def test_pair_dot_products_and_their_backward():
    """`_pair_dots` (sampled product, own backward): values and gradients of the plain gathered
    dot products; d lhs as torch's sampled_addmm backward gives it, bit for bit; gradcheck in
    float64. A pair set with empty targets and columns and a column shared by several targets."""
    from training.model.rerank import RerankSets, _pair_dots

    gen = torch.Generator().manual_seed(3)
    M, U, E = 7, 11, 5
    keys = torch.unique(torch.randint(0, M * U, (30,), generator=gen))
    keys = keys[keys // U != 2]  # target 2 has no pair
    pm, col = keys // U, keys % U
    crow = torch.zeros(M + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(pm, minlength=M).cumsum(0)
    empty = torch.zeros(0, dtype=torch.int64)
    sets = RerankSets(empty, pm, col, crow, empty, empty, empty)
    lhs = torch.randn(M, E, generator=gen, dtype=torch.float64, requires_grad=True)
    rhs = torch.randn(U, E, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(pm), generator=gen, dtype=torch.float64)
    got = _pair_dots(lhs, rhs, sets)
    plain = (lhs[pm] * rhs[col]).sum(1)
    torch.testing.assert_close(got, plain)
    d_got = torch.autograd.grad((got * w).sum(), (lhs, rhs))
    d_plain = torch.autograd.grad((plain * w).sum(), (lhs, rhs))
    torch.testing.assert_close(d_got, d_plain)
    assert d_got[1].abs().sum() > 0 and d_got[0].abs().sum() > 0
    torch.autograd.gradcheck(lambda a, b: _pair_dots(a, b, sets), (lhs, rhs))
    pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(len(pm), dtype=torch.float64), (M, U))
    ref = torch.sparse.sampled_addmm(pattern, lhs, rhs.t()).values()
    assert torch.equal(torch.autograd.grad((ref * w).sum(), lhs)[0], d_got[0])


def test_last_only_targets_are_each_sessions_last_item(monkeypatch):
    """packed_loss(last_only=True) (stacking on the evaluation's task, TrainConfig.stack_last):
    one target per session, its last item, whatever the packing; every next item without it."""
    m = make_model()
    items, lengths = random_sessions(60, V, seed=4, max_len=L, min_len=2)
    items, lengths = items[:15], lengths[:15]
    p, _ = packed(items, lengths, "clm")
    assert int(p.segment.max()) >= 2  # several sessions share a row: the case to get right
    seen = []
    real = m._rerank_loss
    monkeypatch.setattr(m, "_rerank_loss", lambda p_, h, t, *a, **k: seen.append(t) or real(p_, h, t, *a, **k))
    m.packed_loss(p)
    m.packed_loss(p, last_only=True)
    assert len(seen[0]) == int((lengths - 1).sum())
    assert sorted(seen[1].tolist()) == sorted(items[np.arange(15), lengths - 1].tolist())
    with pytest.raises(ValueError, match="clm"):
        make_model(objective="mlm").packed_loss(packed(items, lengths, "mlm")[0], last_only=True)
