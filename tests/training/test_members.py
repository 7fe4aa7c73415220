"""Ensemble runs (TrainConfig.members, training/members.py): the members train side by side, member 0
is the single-model run of the seed, the ensemble is what is evaluated, loaded and resumed."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.train_util import tiny_cfg
from training.checkpoint import RunError, load_run
from training.data.splits import load_split, split_path
from training.evaluate import evaluate_sessions
from training.members import load_members
from training.model.ensemble import Ensemble
from training.schema import Schema
from training.train import train

RERANK = {"memory": True, "rerank": True, "head_gate": True}
TIMING = ("seconds", "per_second")


def ens_cfg(data, out, **kw):
    base = dict(holdout=0.2, patience=1, stack=1, epochs=2, end_window=4, model=RERANK, members=2)
    return tiny_cfg(data, out, **{**base, **kw})


def untimed(row):
    """A metrics row without its timings (and the members' rows likewise)."""
    out = {k: v for k, v in row.items() if not any(t in k for t in TIMING)}
    if "members" in out:
        out["members"] = [untimed(r) for r in out["members"]]
    return out


def trained_rows(run) -> list[dict]:
    return [r for r in json.loads((run / "metrics.json").read_text())["windows"] if r.get("sessions_trained")]


@pytest.fixture(scope="module")
def ensemble_run(tiny_synthetic_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("members") / "run"
    result = train(ens_cfg(tiny_synthetic_data, run, keep_windows=True))
    return run, result


def test_member_0_is_the_single_model_run_of_the_seed(ensemble_run, tiny_synthetic_data, tmp_path):
    run, result = ensemble_run
    single = tmp_path / "single"
    train(ens_cfg(tiny_synthetic_data, single, members=1))
    m0, _ = load_run(run / "members" / "0")
    alone, _ = load_run(single)
    s0, s1 = m0.state_dict(), alone.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    # the same training rows (the single run also evaluated itself)
    for mine, theirs in zip(trained_rows(run / "members" / "0"), trained_rows(single), strict=True):
        for key in ("best_epoch", "holdout_ndcg20_per_epoch", "holdout_ndcg20_after_stack", "fit_sessions"):
            assert mine[key] == theirs[key], key
    # member 1 has its own seed: other weights, its own held-back slice
    m1, _ = load_run(run / "members" / "1")
    assert not torch.equal(m1.embeddings["item_id-list"].weight, m0.embeddings["item_id-list"].weight)


def test_the_ensemble_is_evaluated_and_loaded_as_one_model(ensemble_run, tiny_synthetic_data):
    run, result = ensemble_run
    rows = [r for r in result["windows"] if r.get("eval_sessions")]
    assert rows and all(len(r["members"]) == 2 for r in rows)
    assert result["summary"]["ndcg@20"] is not None and "count_blend" in rows[-1]["baselines"]
    assert rows[-1]["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in rows[-1]["members"]))
    ens, meta = load_run(run)
    assert isinstance(ens, Ensemble) and len(ens.members) == 2 and meta["window"] == rows[-1]["train_window"]
    mem0, mem1 = (m.item_memory for m in ens.members)
    assert mem0.pop.data_ptr() == mem1.pop.data_ptr()  # one copy of the tables
    # the last window's metrics again, from the loaded ensemble: equal to the row
    t = rows[-1]["train_window"]
    schema = Schema.load(tiny_synthetic_data)
    eval_st = load_split(split_path(tiny_synthetic_data, t + 1, "valid"), schema)
    again = evaluate_sessions(ens, eval_st, schema.known_sizes(t), None, torch.device("cpu"), 64)
    assert again["ndcg@20"] == pytest.approx(rows[-1]["ndcg@20"], abs=1e-12)
    single, _ = load_run(run / "members" / "0")
    alone = evaluate_sessions(single, eval_st, schema.known_sizes(t), None, torch.device("cpu"), 64)
    assert alone["ndcg@20"] != again["ndcg@20"]  # the ensemble, not member 0, was evaluated


def test_an_ensemble_run_resumes_to_the_same_result(ensemble_run, tiny_synthetic_data, tmp_path):
    run, result = ensemble_run
    part = tmp_path / "part"
    train(ens_cfg(tiny_synthetic_data, part, end_window=3))
    with pytest.raises(RunError, match="--resume"):
        train(ens_cfg(tiny_synthetic_data, part))
    resumed = train(ens_cfg(tiny_synthetic_data, part, resume=True))
    assert [untimed(r) for r in resumed["windows"]] == [untimed(r) for r in result["windows"]]
    a, _ = load_run(part)
    b, _ = load_run(run)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_members_need_re_ranking_and_at_least_one(tiny_synthetic_data, tmp_path):
    with pytest.raises(RunError, match="--members 2 needs the item memory with re-ranking"):
        train(ens_cfg(tiny_synthetic_data, tmp_path / "a", model={"memory": True}))
    with pytest.raises(ValueError, match="members must be >= 1"):
        ens_cfg(tiny_synthetic_data, tmp_path / "b", members=0)


def test_the_exported_repository_serves_the_ensemble(ensemble_run, tiny_synthetic_data, tmp_path):
    from export.inference import TopKRanker, feature_order
    from export.pbtxt import TORCH_MODEL
    from export.repository import ExportConfig, export_repository
    from training.data.splits import eval_inputs_targets

    run, _ = ensemble_run
    out = export_repository(ExportConfig(run=run, data=tiny_synthetic_data, out=tmp_path / "repo", top_k=5))
    traced = torch.jit.load(str(out / TORCH_MODEL / "1" / "model.pt"))
    ens, meta = load_run(run)
    schema = Schema.load(tiny_synthetic_data)
    names = feature_order(schema)
    st = load_split(split_path(tiny_synthetic_data, meta["window"], "train"), schema)  # inputs only
    feats, lengths, _ = eval_inputs_targets(st, ens.cfg.item_feature)
    inputs = (*[feats[n] for n in names], lengths)
    with torch.no_grad():
        want_scores, want_ids = TopKRanker(ens, names, 5, ens.cfg.n_items)(*inputs)
        got_scores, got_ids = traced(*inputs)
    assert len(lengths) > 10 and torch.equal(got_ids, want_ids)
    assert torch.allclose(got_scores, want_scores)
    # and not member 0 alone
    with torch.no_grad():
        _, alone = TopKRanker(ens.members[0], names, 5, ens.cfg.n_items)(*inputs)
    assert not torch.equal(alone, got_ids)


def test_every_windows_ensemble_is_kept_and_loads(ensemble_run):
    run, result = ensemble_run
    trained = [r["train_window"] for r in result["windows"] if r.get("sessions_trained")]
    last, _ = load_run(run)
    for t in trained:
        ens, meta = load_run(run / "windows" / str(t))
        assert isinstance(ens, Ensemble) and meta["window"] == t
        assert (
            ens.cfg.n_items
            == json.loads((run / "members" / "1" / "windows" / str(t) / "meta.json").read_text())[
                "model_config"
            ]["categorical"]["item_id-list"]
        )
    sa, sb = ens.state_dict(), last.state_dict()  # the last window's is the run's
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # members that hold another window than the ensemble's meta.json (a save interrupted between them)
    meta = json.loads((run / "meta.json").read_text())
    with pytest.raises(RunError, match=f"holds window {trained[-1]}, the ensemble in .* window {trained[0]}"):
        load_members(run, {**meta, "window": trained[0]})


def test_members_saved_after_another_window_than_the_ensemble_are_refused_on_resume(
    ensemble_run, tiny_synthetic_data, tmp_path
):
    """A save interrupted after the members wrote window t but before the ensemble's meta.json did."""
    import shutil

    run, _ = ensemble_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "meta.json").read_text())
    earlier = [r for r in meta["metrics"]["windows"] if r["train_window"] < meta["window"]]
    meta.update(window=meta["window"] - 1, metrics={"windows": earlier})
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="stopped after different windows"):
        train(ens_cfg(tiny_synthetic_data, copy, resume=True, keep_windows=True))
