"""How the network and the counts are combined: head gate, the ablation switches, gBCE.

What must hold:
* head gate (ModelConfig.head_gate): starts at weight 1 (the scores of the model without it) and
  multiplies the network's own item logits only, per session, in every scoring path (exact,
  candidates, packed, packed on columns);
* head_logits off == the head's weight 0; it needs the item memory;
* leave_out=False scores sessions as they are in the counts (no correction; stacking uses it,
  tests/training/test_stacking.py);
* side_features off: the continuous features change nothing; feature_norm: a LayerNorm per
  feature (a feature's scale no longer matters);
* gBCE: gSASRec's formula (hand computed), plain BCE over every item, and the sampled gBCE
  with every item drawn equals the full one;
* the flags and the real recipe.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.sessions_util import random_sessions
from training.baselines import BaselineCounts, memory_tables
from training.model import HeadFactors, ModelConfig, PackedTargets, SessionModel, pack_sessions, take
from training.model.losses import gbce_loss
from training.model.packing import mask_positions
from training.names import FIRST_REAL_ID, ITEM_LIST
from training.recipes import RECIPES

ITEM = ITEM_LIST
CAT = "category-list"
CONT = "weekday_sin-list"
V = 50
L = 6
K = 5
D = 8


def make_model(**kw) -> SessionModel:
    settings = dict(
        categorical={ITEM: V, CAT: 7}, continuous=[CONT], max_len=L, embedding_dim=D, d_output=D, d_model=D,
        n_head=2, n_layer=1, d_inner=16, dropout=0.0, objective="clm", memory=True, memory_k=K,
    )  # fmt: skip
    torch.manual_seed(0)
    m = SessionModel(ModelConfig(**{**settings, **kw}))
    if m.item_memory is not None:
        items, lengths = random_sessions(80, V, seed=1, max_len=L, min_len=2)
        counts = BaselineCounts(V)
        counts.add_sessions(items, lengths)
        m.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, K).items()})
        with torch.no_grad():
            m.item_memory.gate.weight.normal_(0, 0.3)
    return m.eval()


def batch(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    items, lengths = random_sessions(n, V, seed=seed, max_len=L, min_len=2)
    it = torch.from_numpy(items)
    real = it > 0
    cont = torch.rand(it.shape, generator=torch.Generator().manual_seed(seed)) * real
    return {ITEM: it, CAT: (it % 4 + FIRST_REAL_ID) * real, CONT: cont}, torch.from_numpy(lengths)


def every_path(mem, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The item memory's scores of the same random sessions and head factors in every scoring path,
    with the hidden states the gates read: exact (B, V), candidates (B, C), packed (M, V),
    packed on columns (M, U)."""
    g = torch.Generator().manual_seed(seed)
    feats, lengths = batch(6, seed=5)
    items = feats[ITEM]
    h, bh, table = (
        torch.randn(6, D, generator=g),
        torch.randn(6, D, generator=g),
        torch.randn(V, D, generator=g),
    )
    cand = torch.randint(FIRST_REAL_ID, V, (6, 12), generator=g).sort(1).values
    p = pack_sessions({ITEM: items}, lengths)
    seg = p.segment
    where = F.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), (1, 0))
    tgt = PackedTargets(*where.nonzero(as_tuple=True), seg > 0)
    M = len(tgt.row)
    hm, bhm = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    cols = torch.arange(FIRST_REAL_ID, V, 3)
    with torch.no_grad():
        return [
            (mem.next_item_scores(h, items, lengths, HeadFactors(bh, table)), h),
            (mem.candidate_scores(h, items, lengths, cand, HeadFactors(bh, take(table, cand))), h),
            (mem.packed_scores(hm, p.feats[ITEM], seg, tgt, HeadFactors(bhm, table)), hm),
            (mem.packed_scores(hm, p.feats[ITEM], seg, tgt, HeadFactors(bhm, table[cols]), cols=cols), hm),
        ]


# --- head gate ------------------------------------------------------------------------


