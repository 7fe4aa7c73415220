"""ItemMemory (training/model/item_memory.py) and its count tables (training/baselines.memory_tables).

The property that matters most: during training every session is in the counts,
and `packed_scores` must give exactly what inference gives when the session is
NOT in the counts (leave the session out). Checked here against tables rebuilt
without the session, for every target of every session, clm and mlm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.baselines import BaselineCounts, memory_tables
from training.model import ItemMemory, ModelConfig, PackedTargets, SessionModel, mask_positions, pack_sessions
from training.names import FIRST_REAL_ID

V = 14  # item vocabulary (ids 3..13 real)
D = 8  # hidden size fed to the gates


def random_sessions(n: int, seed: int, max_len: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """n right-padded sessions over a small vocabulary: no consecutive repeats, other repeats allowed."""
    rng = np.random.default_rng(seed)
    items = np.zeros((n, max_len), dtype=np.int64)
    lengths = rng.integers(2, max_len + 1, n)
    for s in range(n):
        prev = -1
        for j in range(lengths[s]):
            x = prev
            while x == prev:
                x = int(rng.integers(FIRST_REAL_ID, V))
            items[s, j] = prev = x
    return items, lengths


def memory_with(
    items: np.ndarray, lengths: np.ndarray, k: int = V, seed: int = 0, pop_prior: int = 0, cooc_curve: int = 0
) -> ItemMemory:
    torch.manual_seed(seed)
    mem = ItemMemory(V, k, max_len=items.shape[1], d_model=D, decay=0.7, pop_prior=pop_prior, cooc_curve=cooc_curve)
    with torch.no_grad():  # non-trivial gates: they depend on h
        mem.gate.weight.normal_(0, 0.5)
        mem.w_cooc.uniform_(0.2, 1.0)
        mem.w_rep.uniform_(0.2, 1.0)
        if mem.pop_prior is not None:  # a popularity prior of both signs, bent at every knot
            mem.pop_prior.values.normal_(0, 1.0)
        if mem.cooc_curve is not None:  # a co-occurrence curve far from the logarithm, of both signs
            mem.cooc_curve.slopes.normal_(0, 1.0)
    counts = BaselineCounts(V)
    counts.add_sessions(items, lengths)
    mem.set_tables(**{k_: torch.from_numpy(v) for k_, v in memory_tables(counts, k).items()})
    return mem


def test_memory_tables_hand_computed():
    # sessions: [3 4 5], [3 4], [4 3 6 3]
    items = np.array([[3, 4, 5, 0], [3, 4, 0, 0], [4, 3, 6, 3]])
    lengths = np.array([3, 2, 4])
    counts = BaselineCounts(8)
    counts.add_sessions(items, lengths)
    t = memory_tables(counts, k=2)
    # item 3 co-occurs with 4 in 3 sessions, with 5 and 6 in one each (6 and 5 tie on count
    # and popularity 1 each: 5 or 6); with itself (twice in a session) once
    assert t["cooc_idx"][3, 0] == 4 and t["cooc_val"][3, 0] == 3
    assert t["cooc_val"][3, 1] == 1 and t["cooc_idx"][3, 1] in (3, 5, 6)
    # successors of 3: 4 twice, 6 once; of 4: 5, 3 once each (tie -> 3 is more popular)
    assert list(t["succ_idx"][3]) == [4, 6] and list(t["succ_val"][3]) == [2, 1]
    assert list(t["succ_idx"][4]) == [3, 5] and list(t["succ_val"][4]) == [1, 1]
    # 5 has no successor: padded with id 0 and count 0
    assert list(t["succ_idx"][5]) == [0, 0] and list(t["succ_val"][5]) == [0, 0]
    assert list(t["pop"][3:7]) == [4, 3, 1, 1]
    assert t["cooc_idx"].dtype == np.int32 and t["cooc_val"].dtype == np.float32


def test_inference_scores_hand_computed():
    items = np.array([[3, 4, 5, 0], [3, 4, 0, 0], [4, 3, 6, 3]])
    lengths = np.array([3, 2, 4])
    mem = ItemMemory(8, 8, max_len=4, d_model=D, decay=0.5)  # gates: softplus(bias) = 1, 1, 1, 0.1
    counts = BaselineCounts(8)
    counts.add_sessions(items, lengths)
    mem.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, 8).items()})
    # context [5, 3]: last item 3, item 5 one position before (weight 0.5)
    with torch.no_grad():
        s = mem.next_item_scores(torch.zeros(1, D), torch.tensor([[5, 3, 0]]), torch.tensor([2]))[0]
    pop = torch.log1p(torch.tensor([0, 0, 0, 4, 3, 1, 1, 0.0]))
    l1p = lambda x: float(np.log1p(x))  # noqa: E731
    cooc_3 = {3: 1, 4: 3, 5: 1, 6: 1}  # row 3 of the co-occurrence counts
    cooc_5 = {3: 1, 4: 1}
    succ_3 = {4: 2, 6: 1}
    for c in range(FIRST_REAL_ID, 8):
        want = (
            l1p(cooc_3.get(c, 0))
            + 0.5 * l1p(cooc_5.get(c, 0))
            + l1p(succ_3.get(c, 0))
            + (1.0 if c == 3 else 0.0)
            + (0.5 if c == 5 else 0.0)
            + 0.1 * float(pop[c])
        )
        assert s[c].item() == pytest.approx(want, abs=1e-5), c


@pytest.mark.parametrize("objective", ["clm", "mlm"])
@pytest.mark.parametrize("pop_prior,cooc_curve", [(0, 0), (3, 0), (0, 3)])
def test_training_scores_leave_the_session_out(objective, pop_prior, cooc_curve):
    """packed_scores (session in the counts, own contribution subtracted) == inference scores
    with tables built from all the other sessions, for every target of every session (also with
    the popularity prior, ModelConfig.pop_prior: its value moves with the count left out, and with
    the co-occurrence curve, ModelConfig.cooc_curve: it reads the counts left)."""
    items, lengths = random_sessions(12, seed=1)
    full = memory_with(items, lengths, pop_prior=pop_prior, cooc_curve=cooc_curve)
    if pop_prior:  # pops of 1 to 9: every segment is read, and the flat end past the last knot
        assert torch.log1p(full.pop[FIRST_REAL_ID:]).max() > pop_prior - 1
    feats = {"item_id-list": torch.from_numpy(items)}
    lens = torch.from_numpy(lengths)
    masked = None
    if objective == "mlm":
        masked = mask_positions(feats["item_id-list"], lens, 0.4, torch.Generator().manual_seed(0)).masked
    p = pack_sessions(feats, lens, masked)
    it, seg = p.feats["item_id-list"], p.segment
    if objective == "clm":
        nxt = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        where = torch.nn.functional.pad(nxt, (1, 0))
        ctx_ok = seg > 0
    else:
        where, ctx_ok = p.masked, ~p.masked
    tgt_r, tgt_p = where.nonzero(as_tuple=True)
    h = torch.randn(len(tgt_r), D, generator=torch.Generator().manual_seed(2))
    got = full.packed_scores(h, it, seg, PackedTargets(tgt_r, tgt_p, ctx_ok))
    assert len(tgt_r) > 20
    for m in range(len(tgt_r)):
        s = int(seg[tgt_r[m], tgt_p[m]]) - 1  # the batch's session index
        others = np.delete(np.arange(len(lengths)), s)
        loo = memory_with(items[others], lengths[others], pop_prior=pop_prior, cooc_curve=cooc_curve)
        with torch.no_grad():  # same parameters as `full`, only the tables differ
            for name in ("gate", "w_cooc", "w_rep", "pop_prior", "cooc_curve"):
                loo.load_state_dict(
                    {k: v for k, v in full.state_dict().items() if k.startswith(name)}, strict=False
                )
        # the context as inference sees it: the earlier positions of the session that are context
        row, pos = tgt_r[m], tgt_p[m]
        keep = (seg[row] == s + 1) & (torch.arange(it.shape[1]) < pos) & ctx_ok[row]
        ctx_items = it[row][keep]
        if objective == "mlm":  # masked context positions are left out: compare on a session where
            # the context is contiguous only (inference has no holes)
            full_ctx = it[row][(seg[row] == s + 1) & (torch.arange(it.shape[1]) < pos)]
            if len(full_ctx) != len(ctx_items):
                continue
        padded = torch.nn.functional.pad(ctx_items, (0, 1))[None, :]  # one pad slot: never zero-width
        want = loo.next_item_scores(h[m : m + 1], padded, torch.tensor([len(ctx_items)]))
        assert torch.allclose(got[m], want[0], atol=1e-5), (m, objective)


def test_truncated_lists_never_go_negative():
    """With k smaller than the neighbour count, a session's own pair may be missing from the
    list; subtracting it must not produce negative counts (log1p of < 0)."""
    items, lengths = random_sessions(30, seed=3)
    mem = memory_with(items, lengths, k=2)
    p = pack_sessions({"item_id-list": torch.from_numpy(items)}, torch.from_numpy(lengths))
    seg = p.segment
    where = torch.nn.functional.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), (1, 0))
    tgt_r, tgt_p = where.nonzero(as_tuple=True)
    out = mem.packed_scores(
        torch.zeros(len(tgt_r), D), p.feats["item_id-list"], seg, PackedTargets(tgt_r, tgt_p, seg > 0)
    )
    assert torch.isfinite(out).all()


def test_set_tables_rejects_wrong_shapes():
    mem = ItemMemory(V, 4, max_len=5, d_model=D, decay=0.8)
    with pytest.raises(ValueError, match="cooc_idx"):
        mem.set_tables(
            torch.zeros(V, 3, dtype=torch.int32),
            torch.zeros(V, 4),
            torch.zeros(V, 4, dtype=torch.int32),
            torch.zeros(V, 4),
            torch.zeros(V),
        )


def make_model(objective: str = "clm", **kw) -> tuple[SessionModel, np.ndarray, np.ndarray]:
    items, lengths = random_sessions(40, seed=5, max_len=8)
    cfg = ModelConfig(
        categorical={"item_id-list": V}, memory=True, memory_k=5, objective=objective, max_len=8, **kw
    )
    torch.manual_seed(0)
    m = SessionModel(cfg).eval()
    counts = BaselineCounts(V)
    counts.add_sessions(items, lengths)
    m.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, 5).items()})
    return m, items, lengths


class Ranker(torch.nn.Module):
    def __init__(self, m: SessionModel):
        super().__init__()
        self.m = m

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.m.next_item_scores({"item_id-list": items}, lengths)


@pytest.mark.parametrize("objective,cooc_curve", [("clm", 0), ("mlm", 0), ("clm", 3)])
def test_model_with_memory_padding_invariance_and_trace(objective, cooc_curve):
    m, items, lengths = make_model(objective, cooc_curve=cooc_curve)
    if cooc_curve:  # a learned curve far from the logarithm (the forward check may serve one)
        with torch.no_grad():
            m.item_memory.cooc_curve.slopes.copy_(torch.tensor([1.4, 0.1]))
    feats = {"item_id-list": torch.from_numpy(items[:6])}
    lens = torch.from_numpy(lengths[:6]) - 1
    with torch.no_grad():
        batched = m.next_item_scores(feats, lens)
        wider = m.next_item_scores(
            {"item_id-list": torch.nn.functional.pad(feats["item_id-list"], (0, 12))}, lens
        )
        fin = torch.isfinite(batched)
        assert torch.allclose(batched[fin], wider[fin], atol=1e-5)
        for i in range(6):
            n = int(lens[i])
            alone = m.next_item_scores(
                {"item_id-list": feats["item_id-list"][i : i + 1, :n]}, lens[i : i + 1]
            )
            assert torch.allclose(alone[0][fin[i]], batched[i][fin[i]], atol=1e-5)
        traced = torch.jit.trace(Ranker(m), (feats["item_id-list"], lens))
        other = torch.from_numpy(items[10:13])
        olen = torch.from_numpy(lengths[10:13])
        got = traced(torch.nn.functional.pad(other, (0, 4)), olen)
        assert torch.allclose(
            got, m.next_item_scores({"item_id-list": other}, olen), atol=1e-5, equal_nan=True
        )
    # the memory changes the ranking: scores differ from the same model with empty tables
    empty = SessionModel(m.cfg).eval()
    empty.load_state_dict(
        {
            k: v
            for k, v in m.state_dict().items()
            if not k.startswith("item_memory.") or "w_" in k or "gate" in k
        },
        strict=False,
    )
    with torch.no_grad():
        assert not torch.allclose(empty.next_item_scores(feats, lens)[fin], batched[fin])


def test_memory_tables_are_in_the_state_dict_and_train():
    m, items, lengths = make_model("clm")
    sd = m.state_dict()
    for name in ("cooc_idx", "cooc_val", "succ_idx", "succ_val", "pop"):
        assert f"item_memory.{name}" in sd
    again = SessionModel(m.cfg).eval()
    again.load_state_dict(sd)
    feats = {"item_id-list": torch.from_numpy(items[:4])}
    lens = torch.from_numpy(lengths[:4])
    with torch.no_grad():
        assert torch.equal(again.next_item_scores(feats, lens), m.next_item_scores(feats, lens))
    m.train()
    loss = m.training_loss(feats, lens)
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    assert m.item_memory.gate.weight.grad.abs().sum() > 0


def test_memory_config_validation():
    with pytest.raises(ValueError, match="memory_k"):
        ModelConfig(categorical={"item_id-list": V}, memory=True, memory_k=0)
    with pytest.raises(ValueError, match="memory_decay"):
        ModelConfig(categorical={"item_id-list": V}, memory=True, memory_decay=0.0)
    for name in ("pop_prior", "cooc_curve"):
        for bad in (-1, 1):
            with pytest.raises(ValueError, match=f"{name} must be 0 \\(off\\) or >= 2 knots, got {bad}"):
                ModelConfig(categorical={"item_id-list": V}, memory=True, **{name: bad})


def test_cooc_curve_starts_as_the_logarithm_and_keeps_zero_at_zero():
    """ModelConfig.cooc_curve: the identity on log1p(count) at the start (past its last knot too),
    0 at a count of 0 whatever its values, and the scores of the model without it."""
    from training.model.curves import CountCurve

    curve = CountCurve(4)
    x = torch.tensor([0.0, 0.3, 1.0, 2.5, 3.0, 7.25])
    assert torch.allclose(curve(x), x)
    with torch.no_grad():
        curve.slopes.copy_(torch.tensor([-2.0, 7.0, -4.0]))  # f at the knots 0, 1, 2, 3: 0, -2, 5, 1
    assert curve(torch.zeros(3)).tolist() == [0.0] * 3
    assert torch.allclose(curve(torch.tensor([0.5, 1.5, 3.0, 4.0])), torch.tensor([-1.0, 1.5, 1.0, -3.0]))
    items, lengths = random_sessions(12, seed=1)
    plain, curved = memory_with(items, lengths), memory_with(items, lengths, cooc_curve=4)
    curved.cooc_curve.slopes.data = torch.ones(3)  # as at the start (memory_with draws them)
    h = torch.randn(len(items), D)
    it, lens = torch.from_numpy(items), torch.from_numpy(lengths)
    a, b = plain.next_item_scores(h, it, lens), curved.next_item_scores(h, it, lens)
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        curved.cooc_curve.slopes.normal_()
    curved.reset_to_blend()
    assert curved.cooc_curve.slopes.tolist() == [1.0, 1.0, 1.0]


def test_pop_prior_at_zero_scores_as_the_model_without_it():
    """ModelConfig.pop_prior starts at zero: the same scores as without it (training and serving)."""
    items, lengths = random_sessions(12, seed=1)
    fresh = ItemMemory(V, 4, max_len=7, d_model=D, decay=0.7, pop_prior=5)
    assert fresh.pop_prior is not None and fresh.pop_prior.values.tolist() == [0.0] * 5
    plain, prior = memory_with(items, lengths), memory_with(items, lengths, pop_prior=5)  # the same gates
    with torch.no_grad():
        prior.pop_prior.values.normal_()
    prior.reset_to_blend(), plain.reset_to_blend()  # the combiner's start, the prior at zero again
    assert prior.pop_prior.values.tolist() == [0.0] * 5
    h = torch.randn(len(items), D)
    it, lens = torch.from_numpy(items), torch.from_numpy(lengths)
    assert torch.equal(plain.next_item_scores(h, it, lens), prior.next_item_scores(h, it, lens))
    cand = torch.arange(V).expand(len(items), V)
    assert torch.equal(plain.candidate_scores(h, it, lens, cand, None), prior.candidate_scores(h, it, lens, cand, None))
    with torch.no_grad():
        prior.pop_prior.values[1:] = 1.0  # every item counted at least once gains 1 where it is 1 unit past
    assert not torch.equal(plain.next_item_scores(h, it, lens), prior.next_item_scores(h, it, lens))


def test_memory_under_autocast_is_float32():
    """Mixed precision (CUDA AMP in training; CPU bfloat16 autocast here): the gates and
    count scores stay float32 and the loss is finite."""
    m, items, lengths = make_model("clm")
    m.train()
    feats = {"item_id-list": torch.from_numpy(items[:8])}
    lens = torch.from_numpy(lengths[:8])
    p = pack_sessions(feats, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.packed_loss(p)
        h = torch.randn(3, m.cfg.d_model).to(torch.bfloat16)
        s = m.item_memory.next_item_scores(h, feats["item_id-list"][:3], lens[:3])
    assert torch.isfinite(loss) and s.dtype == torch.float32


def test_head_scale_zero_leaves_the_gated_counts_alone():
    """head_scale 0 (chosen by --head-selection) drops the network's own item logits, nothing else."""
    m, items, lengths = make_model("clm")
    with torch.no_grad():
        m.embeddings["item_id-list"].weight.normal_(0, 1.0)  # a head that matters
    feats = {"item_id-list": torch.from_numpy(items[:5])}
    lens = torch.from_numpy(lengths[:5])
    with torch.no_grad():
        with_head = m.next_item_scores(feats, lens)
        m.item_memory.head_scale.fill_(0.0)
        without = m.next_item_scores(feats, lens)
        # the counts alone, from the same hidden states: zero the head's input instead
        m.item_memory.head_scale.fill_(1.0)
        m._head_input = lambda h: torch.zeros_like(h)
        counts_only = m.next_item_scores(feats, lens)
    fin = torch.isfinite(without)
    assert torch.allclose(without[fin], counts_only[fin], atol=1e-6)
    assert not torch.allclose(with_head[fin], without[fin])


