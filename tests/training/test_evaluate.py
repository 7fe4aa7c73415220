"""Evaluation of a model served in two stages (training/evaluate.py, issue 19 item 5).

* the target's rank among the candidates (`ranking.candidate_ranks`) is the exact pessimistic
  rank when every item is a candidate, and a miss for a target that is not a candidate;
* `evaluate_model` ranks as served (O(candidates) per session, never a (B, V) score matrix),
  `evaluate_both` also exactly, with the agreement of the two;
* a training run of a two-stage model reports served and exact metrics, their agreement and the
  epoch early stopping would have kept with exact ranking.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.model.test_ranking import COVER, SMALL, batch, make_model
from training.data.splits import SessionTensors
from training.evaluate import evaluate_both, evaluate_model
from training.metrics import metrics_from_ranks, pessimistic_ranks
from training.model import ranking


@pytest.mark.parametrize("memory", [False, True])
def test_candidate_ranks_cover_is_exact(memory):
    m = make_model(memory, "two_stage", **COVER)
    feats, lengths = batch(48)
    targets = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = pessimistic_ranks(m.next_item_scores(feats, lengths), targets)
        served = ranking.candidate_ranks(*m.candidate_scores(feats, lengths), targets)
    assert torch.equal(served, exact)


def test_candidate_ranks_miss_outside_the_candidates():
    scores = torch.tensor([[1.0, 3.0, float("-inf"), 2.0]])
    cand = torch.tensor([[4, 5, 5, 9]])  # the second 5 is a masked repeat
    ranks = ranking.candidate_ranks(scores.expand(3, -1), cand.expand(3, -1), torch.tensor([5, 4, 7]))
    assert ranks.tolist() == [1.0, 3.0, float("inf")]


def _sessions(n: int) -> SessionTensors:
    feats, lengths = batch(n, seed=5)
    keep = lengths >= 2  # a target and an input
    return SessionTensors(
        {k: v[keep] for k, v in feats.items()}, lengths[keep], torch.arange(int(keep.sum()))
    )


@pytest.mark.parametrize("memory", [False, True])
def test_evaluate_served_and_both(memory, monkeypatch):
    m = make_model(memory, "two_stage", **SMALL)
    st = _sessions(64)
    dev = torch.device("cpu")
    # served: never a score over the whole catalogue
    monkeypatch.setattr(type(m), "next_item_scores", lambda *a, **k: pytest.fail("O(V) scoring"))
    served = evaluate_model(m, st, dev, 16)
    monkeypatch.undo()
    ranks: dict = {}
    both = evaluate_both(m, st, dev, 16, ranks_out=ranks)
    assert {k: both[k] for k in served} == served
    assert {k: metrics_from_ranks(ranks["model"])[k] for k in served} == served  # --save-ranks: the served ranks
    assert both["exact"] == evaluate_model(m, st, dev, 16, exact=True)
    agree = both["served_agreement"]
    assert 0.0 <= agree["top20_overlap"] <= 1.0 and 0.0 <= agree["same_rank"] <= 1.0
    # every item a candidate: the served metrics are the exact ones
    cover = make_model(memory, "two_stage", **COVER)
    both = evaluate_both(cover, st, dev, 16)
    assert {k: both[k] for k in both["exact"]} == both["exact"]
    assert both["served_agreement"] == {"top20_overlap": 1.0, "same_rank": 1.0}


def test_training_run_reports_served_exact_and_the_choice(tiny_synthetic_data, tmp_path):
    from training.config import TrainConfig
    from training.train import train

    model = dict(rank="two_stage", rank_popular=30, ivf_list_size=16, ivf_probe=2, ivf_keep=10)
    cfg = TrainConfig(
        data=str(tiny_synthetic_data),
        out=str(tmp_path / "run"),
        start_window=2,
        end_window=4,
        epochs=3,
        holdout=0.2,
        patience=1,
        threads=1,
        baselines=False,
        progress=False,
        model=model,
    )
    train(cfg)
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for row in result["windows"]:
        assert set(row["exact"]) >= {"ndcg@20", "recall@20"}
        assert set(row["served_agreement"]) == {"top20_overlap", "same_rank"}
        assert len(row["holdout_ndcg20_exact_per_epoch"]) == len(row["holdout_ndcg20_per_epoch"])
        assert 1 <= row["best_epoch_exact"] <= row["epochs_run"]
    assert 0.0 <= result["summary"]["best_epoch_same_as_exact"] <= 1.0
    assert "served_agreement" in result["summary"] and "exact" in result["summary"]


@pytest.mark.parametrize("memory", [False, True])
def test_evaluate_both_on_a_catalogue_smaller_than_the_top(memory):
    """An early window of a growing vocabulary: a two-stage model whose tables hold fewer ids than the
    20 compared (DIGINETICA's window 1 knows 4 items); every real item is a candidate there."""
    from training.baselines import BaselineCounts, memory_tables
    from training.model import ModelConfig, SessionModel
    from training.names import FIRST_REAL_ID

    V = 12
    cfg = ModelConfig(
        categorical={"item_id-list": V}, objective="clm", memory=memory, memory_k=4, max_len=6,
        rank="two_stage", rank_popular=V - FIRST_REAL_ID, ivf_list_size=4, ivf_probe=1, ivf_keep=4,
    )  # fmt: skip
    torch.manual_seed(0)
    m = SessionModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    items = torch.randint(FIRST_REAL_ID, V, (40, 6), generator=g)
    lengths = torch.randint(2, 7, (40,), generator=g)
    items = items * (torch.arange(6)[None, :] < lengths[:, None])
    if memory:
        counts = BaselineCounts(V)
        counts.add_sessions(items.numpy(), lengths.numpy())
        m.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in memory_tables(counts, 4).items()})
    st = SessionTensors({"item_id-list": items}, lengths, torch.arange(40))
    both = evaluate_both(m, st, torch.device("cpu"), 16)
    assert {k: both[k] for k in both["exact"]} == both["exact"]
    assert both["served_agreement"] == {"top20_overlap": 1.0, "same_rank": 1.0}


