"""Evaluation protocol, recipe switch, early stopping on training data only, tune -> train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.evaluate as evaluate_mod
import training.train as train_mod
import training.trainer as trainer_mod
from tests.training.train_util import tiny_cfg
from training.baselines import BaselineCounts
from training.config import TrainConfig
from training.data.splits import eval_inputs_targets, load_schema, load_split, split_path
from training.evaluate import split_holdout
from training.names import OOV_ID
from training.recipes import RECIPES, default_recipe, resolve_settings
from training.train import train
from training.tune import TuneConfig, sample_trials, tune

# --- evaluation protocol: the same sessions and targets for every method ------------------


def test_model_and_baselines_see_the_same_sessions(tiny_synthetic_data, tmp_path, monkeypatch):
    seen: dict[str, list] = {"model": [], "baselines": []}
    real_eval, real_base = evaluate_mod.evaluate_model, evaluate_mod.evaluate_baselines

    def spy_model(model, st, device, batch_size, miss=None, ranks_out=None):
        seen["model"].append(eval_inputs_targets(st, model.cfg.item_feature)[2].numpy())
        return real_eval(model, st, device, batch_size, miss, ranks_out=ranks_out)

    def spy_base(counts, items, lengths, targets, ranks_out=None):
        seen["baselines"].append(np.asarray(targets))
        return real_base(counts, items, lengths, targets, ranks_out)

    monkeypatch.setattr(evaluate_mod, "evaluate_model", spy_model)
    monkeypatch.setattr(evaluate_mod, "evaluate_baselines", spy_base)
    result = train(tiny_cfg(tiny_synthetic_data, tmp_path / "run"))
    schema = load_schema(tiny_synthetic_data)
    assert len(seen["model"]) == len(seen["baselines"]) == len(result["windows"]) == 2
    for row, m, b in zip(result["windows"], seen["model"], seen["baselines"]):
        st = load_split(split_path(tiny_synthetic_data, row["eval_window"], "valid"), schema)
        expected = st.feats[schema["item_list"]][torch.arange(len(st)), st.lengths - 1].numpy()
        # issue 12: a target unknown after the training window reaches every method as OOV (a miss)
        expected = np.where(expected >= row["items_known"], OOV_ID, expected)
        np.testing.assert_array_equal(m, expected)  # target = the last item of every valid session
        np.testing.assert_array_equal(b, expected)
        assert row["eval_sessions"] == len(st)


def test_unseen_target_is_a_miss_for_baselines_only():
    counts = BaselineCounts(8)
    counts.add_sessions(np.array([[3, 4, 5]]), np.array([3]))
    # target 7 never occurs in training: +inf for every baseline; 4 is ranked
    for name in ("popular", "cooc_knn", "successor_knn"):
        ranks = counts.ranks(name, np.array([3, 3]), np.array([7, 4]))
        assert ranks[0] == np.inf and np.isfinite(ranks[1])


# --- recipe switch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "recipe", "expected"),
    [
        ("synthetic", "auto", "reference"),
        ("../shared/data/diginetica/diginetica-views-7days.tsv", "auto", "real"),
        ("clicks.parquet", "reference", "reference"),
        ("synthetic", "real", "real"),
    ],
)
def test_recipe_switch(source, recipe, expected):
    assert default_recipe({"source": source}) in RECIPES
    s = resolve_settings({"source": source}, recipe)
    assert s["recipe"] == expected
    want = RECIPES[expected]
    assert {k: s[k] for k in want if k != "model"} == {k: v for k, v in want.items() if k != "model"}
    assert s["model"] == want["model"]


def test_real_recipe_values_and_precedence():
    s = resolve_settings({"source": "log.csv"}, "auto")
    assert (s["train_on"], s["model"]["objective"], s["patience"] > 0, s["holdout"] > 0) == (
        "cumulative", "mlm", True, True,
    )  # fmt: skip
    assert (s["model"]["mask_prob"], s["model"]["memory_hop2"], s["model"]["feature_norm"]) == (0.3, 0.6, True)
    # config file over the recipe, explicit flags over the config file
    s = resolve_settings(
        {"source": "log.csv"}, "auto", {"lr": 0.1, "model": {"dropout": 0.2}}, {"lr": 0.5, "epochs": None}
    )
    assert (s["lr"], s["epochs"], s["model"]["dropout"]) == (0.5, RECIPES["real"]["epochs"], 0.2)


def test_cli_defaults_follow_the_data(tiny_synthetic_data, tmp_path):
    cfg = train_mod.parse_args(["--data", str(tiny_synthetic_data), "--out", "R"])
    assert (cfg.recipe, cfg.epochs, cfg.train_on, cfg.model.objective) == ("reference", 5, "window", "mlm")
    cfg = train_mod.parse_args(["--data", str(tiny_synthetic_data), "--out", "R", "--recipe", "real"])
    assert (cfg.recipe, cfg.train_on, cfg.model.objective, cfg.model.memory_hop2) == (
        "real",
        "cumulative",
        "mlm",
        0.6,
    )
    cfg = train_mod.parse_args(
        ["--data", str(tiny_synthetic_data), "--out", "R", "--recipe", "real", "--train-on", "window"]
    )
    assert cfg.train_on == "window"


def test_bad_recipe_settings():
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(data="D", out="R", patience=2, holdout=0.0)
    with pytest.raises(ValueError, match="train_on"):
        TrainConfig(data="D", out="R", train_on="all")


# --- early stopping uses training data only ---------------------------------------------------


def test_holdout_split_is_disjoint_and_deterministic(tiny_synthetic_data):
    st = load_split(split_path(tiny_synthetic_data, 1, "train"), load_schema(tiny_synthetic_data))
    fit, held = split_holdout(st, 0.2, 7)
    ids_fit, ids_held = set(fit.session_id.tolist()), set(held.session_id.tolist())
    assert not ids_fit & ids_held and len(ids_fit | ids_held) == len(st) and len(held) >= 1
    assert torch.equal(split_holdout(st, 0.2, 7)[1].session_id, held.session_id)


def test_early_stopping_selects_on_training_sessions(tiny_synthetic_data, tmp_path, monkeypatch):
    schema = load_schema(tiny_synthetic_data)
    train_ids = {
        w: set(load_split(split_path(tiny_synthetic_data, w, "train"), schema).session_id.tolist())
        for w in (1, 2)
    }
    calls: list[set] = []
    read: list[str] = []
    real_eval, real_load = evaluate_mod.evaluate_model, trainer_mod.load_split

    def spy_eval(model, st, device, batch_size, miss=None, **kw):
        calls.append(set(st.session_id.tolist()))
        return real_eval(model, st, device, batch_size, miss, **kw)

    def spy_load(path, schema):
        read.append(Path(path).name)
        return real_load(path, schema)

    monkeypatch.setattr(evaluate_mod, "evaluate_model", spy_eval)
    monkeypatch.setattr(trainer_mod, "load_split", spy_load)
    result = train(
        tiny_cfg(
            tiny_synthetic_data, tmp_path / "run", epochs=3, holdout=0.2, patience=1,
            train_on="cumulative", evaluate=False, baselines=False,
        )
    )  # fmt: skip
    assert "valid.parquet" not in read and "test.parquet" not in read  # only training splits
    assert calls and all(any(c <= ids for ids in train_ids.values()) for c in calls)
    for row in result["windows"]:
        assert 1 <= row["epochs_run"] <= 3 and 1 <= row["best_epoch"] <= row["epochs_run"]
        assert len(row["holdout_ndcg20_per_epoch"]) == row["epochs_run"]
        assert row["fit_sessions"] + row["holdout_sessions"] >= row["train_sessions"]
        assert "ndcg@20" not in row  # evaluation window never scored


# --- tune writes a file that train accepts --------------------------------------------------------


def test_tune_writes_settings_train_accepts(tiny_synthetic_data, tmp_path):
    assert len(sample_trials(3, 0)) == 3 and sample_trials(3, 0) == sample_trials(3, 0)
    best = tmp_path / "best.json"
    out = tune(
        TuneConfig(
            data=str(tiny_synthetic_data), out=str(best), trials=1, end_window=3, max_epochs=1, threads=1
        )
    )
    saved = json.loads(best.read_text())
    assert saved["params"] == out["params"] and np.isfinite(saved["score"])
    cfg = train_mod.parse_args(
        ["--data", str(tiny_synthetic_data), "--out", str(tmp_path / "run"), "--config", str(best),
         "--end-window", "3", "--threads", "1", "--no-progress"]
    )  # fmt: skip
    assert cfg.recipe == "real+config" and cfg.epochs == 1
    for k, v in saved["params"]["model"].items():
        assert getattr(cfg.model, k) == v
    result = train(cfg)
    assert result["summary"]["windows_evaluated"] == 2
    assert train_mod.main(["--data", str(tiny_synthetic_data), "--out", str(tmp_path / "r2"), "--config",
                           str(tmp_path / "missing.json")]) == 2  # fmt: skip


# --- make bench-quality, end to end on a small click log ------------------------------------
def _bench_quality(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m bench.quality ARGS` run from the project root `cwd` (tests never import a benchmark)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality", *args], capture_output=True, text=True, cwd=cwd
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")  # shown by pytest when an assertion fails
    return proc


def test_bench_quality_end_to_end(tmp_path, repo_root):
    """The bench prepares a click log, trains the recipe the data selects (real: a log from
    --input), and reports model, baselines and the count-blend ablation per window with
    consistent means and ratios."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(600):  # 3 days, sessions of 2..6 clicks over 60 items with a pattern to learn
        day = s % 3
        start = int(rng.integers(1, 50))
        for j in range(int(rng.integers(2, 7))):
            rows.append((s, 100 + (start + j * 3) % 60, 1_600_000_000 + day * 86400 + s * 10 + j))
    log = tmp_path / "clicks.csv"
    log.write_text("sess,item,ts\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"params": {"epochs": 1, "batch_size": 32, "model": {"memory_k": 8}}}))
    out = tmp_path / "q.json"
    proc = _bench_quality(
        [
            "--out", str(out), "--input", str(log), "--work", str(tmp_path / "work"),
            "--prepare-args", "--session-col sess --item-col item --time-col ts --time-unit s",
            "--seeds", "0", "--config", str(cfg), "--end-window", "3", "--threads", "1",
        ],
        repo_root,
    )  # fmt: skip
    assert proc.returncode == 0
    q = json.loads(out.read_text())
    assert q["recipe"] == "real+config" and q["settings"]["model"]["memory"] is True
    assert [w["eval_window"] for w in q["windows"]] == [2, 3]
    for k in ("model", "popular", "cooc_knn", "successor_knn", "count_blend"):
        want = np.mean([w[k]["ndcg@20"] for w in q["windows"]])
        assert q["mean"][k]["ndcg@20"] == pytest.approx(want)
    best = max(q["mean"][b]["recall@20"] for b in ("popular", "cooc_knn", "successor_knn"))
    assert q["ratio_to_best_baseline"]["recall@20"] == pytest.approx(q["mean"]["model"]["recall@20"] / best)
    assert "| **mean** |" in q["markdown"] and "count blend" in q["markdown"]
    # the paired bootstrap over the saved per-session ranks: the same point estimate as the protocol
    for b, ratio in (("count_blend", q["ratio_to_count_blend"]["ndcg@20"]), ("vsknn", None)):
        res = q["paired"][b]["metrics"]["ndcg@20"]["window_mean"]
        assert res["model"] == pytest.approx(q["mean"]["model"]["ndcg@20"])
        assert res[b] == pytest.approx(q["mean"][b]["ndcg@20"])
        if ratio is not None:
            assert res["ratio"] == pytest.approx(ratio)
    assert q["paired"]["count_blend"]["windows"] == [w["eval_window"] for w in q["windows"]]
    assert "Paired bootstrap, model against count_blend" in q["markdown"]
    # where the lead sits: the groups of each split cover every session, and pooled back together
    # they give the pooled figures of the paired bootstrap
    pooled = q["paired"]["count_blend"]["metrics"]["ndcg@20"]["pooled"]
    for kind in ("by_repeat", "by_frequency"):
        groups = [g for g in q[kind]["ndcg@20"].values() if isinstance(g, dict)]
        assert sum(g["share"] for g in groups) == pytest.approx(1.0)
        for k in ("model", "count_blend"):
            assert sum(g["share"] * g[k] for g in groups) == pytest.approx(pooled[k])
    assert "| target seen in training |" in q["markdown"] and "| new |" in q["markdown"]
    # the learning curve: one point per evaluated window, training sessions counted up to it, the
    # protocol's per-window figures; where the leads start; the PNG beside the JSON
    curve = q["learning_curve"]
    assert [p["eval_window"] for p in curve] == [w["eval_window"] for w in q["windows"]]
    seen = np.cumsum([r["train_sessions"] for r in json.loads((tmp_path / "work" / "run-seed0" / "metrics.json").read_text())["windows"]])
    assert [p["trained_sessions"] for p in curve] == [int(seen[w - 2]) for w in (2, 3)]
    for p, w in zip(curve, q["windows"]):
        assert p["model ndcg@20"] == pytest.approx(w["model"]["ndcg@20"])
        assert p["count_blend recall@20"] == pytest.approx(w["count_blend"]["recall@20"])
    for k in ("count_blend", "vsknn"):
        for m in ("ndcg@20", "recall@20"):
            leads = [p[f"model {m}"] > p[f"{k} {m}"] for p in curve]
            want = None if not leads[-1] else curve[0 if all(leads) else 1]["trained_sessions"]
            assert q["leads_from"][k][m] == want, (k, m)
    assert "| eval window | training sessions so far |" in q["markdown"]
    assert out.with_suffix(".png").stat().st_size > 0
    # the pattern (item + 3 follows item) is in the counts: kNN and the blend find it
    assert q["mean"]["successor_knn"]["recall@20"] > 0.5 and q["mean"]["count_blend"]["recall@20"] > 0.5


def test_bench_quality_missing_input_is_a_clear_error(tmp_path, repo_root):
    proc = _bench_quality(
        ["--out", str(tmp_path / "q.json"), "--input", str(tmp_path / "nope.tsv")], repo_root
    )
    assert proc.returncode == 2 and "nope.tsv does not exist" in proc.stderr
    assert not (tmp_path / "q.json").exists()


def test_head_selection_chooses_on_held_back_sessions(tiny_synthetic_data, tmp_path):
    out = tmp_path / "run"
    result = train(
        tiny_cfg(
            tiny_synthetic_data,
            out,
            epochs=2,
            holdout=0.2,
            patience=1,
            head_selection=True,
            model={"objective": "clm", "memory": True, "memory_k": 8},
        )
    )
    rows = [r for r in result["windows"] if r.get("holdout_ndcg20_per_epoch")]
    assert rows
    for r in rows:
        assert r["head_scale"] in (0.0, 1.0)
        assert len(r["holdout_ndcg20_without_head_per_epoch"]) == len(r["holdout_ndcg20_per_epoch"])
        # the recorded score of an epoch is the better of the two variants
        assert all(
            s >= w for s, w in zip(r["holdout_ndcg20_per_epoch"], r["holdout_ndcg20_without_head_per_epoch"])
        )
    model, _ = train_mod.load_run(out)
    assert float(model.item_memory.head_scale) == rows[-1]["head_scale"]
    with pytest.raises(ValueError, match="head_selection needs early stopping"):
        tiny_cfg(tiny_synthetic_data, out, head_selection=True)