def test_memory_k_resolved_by_catalogue_size():
    """Below memory_k_min_items ids memory_k is kept as given (bit for bit); from it, capped at memory_k_large."""
    small = ModelConfig(categorical={"item_id-list": 199_999}, memory=True)
    assert small.memory_k == 100
    assert ModelConfig(categorical={"item_id-list": 199_999}, memory=True, memory_k=300).memory_k == 300
    large = ModelConfig(categorical={"item_id-list": 200_000}, memory=True)
    assert large.memory_k == 32
    assert ModelConfig(categorical={"item_id-list": 200_000}, memory_k=10).memory_k == 10  # a cap only
    assert ModelConfig(categorical={"item_id-list": 200_000}, memory_k_large=100).memory_k == 100
    assert ModelConfig(categorical={"item_id-list": V}, memory_k_min_items=V).memory_k == 32
    # meta.json round trip keeps the resolved K
    assert ModelConfig.from_dict(large.to_dict()).memory_k == 32
    # a config written before memory_k_large existed keeps its K whatever the catalogue size
    old = {k: v for k, v in large.to_dict().items() if k != "memory_k_large"}
    old["memory_k"] = 100
    assert ModelConfig.from_dict(old).memory_k == 100
    with pytest.raises(ValueError, match="memory_k_large"):
        ModelConfig(categorical={"item_id-list": V}, memory_k_large=0)


