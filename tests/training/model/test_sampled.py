"""Sampled softmax (ModelConfig.loss == "sampled", training/model/sampled.py).

What must hold:
* with every real item among the candidates the logQ correction is exactly 0 and the
  sampled loss is the full loss (clm and mlm, with and without the item memory);
* the item memory scored on candidate columns only equals the full scores at those columns;
* the correction is log P(j in U) = log(1 - (1 - q_j)^M (1 - Q_j)^n) (hand-computed example),
  subtracted on every column but each row's own target;
* draws are reproducible from a generator, never special ids;
* the item table gets sparse gradients (and `param_groups` separates it);
* inference (eager and traced) is the same as with the full loss;
* a step at 1M items allocates nothing of size V (profiled) and costs about what it costs at 20k.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.sessions_util import random_sessions
from training.baselines import BaselineCounts, memory_tables
from training.model import (
    HeadFactors,
    ItemMemory,
    ModelConfig,
    PackedTargets,
    SessionModel,
    correct_logits,
    mask_positions,
    pack_sessions,
)
from training.names import FIRST_REAL_ID

ITEM = "item_id-list"
V = 40


def sessions(n: int, n_items: int, seed: int, max_len: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return random_sessions(n, n_items, seed, max_len, min_len=2)


def make_model(loss: str, objective: str, memory: bool, n_items: int = V, **kw) -> SessionModel:
    cfg = ModelConfig(
        categorical={ITEM: n_items, "category-list": 6},
        objective=objective,
        memory=memory,
        memory_k=6,
        max_len=8,
        loss=loss,
        **kw,
    )
    torch.manual_seed(0)
    return SessionModel(cfg)


def fill_counts(m: SessionModel, items: np.ndarray, lengths: np.ndarray) -> None:
    counts = BaselineCounts(m.cfg.n_items)
    counts.add_sessions(items, lengths)
    if m.item_memory is not None:
        with torch.no_grad():  # gates that depend on h
            m.item_memory.gate.weight.normal_(0, 0.3)
        m.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, 6).items()})
    elif m.cfg.loss == "sampled":
        m.set_sample_counts(torch.from_numpy(counts.pop.astype(np.float32)))


def packed_batch(items: np.ndarray, lengths: np.ndarray, objective: str, seed: int = 0):
    feats = {ITEM: torch.from_numpy(items), "category-list": torch.from_numpy(items % 3 + FIRST_REAL_ID)}
    feats["category-list"] = feats["category-list"] * (feats[ITEM] > 0)
    lens = torch.from_numpy(lengths)
    masked = None
    if objective == "mlm":
        masked = mask_positions(feats[ITEM], lens, 0.3, torch.Generator().manual_seed(seed)).masked
    return feats, lens, pack_sessions(feats, lens, masked)


# --- exactness ---------------------------------------------------------------------


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_all_items_as_candidates_gives_the_full_loss(objective, memory):
    """n -> inf: every real item is a column with probability 1, log_p == 0 exactly, and the
    sampled loss and its gradients equal the full ones."""
    items, lengths = sessions(24, V, seed=1)
    sm = make_model("sampled", objective, memory, negatives=20_000)
    fm = make_model("full", objective, memory)
    fill_counts(sm, items, lengths)
    fm.load_state_dict(sm.state_dict())  # the same network, count tables included
    sm.eval(), fm.eval()  # no dropout
    _, _, p = packed_batch(items, lengths, objective)
    cols, log_p = sm.sample_candidates(p.feats[ITEM][p.feats[ITEM] > 0], torch.Generator().manual_seed(0))
    assert torch.equal(cols, torch.arange(FIRST_REAL_ID, V)) and torch.equal(log_p, torch.zeros_like(log_p))
    ls = sm.packed_loss(p, generator=torch.Generator().manual_seed(0))
    lf = fm.packed_loss(p)
    assert torch.allclose(ls, lf, rtol=1e-6, atol=1e-6), (ls.item(), lf.item())
    ls.backward()
    lf.backward()
    for (name, a), b in zip(sm.named_parameters(), fm.parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        ga = a.grad.to_dense() if a.grad.is_sparse else a.grad
        assert torch.allclose(ga, b.grad, rtol=1e-4, atol=1e-6), name


def test_restricted_memory_scores_equal_full_scores_at_the_columns():
    """packed_scores(cols=U) == packed_scores()[:, U] (leave-own-session-out corrections included)."""
    n_items, d = 30, 8
    items, lengths = sessions(16, n_items, seed=2, max_len=7)
    torch.manual_seed(0)
    mem = ItemMemory(n_items, 5, max_len=7, d_model=d, decay=0.7)
    with torch.no_grad():
        mem.gate.weight.normal_(0, 0.5)
        mem.w_cooc.uniform_(0.2, 1.0)
        mem.w_rep.uniform_(0.2, 1.0)
    counts = BaselineCounts(n_items)
    counts.add_sessions(items, lengths)
    mem.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, 5).items()})
    for objective in ("clm", "mlm"):
        _, _, p = packed_batch(items, lengths, objective)
        it, seg = p.feats[ITEM], p.segment
        if objective == "clm":
            where = torch.nn.functional.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), (1, 0))
            ctx_ok = seg > 0
        else:
            where, ctx_ok = p.masked, ~p.masked
        tgt_r, tgt_p = where.nonzero(as_tuple=True)
        g = torch.Generator().manual_seed(3)
        h = torch.randn(len(tgt_r), d, generator=g)
        base_h, table = torch.randn(len(tgt_r), 4, generator=g), torch.randn(n_items, 4, generator=g)
        tgt = PackedTargets(tgt_r, tgt_p, ctx_ok)
        full = mem.packed_scores(h, it, seg, tgt, HeadFactors(base_h, table))  # (M, V)
        # candidates: all real items, then the targets and a few others (the id -> column map
        # kept between calls then holds stale entries beyond the smaller set)
        extra = torch.randperm(n_items - FIRST_REAL_ID, generator=g)[:9] + FIRST_REAL_ID
        small = torch.cat([it[tgt_r, tgt_p], extra]).unique()
        assert len(small) < n_items - FIRST_REAL_ID  # some items are not candidates
        for cols in (torch.arange(FIRST_REAL_ID, n_items), small):
            got = mem.packed_scores(h, it, seg, tgt, HeadFactors(base_h, table[cols]), cols=cols)
            assert got.shape == (len(tgt_r), len(cols))
            assert torch.allclose(got, full[:, cols], atol=1e-5), objective


# --- the correction and the draws --------------------------------------------------------


def test_log_q_correction_hand_computed():
    """counts (real ids 3..6) = 3, 1, 0, 4; alpha 1: Q = (c+1)/12 = 4/12, 2/12, 1/12, 5/12;
    q = c/8. M = 2 targets, n = 3 negatives: P(j in U) = 1 - (1 - q_j)^2 (1 - Q_j)^3."""
    m = make_model("sampled", "clm", False, n_items=7, negatives=3, sample_alpha=1.0)
    m.set_sample_counts(torch.tensor([50.0, 50.0, 50.0, 3.0, 1.0, 0.0, 4.0]))  # specials' counts ignored
    want = {
        3: 1 - (5 / 8) ** 2 * (8 / 12) ** 3,  # = 1528/1728
        4: 1 - (7 / 8) ** 2 * (10 / 12) ** 3,
        5: 1 - (11 / 12) ** 3,  # never a target (count 0): 397/1728
        6: 1 - (4 / 8) ** 2 * (7 / 12) ** 3,
    }
    assert want[3] == pytest.approx(1528 / 1728) and want[5] == pytest.approx(397 / 1728)
    seen = set()
    for seed in range(20):
        cols, log_p = m.sample_candidates(torch.tensor([3, 6]), torch.Generator().manual_seed(seed))
        assert {3, 6} <= set(cols.tolist())
        for c, lp in zip(cols.tolist(), log_p.tolist()):
            assert lp == pytest.approx(math.log(want[c]), rel=1e-6), c
            seen.add(c)
    assert seen == {3, 4, 5, 6}


def test_correction_spares_each_rows_own_target():
    """Horvitz-Thompson: -log p_j on every column except the row's target (see correct_logits)."""
    logits = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.25]])
    log_p = torch.tensor([-1.0, -2.0, -3.0])
    got = correct_logits(logits, log_p, torch.tensor([0, 2]))
    assert torch.equal(got, torch.tensor([[0.5, 2.0, 3.0], [1.0, 2.0, 0.25]]))