def test_head_gate_starts_at_one_and_scales_only_the_head_per_session():
    gated = make_model(head_gate=True).item_memory
    plain = make_model().item_memory
    plain.load_state_dict(gated.state_dict(), strict=False)  # the same counts and count gates
    for (a, _), (b, _) in zip(every_path(gated), every_path(plain)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # softplus(bias) = 1 at the start
    with torch.no_grad():
        gated.head_gate.weight.normal_(0, 1.0)  # a different weight per session
    one = every_path(plain)  # head weight 1
    plain.head_scale.fill_(0.0)
    off = every_path(plain)  # no head
    for (got, h), (a, _), (b, _) in zip(every_path(gated), one, off):
        w = gated.head_weight(h).detach()  # (n, 1)
        assert float(w.std()) > 0.1
        assert torch.allclose(got - b, w * (a - b), rtol=1e-4, atol=1e-5)


def test_head_gate_is_an_item_memory_parameter():
    m = make_model(head_gate=True)
    names = {n for n, _ in m.named_parameters()}
    assert {"item_memory.head_gate.weight", "item_memory.head_gate.bias"} <= names  # memory_lr, no decay
    assert "item_memory.head_gate.weight" not in {n for n, _ in make_model().named_parameters()}


def test_without_head_logits_the_scores_are_the_gated_counts():
    m = make_model(head_logits=False, rerank=True, rank_popular=8)
    ref = make_model(rerank=True, rank_popular=8)
    ref.load_state_dict(m.state_dict())
    ref.item_memory.head_scale.fill_(0.0)
    feats, lengths = batch(16, seed=3)
    with torch.no_grad():
        assert torch.allclose(
            m.next_item_scores(feats, lengths), ref.next_item_scores(feats, lengths), atol=1e-6
        )
        got, want = m.next_item_topk(feats, lengths, 8), ref.next_item_topk(feats, lengths, 8)
    assert torch.allclose(got[0], want[0], atol=1e-6)
    with pytest.raises(ValueError, match="head_logits=False needs the item memory"):
        ModelConfig(memory=False, head_logits=False)


# --- leave-one-out switch ----------------------------------------------------


def test_leave_out_false_scores_sessions_as_the_counts_hold_them():
    mem = make_model().item_memory
    feats, lengths = batch(5, seed=7)
    items = feats[ITEM]
    p = pack_sessions({ITEM: items}, lengths)
    seg = p.segment
    where = F.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), (1, 0))
    tgt = PackedTargets(*where.nonzero(as_tuple=True), seg > 0)
    h = torch.randn(len(tgt.row), D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = mem.packed_scores(h, p.feats[ITEM], seg, tgt, leave_out=False)
        for m, (r, q) in enumerate(zip(tgt.row.tolist(), tgt.pos.tolist())):
            ctx = p.feats[ITEM][r, :q][seg[r, :q] == seg[r, q]]
            want = mem.next_item_scores(h[m : m + 1], F.pad(ctx, (0, 1))[None], torch.tensor([len(ctx)]))
            assert torch.allclose(got[m], want[0], atol=1e-5)


# --- input switches -----------------------------------------------------------------------


def test_side_features_off_reads_no_continuous_feature():
    feats, lengths = batch(8, seed=2)
    other = {**feats, CONT: feats[CONT] * 7.0 + 1.0}
    for side, same in ((False, True), (True, False)):
        m = make_model(side_features=side)
        with torch.no_grad():
            a, b = m.next_item_scores(feats, lengths), m.next_item_scores(other, lengths)
        assert torch.allclose(a, b, atol=1e-6) == same


def test_feature_norm_makes_each_features_scale_irrelevant():
    feats, lengths = batch(8, seed=2)
    for norm in (True, False):
        m = make_model(feature_norm=norm)
        assert (
            m.feature_norms is not None and len(m.feature_norms) == 3
        ) == norm  # item, category, continuous
        with torch.no_grad():
            a = m.next_item_scores(feats, lengths)
            m.embeddings[CAT].weight.mul_(25.0)
            b = m.next_item_scores(feats, lengths)
        diff = float((a - b)[torch.isfinite(a)].abs().max())
        assert diff < 5e-3 if norm else diff > 0.05, diff  # (LayerNorm's eps keeps a trace of the scale)


def test_item_norm_off_normalises_the_side_features_only():
    """--no-item-norm: the item embedding enters unnormalised (its scale reaches the input), the category
    embedding and the continuous projection keep their LayerNorm; on (the default) every feature's scale is
    irrelevant to the input block."""
    feats, lengths = batch(8, seed=2)
    for item_norm in (True, False):
        m = make_model(feature_norm=True, item_norm=item_norm)
        kinds = [type(n).__name__ for n in m.feature_norms]  # sorted names: category, item; then continuous
        assert kinds == ["LayerNorm", "LayerNorm" if item_norm else "Identity", "LayerNorm"], kinds
        with torch.no_grad():
            for emb in m.embeddings.values():  # vectors well above LayerNorm's eps, so only the scale can move
                emb.weight.mul_(10.0)
            x = m.embed(feats)
            for name, factor in ((CAT, 25.0), (ITEM, 25.0)):
                m.embeddings[name].weight.mul_(factor)
                y = m.embed(feats)
                m.embeddings[name].weight.div_(factor)
                moved = float((x - y).abs().max())
                if name == CAT or item_norm:
                    assert moved < 1e-3, (name, item_norm, moved)
                else:
                    assert moved > 0.05, (name, item_norm, moved)


def test_continuous_log_reads_sign_log1p_of_each_continuous_input():
    """--continuous-log: the model with raw inputs x scores as the model without it on sign(x) log1p(|x|)."""
    feats, lengths = batch(8, seed=2)
    raw = {**feats, CONT: (feats[CONT] - 0.5) * 600.0}  # ages of hundreds of days, some negative
    logged = {**feats, CONT: torch.sign(raw[CONT]) * torch.log1p(raw[CONT].abs())}
    with torch.no_grad():
        on = make_model(continuous_log=True).next_item_scores(raw, lengths)
        off = make_model().next_item_scores(logged, lengths)
        off_raw = make_model().next_item_scores(raw, lengths)
    ok = torch.isfinite(on)
    assert torch.equal(ok, torch.isfinite(off))
    assert torch.allclose(on[ok], off[ok], atol=1e-5)
    assert float((on - off_raw)[ok].abs().max()) > 0.05  # and it is not a no-op


# --- gBCE -------------------------------------------------------------------------------


def test_gbce_hand_computed():
    """gSASRec's own formulation: the positive's probability raised to beta through a transformed logit."""
    logits = torch.tensor([[2.0, -1.0, 0.5, float("-inf")], [0.1, 0.3, -2.0, 1.0]])
    target = torch.tensor([0, 3])
    n_items, t = 11, 0.75
    want = 0.0
    for row, y in zip(logits.double(), target.tolist()):
        ok = torch.isfinite(row)
        alpha = (int(ok.sum()) - 1) / (n_items - 1)
        beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
        p = torch.sigmoid(row[y])
        z = torch.log(1.0 / (p ** (-beta) - 1.0))  # sigmoid(z) = p ** beta
        neg = row[ok & (torch.arange(len(row)) != y)]
        labels = torch.cat([torch.ones(1), torch.zeros(len(neg))]).double()
        want += float(F.binary_cross_entropy_with_logits(torch.cat([z[None], neg]), labels, reduction="sum"))
    assert gbce_loss(logits, target, n_items, t).item() == pytest.approx(want / 2, rel=1e-5)


def test_gbce_over_every_item_is_bce():
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 3, 8, 2, 2])
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(target, 9).float(), reduction="sum") / 5
    assert gbce_loss(logits, target, 9, 0.75).item() == pytest.approx(bce.item(), rel=1e-5)