# --- the count blend ranked without scoring the catalogue (SparseBlendRanker) -------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("known_less", [0, 9])
def test_sparse_count_blend_ranks_equal_the_dense_ranks(ties, known_less):
    """count_blend_ranks ranks each target among the session's sparse entries and a sorted popularity
    score: the same ranks as scoring every item, ties against the target included (integer counts
    make many), with targets inside and outside the entries, unknown ids (OOV inputs, targets >=
    known, which rank last as the dense path ranks them) and misses."""
    from tests.training.model.test_combiner import ITEM, V, batch
    from tests.training.model.test_combiner import make_model as memory_model
    from training.evaluate import count_blend_ranks, known_inputs
    from training.model import ItemMemory

    m = memory_model()
    mem = m.item_memory
    if ties:  # every count the same: ties between entries and with the popularity-only items
        with torch.no_grad():
            mem.cooc_val.copy_((mem.cooc_val > 0).float() * 2.0)
            mem.succ_val.copy_((mem.succ_val > 0).float())
            mem.pop.copy_(torch.where(mem.pop > 0, 3.0, 0.0))
    feats, lengths = batch(120, seed=17)
    feats[ITEM][::7, 0] = 1  # OOV inputs
    st = SessionTensors(feats, lengths, torch.arange(120))
    known = V - known_less
    seen, miss = known_inputs(st, {ITEM: known}, ITEM)
    tables = {k: getattr(mem, k) for k in ItemMemory.TABLES}
    cpu = torch.device("cpu")
    for kn, ms in ((known, miss), (None, None)):
        dense = count_blend_ranks(tables, m.cfg, seen, cpu, 16, kn, ms, dense=True)
        sparse = count_blend_ranks(tables, m.cfg, seen, cpu, 16, kn, ms)
        assert torch.equal(sparse, dense)
    finite = dense[torch.isfinite(dense)]
    assert (finite <= 10).any() and finite.max() > 20  # hits, and targets ranked by popularity alone
    if known_less:
        assert bool(miss.any())  # targets >= known
        assert int((count_blend_ranks(tables, m.cfg, seen, cpu, 16, known) == V).sum()) == int(miss.sum())