def test_negatives_follow_the_sampling_distribution():
    m = make_model("sampled", "clm", False, n_items=7, negatives=60_000, sample_alpha=0.5)
    m.set_sample_counts(torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 8.0, 15.0]))
    cdf = m._sampler_tables()[0]
    u = torch.rand(60_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = torch.searchsorted(cdf, u, right=True)  # what sample_candidates does, before unique()
    freq = torch.bincount(draws, minlength=4).double() / len(u)
    want = torch.tensor([4.0, 1.0, 9.0, 16.0], dtype=torch.float64).sqrt()  # (c + 1)^0.5
    assert torch.allclose(freq, want / want.sum(), atol=0.01)


def test_draws_are_reproducible_and_never_special():
    m = make_model("sampled", "mlm", False, n_items=500, negatives=300)
    counts = torch.ones(500)
    counts[:FIRST_REAL_ID] = 1e9  # huge counts on the special ids must not matter
    m.set_sample_counts(counts)
    tgt = torch.tensor([5, 9, 9, 400])
    a = m.sample_candidates(tgt, torch.Generator().manual_seed(7))
    b = m.sample_candidates(tgt, torch.Generator().manual_seed(7))
    c = m.sample_candidates(tgt, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert int(a[0].min()) >= FIRST_REAL_ID and torch.equal(a[0], a[0].unique())
    items, lengths = sessions(12, 500, seed=4)
    _, _, p = packed_batch(items, lengths, "mlm")
    m.eval()
    la = m.packed_loss(p, generator=torch.Generator().manual_seed(1))
    lb = m.packed_loss(p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(la, lb)


def test_sampler_follows_new_counts():
    m = make_model("sampled", "clm", True, n_items=9, negatives=50)
    m.item_memory.pop.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 100.0]))
    first = m._sampler_tables()[0].clone()
    m.item_memory.pop.copy_(torch.tensor([0, 0, 0, 100.0, 0, 0, 0, 0, 0]))  # e.g. set_tables of a new window
    assert not torch.equal(first, m._sampler_tables()[0])