@pytest.mark.parametrize("hop2", [0.0, 0.5])
def test_set_memory_equals_memory_tables(hop2: float):
    """The trainer's table-at-a-time fill gives exactly memory_tables' tables (with the model's
    two-hop fill, ModelConfig.memory_hop2, when it has one)."""
    from training.data.splits import SessionTensors
    from training.trainer import set_memory

    # the fill needs rows with room and items two hops away: fewer sessions, K = 8 for it
    items, lengths = random_sessions(40 if hop2 == 0 else 8, seed=3)
    k = 5 if hop2 == 0 else 8
    cfg = ModelConfig(
        categorical={"item_id-list": V}, memory=True, memory_k=k, max_len=items.shape[1], memory_hop2=hop2
    )
    model = SessionModel(cfg)
    st = SessionTensors(
        {"item_id-list": torch.from_numpy(items)},
        torch.from_numpy(lengths),
        torch.arange(len(lengths)),
        "test",
    )
    set_memory(model, [st])
    counts = BaselineCounts(V)
    counts.add_sessions(items, lengths)
    tables = memory_tables(counts, k, hop2)
    filled = (tables["cooc_val"] > 0).sum() - (memory_tables(counts, k)["cooc_val"] > 0).sum()
    assert (filled > 0) == (hop2 > 0)  # the fill has rows with room to fill here
    for name, v in tables.items():
        buf = getattr(model.item_memory, name)
        assert buf.dtype == (torch.int32 if name.endswith("_idx") else torch.float32)
        assert torch.equal(buf, torch.from_numpy(v).to(buf.dtype)), name