@pytest.mark.parametrize("memory", [False, True])
def test_sampled_gbce_with_every_item_drawn_is_the_full_gbce(memory):
    kw = dict(memory=memory, loss_fn="gbce", categorical={ITEM: V, CAT: 7})
    s, f = make_model(loss="sampled", negatives=50_000, **kw), make_model(loss="full", **kw)
    f.load_state_dict(s.state_dict())
    if not memory:
        s.set_sample_counts(torch.ones(V))
    feats, lengths = batch(16, seed=4)
    p = pack_sessions(feats, lengths)
    got = s.packed_loss(p, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(got, f.packed_loss(p), rtol=1e-5)
    with pytest.raises(ValueError, match="softmax notion"):
        f.packed_loss(p, label_smoothing=0.1)


# --- settings ---------------------------------------------------------------------------


def test_flags_recipes_and_old_configs():
    from training.config import build_parser

    parser = build_parser("train", "")
    ns = parser.parse_args(
        ["--data", "d", "--out", "o", "--rerank", "--head-gate", "--stack", "3", "--loss-fn", "gbce",
         "--gbce-t", "0.5", "--feature-norm", "--no-side-features", "--no-head-logits"]
    )  # fmt: skip
    got = vars(ns)
    assert (
        got["stack"] == 3
        and got["model.rerank"]
        and got["model.head_gate"]
        and got["model.loss_fn"] == "gbce"
    )
    assert got["model.gbce_t"] == 0.5 and got["model.feature_norm"] and not got["model.side_features"]
    assert not got["model.head_logits"]
    real, ref = RECIPES["real"], RECIPES["reference"]
    assert real["stack"] == 5 and real["model"]["rerank"] and real["model"]["head_gate"]
    assert ref["stack"] == 0 and "rerank" not in ref["model"]
    old = ModelConfig().to_dict()
    for k in ("rerank", "head_gate", "head_logits", "feature_norm", "side_features", "loss_fn", "gbce_t"):
        old.pop(k)
    assert ModelConfig.from_dict(old) == ModelConfig()  # a checkpoint from before: today's behaviour
    with pytest.raises(ValueError, match="loss_fn"):
        ModelConfig(loss_fn="bpr")


@pytest.mark.parametrize("rerank", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_memory_masked_context_reads_every_earlier_item_of_a_masked_target(monkeypatch, rerank, full):
    """ModelConfig.memory_masked_context under mlm: a masked target's count terms read every earlier
    item of its session, masked or not (serving's context); off: the unmasked ones only. The network's
    inputs are the same either way, and the target itself is never its own context."""
    m = make_model(objective="mlm", mask_prob=0.4, rerank=rerank, rank_popular=8, memory_masked_context=full)
    seen = []
    real = m.item_memory._targets

    def spy(items, segment, targets):
        out = real(items, segment, targets)
        seen.append((out[0].ctx.clone(), out[1].clone(), targets.pos.clone(), targets.row.clone()))
        return out

    monkeypatch.setattr(m.item_memory, "_targets", spy)
    feats, lengths = batch(24, seed=5)
    masking = mask_positions(feats[ITEM], lengths, 0.4, torch.Generator().manual_seed(1))
    p = pack_sessions(feats, lengths, masking.masked)
    m.packed_loss(p)
    (ctx, in_own, pos, row), = seen
    W = p.segment.shape[1]
    earlier = in_own & (torch.arange(W)[None, :] < pos[:, None])  # (M, W) the target's earlier positions
    want = earlier if full else earlier & ~p.masked[row]
    assert torch.equal(ctx, want)
    assert bool((p.masked[row] & earlier).any())  # some target has a masked item before it


@pytest.mark.parametrize("rerank", [False, True])
def test_blend_weight_adds_the_count_blends_scores(rerank):
    """ItemMemory.blend_weight b (TrainConfig.fuse_blend's evaluation): every scoring path gives the
    model's scores + b x the count blend's (`training.evaluate.blend_memory`, the same tables)."""
    from training.evaluate import blend_memory

    m = make_model(head_gate=True, rerank=rerank, rank_popular=8).eval()
    with torch.no_grad():  # a combiner away from the blend's weights
        for p in m.item_memory.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    feats, lengths = batch(12, seed=7)
    blend = blend_memory(m.item_memory.tables(), m.cfg)
    with torch.no_grad():
        base = m.next_item_scores(feats, lengths)
        prior = blend.next_item_scores(torch.zeros(len(lengths), m.cfg.d_model), feats[ITEM], lengths)
        m.item_memory.blend_weight = 0.5
        fused = m.next_item_scores(feats, lengths)
        cand_scores, cand = m.candidate_scores(feats, lengths) if rerank else (fused, None)
        m.item_memory.blend_weight = 0.0
        again = m.next_item_scores(feats, lengths)
    fin = torch.isfinite(base)
    assert torch.equal(torch.isfinite(fused), fin) and torch.equal(again, base)
    assert torch.allclose(fused[fin], (base + 0.5 * prior)[fin], atol=1e-5)
    assert not torch.allclose(fused[fin], base[fin])
    if rerank:  # the served path: the session's candidates
        ok = torch.isfinite(cand_scores)
        assert torch.allclose(cand_scores[ok], fused.gather(1, cand)[ok], atol=1e-5)