def test_missing_counts_and_label_smoothing_are_errors():
    m = make_model("sampled", "clm", False)
    items, lengths = sessions(4, V, seed=5)
    _, _, p = packed_batch(items, lengths, "clm")
    with pytest.raises(ValueError, match="set_sample_counts"):
        m.packed_loss(p)
    fill_counts(m, items, lengths)
    with pytest.raises(ValueError, match="label_smoothing"):
        m.packed_loss(p, label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape"):
        m.set_sample_counts(torch.ones(V + 1))
    with pytest.raises(ValueError, match="pop table"):
        make_model("sampled", "clm", True).set_sample_counts(torch.ones(V))
    with pytest.raises(ValueError, match="loss='sampled' only"):
        make_model("full", "clm", False).set_sample_counts(torch.ones(V))


# --- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss="nce"), "loss must be one of"),
        (dict(negatives=0), "negatives must be >= 1"),
        (dict(sample_alpha=1.5), "sample_alpha"),
        (dict(sampled_min_items=0), "sampled_min_items"),
    ],
)
def test_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(categorical={ITEM: V}, **kw)


def test_auto_loss_by_catalogue_size_is_recorded():
    """auto: sampled from 2 x negatives ids (training/model/choice.py), or a fixed sampled_min_items."""
    small = ModelConfig(categorical={ITEM: 4_095})
    big = ModelConfig(categorical={ITEM: 4_096})
    assert (small.loss, big.loss) == ("full", "sampled")
    assert ModelConfig(categorical={ITEM: 4_095}, negatives=1000).loss == "sampled"
    assert ModelConfig(categorical={ITEM: 4_096}, sampled_min_items=200_000).loss == "full"
    assert big.to_dict()["loss"] == "sampled" and ModelConfig.from_dict(big.to_dict()) == big
    old = small.to_dict()
    for k in ("loss", "negatives", "sample_alpha", "sampled_min_items"):
        del old[k]  # a meta.json written before these fields existed
    old[  # ... even for a large catalogue: those models were trained with the full softmax
        "categorical"
    ] = {ITEM: 900_000}
    assert ModelConfig.from_dict(old).loss == "full"


# --- optimisation ----------------------------------------------------------------------


