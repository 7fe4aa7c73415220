"""bench.count_scorer, the probe of a learned scorer over the item memory's count features: its count
blend is the evaluation's count blend on the same forward sessions, and the command writes every
method's figures."""

from __future__ import annotations

import json

import pytest
import torch

from bench.count_scorer import FEATURES, forward_windows, main, score
from training.baselines import BaselineCounts, memory_tables
from training.config import TrainConfig
from training.data.splits import eval_inputs_targets, load_schema, load_split, split_path
from training.evaluate import blend_memory, known_inputs
from training.metrics import metrics_from_ranks
from training.model import ranking
from training.names import FIRST_REAL_ID
from training.schema import Schema


def memory_cfg(data):
    return TrainConfig(data=str(data), out="-", model={"memory": True, "rerank": True}).model.with_schema(
        load_schema(data)
    )


def memory_cfg_for(n_items: int):
    """A small re-ranking model's settings over `n_items` ids (the memory's K = 5)."""
    from training.model import ModelConfig

    return ModelConfig(
        categorical={"item_id-list": n_items}, max_len=6, d_model=8, n_head=2, n_layer=1, d_inner=16,
        memory=True, rerank=True, memory_k=5, rank_popular=64,
    )  # fmt: skip


def test_the_probes_blend_is_the_count_blend_re_ranking_the_memorys_candidates(tiny_synthetic_data):
    """Its `blend` column: the count blend's scores of each forward session's candidates (the tables of
    the windows before it, ids known by then), ranked as the served model ranks
    (`ranking.candidate_ranks`; a target outside them or unknown is a miss)."""
    cfg = memory_cfg(tiny_synthetic_data)
    windows = forward_windows(tiny_synthetic_data, cfg)
    assert windows and all(w.x[0].shape[2] == len(FEATURES) for w in windows)
    got = score(windows, lambda x, blend: blend)
    schema = Schema.load(tiny_synthetic_data)
    item = cfg.item_feature
    for win in windows:
        counts = BaselineCounts(schema.categorical[item])
        for w in [w for w in schema.windows if w < win.w]:
            st = load_split(split_path(tiny_synthetic_data, w, "train"), schema)
            counts.add_sessions(st.feats[item].numpy(), st.lengths.numpy())
        tables = {
            k: torch.from_numpy(v) for k, v in memory_tables(counts, cfg.memory_k, cfg.memory_hop2).items()
        }
        mem = blend_memory(tables, cfg)
        known = schema.known_sizes(win.w - 1)[item]
        st, miss = known_inputs(
            load_split(split_path(tiny_synthetic_data, win.w, "train"), schema), {item: known}, item
        )
        feats, lengths, targets = eval_inputs_targets(st, item)
        cand = mem.session_candidates(feats[item], lengths)
        scores = mem.candidate_scores(torch.zeros(len(st), cfg.d_model), feats[item], lengths, cand, None)
        special = torch.zeros(len(tables["pop"]), dtype=torch.bool)
        special[:FIRST_REAL_ID] = True
        special[known:] = True  # not known yet: not in the served model's tables
        ranks = ranking.candidate_ranks(ranking.mask_candidates(scores, cand, special), cand, targets)
        want = metrics_from_ranks(torch.where(miss, float("inf"), ranks))
        assert win.sessions == len(st)
        assert got[win.w]["ndcg@20"] == pytest.approx(want["ndcg@20"], abs=1e-6), win.w
        assert got[win.w]["recall@20"] == pytest.approx(want["recall@20"], abs=1e-6), win.w


def test_the_command_writes_every_methods_windows(tiny_synthetic_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"model_config": memory_cfg(tiny_synthetic_data).to_dict()}))
    out = tmp_path / "probe.json"
    windows = Schema.load(tiny_synthetic_data).windows
    argv = ["--data", str(tiny_synthetic_data), "--model-config", str(run), "--fit-last", str(windows[-2])]
    assert main([*argv, "--seeds", "0", "--epochs", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"blend", "linear_s0", "mlp_s0"}
    assert result["scored_windows"] == [windows[-1]] and result["fit_windows"]
    for entry in result["methods"].values():
        assert set(entry["windows"]) == {str(windows[-1])}
        assert 0.0 <= entry["ndcg@20"] <= entry["recall@20"] <= 1.0
    assert result["methods"]["blend"]["ndcg@20_vs_blend"] == 1.0


def test_a_candidate_counts_once_and_only_when_known():
    """Repeated candidate ids (a session's own items are also in the lists) count at their first position
    only, and ids not known yet, which the popular list of a small catalogue holds, are no candidates."""
    from bench.count_scorer import candidate_features
    from tests.sessions_util import random_sessions

    items, lengths = random_sessions(60, 50, seed=3, max_len=6, min_len=2)
    counts = BaselineCounts(50)
    counts.add_sessions(items, lengths)
    cfg = memory_cfg_for(50)
    mem = blend_memory({k: torch.from_numpy(v) for k, v in memory_tables(counts, 5).items()}, cfg)
    sessions = torch.tensor([[7, 9, 7, 12, 0, 0], [40, 41, 3, 0, 0, 0]])
    x, bad, cand = candidate_features(mem, sessions, torch.tensor([4, 3]), known=30)
    assert (cand >= 30).any() and bad[cand >= 30].all()
    for row in range(2):
        ids, counted = cand[row][~bad[row]], cand[row][~bad[row]].unique()
        assert len(ids) == len(counted)  # each id once
    # the session's own item 7, twice in its context at distances 1 and 3: one candidate, both repeats counted
    at = ((cand[0] == 7) & ~bad[0]).nonzero().squeeze(1)
    rep = [FEATURES.index(f) for f in ("repeats_d1", "repeats_d3-5")]
    assert len(at) == 1 and x[0, at[0], rep].tolist() == [1.0, 1.0]


def test_the_features_mean_and_deviation_are_those_of_every_candidate():
    from bench.count_scorer import feature_norm

    g = torch.Generator().manual_seed(0)
    batches = [
        torch.rand(3, 7, len(FEATURES), generator=g).half(),
        torch.rand(5, 7, len(FEATURES), generator=g).half(),
    ]
    mean, sd = feature_norm(batches)
    flat = torch.cat([b.float().reshape(-1, len(FEATURES)) for b in batches])
    assert torch.allclose(mean, flat.mean(0), atol=1e-6) and torch.allclose(sd, flat.std(0) + 1e-6, atol=1e-5)