def test_item_table_gradient_is_sparse_and_param_groups_split_it():
    items, lengths = sessions(16, V, seed=6)
    m = make_model("sampled", "clm", True)
    fill_counts(m, items, lengths)
    m.train()
    _, _, p = packed_batch(items, lengths, "clm")
    dense, sparse = m.param_groups()
    assert list(sparse) == [f"embeddings.{ITEM}.weight"]
    assert set(dense) | set(sparse) == {n for n, q in m.named_parameters() if q.requires_grad}
    opt_dense = torch.optim.AdamW(dense.values(), lr=1e-3)
    opt_sparse = torch.optim.SparseAdam(list(sparse.values()), lr=1e-3)
    table = sparse[f"embeddings.{ITEM}.weight"]
    before = table.detach().clone()
    loss = m.packed_loss(p, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert table.grad.is_sparse
    assert all(not q.grad.is_sparse for q in dense.values() if q.grad is not None)
    torch.nn.utils.clip_grad_norm_(list(dense.values()), 1.0)  # dense ones only
    opt_dense.step()
    opt_sparse.step()
    touched = (table.detach() != before).any(1)
    assert 0 < int(touched.sum()) <= V - FIRST_REAL_ID and not touched[:FIRST_REAL_ID].any()
    assert make_model("full", "clm", False).param_groups()[1] == {}


# --- inference unaffected -------------------------------------------------------------------


@pytest.mark.parametrize("memory", [False, True])
def test_inference_and_trace_same_as_full_loss(memory):
    items, lengths = sessions(10, V, seed=7)
    sm, fm = make_model("sampled", "clm", memory), make_model("full", "clm", memory)
    fill_counts(sm, items, lengths)
    fm.load_state_dict(sm.state_dict())  # same keys: nothing sampler-specific is saved
    sm.eval(), fm.eval()
    feats, lens, _ = packed_batch(items, lengths, "clm")
    with torch.no_grad():
        want = fm.next_item_scores(feats, lens)
        assert torch.equal(sm.next_item_scores(feats, lens), want)
        traced = torch.jit.trace(sm, (feats, lens), check_trace=False)
        assert torch.equal(traced(feats, lens), want)


# --- cost does not grow with V ---------------------------------------------------------------


def _step_model(n_items: int) -> tuple[SessionModel, object]:
    cfg = ModelConfig(
        categorical={ITEM: n_items},
        embedding_dim=16,
        d_model=16,
        d_output=16,
        d_inner=32,
        n_head=2,
        n_layer=1,
        objective="clm",
        memory=True,
        memory_k=4,
        max_len=10,
        loss="sampled",
        negatives=512,
    )
    torch.manual_seed(0)
    m = SessionModel(cfg).train()
    rng = np.random.default_rng(0)
    pop = torch.from_numpy(rng.zipf(1.3, n_items).clip(max=10**6).astype(np.float32))
    idx = torch.from_numpy(rng.integers(FIRST_REAL_ID, n_items, (n_items, 4)).astype(np.int32))
    m.item_memory.set_tables(idx, torch.ones(n_items, 4), idx, torch.ones(n_items, 4), pop)
    items = rng.integers(FIRST_REAL_ID, n_items, (128, 10))
    feats = {ITEM: torch.from_numpy(items)}
    return m, pack_sessions(feats, torch.full((128,), 10))


def _time_steps(m: SessionModel, p, n: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    m.packed_loss(p, generator=g).backward()  # warm-up: the sampler's CDF is built once per window
    t = time.perf_counter()
    for _ in range(n):
        m.zero_grad(set_to_none=True)
        m.packed_loss(p, generator=g).backward()
    return (time.perf_counter() - t) / n


def test_sampled_step_cost_does_not_grow_with_the_catalogue():
    """1M items: no op of the step (forward + backward) allocates half the item table (a dense
    table gradient is 64 MB here, the dense path's (1152, 1M) logits 4.6 GB; the sampled
    step's largest are (M, U) matrices, ~8 MB), and the step costs about what it costs at
    20k items (the dense path: seconds per step)."""
    big, p_big = _step_model(1_000_000)
    small, p_small = _step_model(20_000)
    t_small, t_big = _time_steps(small, p_small), _time_steps(big, p_big)
    print(f"sampled clm+memory step: 20k items {t_small * 1e3:.1f} ms, 1M items {t_big * 1e3:.1f} ms")
    assert t_big < 4 * t_small + 0.5  # slack for a busy machine; the dense path takes seconds here
    g = torch.Generator().manual_seed(1)
    big.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        big.packed_loss(p_big, generator=g).backward()
    worst = max(prof.events(), key=lambda e: e.cpu_memory_usage)
    print(f"largest allocation of one op at 1M items: {worst.cpu_memory_usage / 1e6:.2f} MB ({worst.name})")
    assert worst.cpu_memory_usage < 1_000_000 * 16 * 4 // 2, worst.name
