"""Per-session ranks (--save-ranks) and the paired bootstrap over them (bench/paired.py).

What must hold:
* a run trained with save_ranks writes OUT/ranks/window_T.npz for every evaluated window, and the
  per-session metrics averaged give exactly the metrics row's values, for the model, every baseline
  and the count blend;
* the bootstrap's point estimates are the protocol's (mean over windows, then seeds), a model that
  is better session by session is found better with a tight interval, one equal to its baseline
  gets ratio 1 with an interval around it, and runs that scored other sessions are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.train_util import tiny_cfg
from training.data.splits import load_schema, load_split, split_path
from training.metrics import metrics_from_ranks
from training.train import train

METRICS = ("ndcg@20", "recall@20", "mrr@20")


@pytest.fixture(scope="module")
def ranked_runs(tiny_synthetic_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("ranked")
    runs = []
    for seed in (0, 1):
        out = base / f"s{seed}"
        train(tiny_cfg(tiny_synthetic_data, out, seed=seed, save_ranks=True, model={"memory": True}))
        runs.append(out)
    return runs


def test_saved_ranks_reproduce_the_metrics_rows(ranked_runs):
    result = json.loads((ranked_runs[0] / "metrics.json").read_text())
    rows = [r for r in result["windows"] if r.get("eval_sessions")]
    assert rows
    for r in rows:
        with np.load(ranked_runs[0] / "ranks" / f"window_{r['eval_window']}.npz") as z:
            ranks = {k: z[k] for k in z.files}
        assert len(ranks["session_id"]) == r["eval_sessions"]
        assert {"model", "count_blend", "vsknn", "popular"} <= set(ranks)
        for m in METRICS:
            assert metrics_from_ranks(ranks["model"])[m] == r[m]
            for b, metrics in r["baselines"].items():
                assert metrics_from_ranks(ranks[b])[m] == metrics[m], (b, m)


def test_saved_model_ranks_are_the_sessions_own(ranked_runs, tiny_synthetic_data):
    """Session by session, not only on average: the last window's saved model and count-blend
    ranks equal the final model's (and its count tables') ranks of the eval split's sessions, in
    their order, each session scored alone through the metrics path."""
    import torch

    from training.checkpoint import load_run
    from training.evaluate import count_blend_metrics, evaluate_sessions, known_inputs

    result = json.loads((ranked_runs[0] / "metrics.json").read_text())
    last = result["windows"][-1]
    model, meta = load_run(ranked_runs[0])
    st = load_split(
        split_path(tiny_synthetic_data, last["eval_window"], "valid"), load_schema(tiny_synthetic_data)
    )
    known = {
        k: v[str(last["train_window"])]
        for k, v in load_schema(tiny_synthetic_data)["vocabulary_by_window"].items()
    }
    with np.load(ranked_runs[0] / "ranks" / f"window_{last['eval_window']}.npz") as z:
        saved, blend, ids = z["model"], z["count_blend"], z["session_id"]
    assert np.array_equal(ids, st.session_id.numpy())
    assert len(np.unique(np.minimum(saved, 41))) > 1 and len(np.unique(np.minimum(blend, 41))) > 1
    item, cpu, tables = model.cfg.item_feature, torch.device("cpu"), model.item_memory.tables()

    def rank(metrics: dict) -> float:  # exact up to 40
        return min(1.0 / metrics["mrr@40"] if metrics["mrr@40"] > 0 else np.inf, 41)

    for i in range(min(len(st), 150)):  # each session alone
        one = st.select(torch.tensor([i]))
        assert min(saved[i], 41) == pytest.approx(
            rank(evaluate_sessions(model, one, known, None, cpu, 64))
        ), i
        seen, miss = known_inputs(one, known, item)
        assert min(blend[i], 41) == pytest.approx(
            rank(count_blend_metrics(tables, model.cfg, seen, cpu, 64, known[item], miss))
        ), i


def _paired(runs, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`python -m bench.paired RUNS ARGS --out X` from the project root (tests never import a benchmark)."""
    out = Path(runs[0]).parent / "paired.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.paired", *map(str, runs), *args, "--out", str(out)],
        capture_output=True, text=True, cwd=cwd,
    )  # fmt: skip
    return proc, json.loads(out.read_text()) if out.is_file() else None


def test_bootstrap_point_estimate_is_the_protocol(ranked_runs, repo_root):
    proc, out = _paired(ranked_runs, "--resamples", "200", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert "| ndcg@20 | window_mean |" in proc.stdout
    rows = [
        [
            r
            for r in json.loads((run / "metrics.json").read_text())["windows"]
            if r["eval_window"] in out["windows"]
        ]
        for run in ranked_runs
    ]
    for m in METRICS:
        model = np.mean([np.mean([r[m] for r in rs]) for rs in rows])
        blend = np.mean([np.mean([r["baselines"]["count_blend"][m] for r in rs]) for rs in rows])
        res = out["metrics"][m]["window_mean"]
        assert res["model"] == pytest.approx(model, abs=1e-12)
        assert res["count_blend"] == pytest.approx(blend, abs=1e-12)
        lo, hi = res["diff_ci95"]
        assert lo <= res["diff"] <= hi


def _fake_run(path, model_ranks, base_ranks, ids):
    (path / "ranks").mkdir(parents=True)
    for w, (m, b) in enumerate(zip(model_ranks, base_ranks), start=2):
        np.savez(path / "ranks" / f"window_{w}.npz", session_id=ids[w - 2], model=m, count_blend=b)
    return path


def test_better_model_is_found_better_and_equal_one_level(tmp_path, repo_root):
    gen = np.random.default_rng(0)
    base = [gen.integers(1, 60, 300).astype(float) for _ in range(3)]
    better = [np.maximum(1.0, b - 3) for b in base]  # every session ranks its target higher or equal
    ids = [np.arange(300) + 1000 * w for w in range(3)]
    run = _fake_run(tmp_path / "better", better, base, ids)
    res = _paired([run], cwd=repo_root)[1]["metrics"]["ndcg@20"]["window_mean"]
    assert res["ratio"] > 1.05 and res["ratio_ci95"][0] > 1.0 and res["p_below"] == 0.0
    same = _fake_run(tmp_path / "same", base, base, ids)
    res = _paired([same], cwd=repo_root)[1]["metrics"]["recall@20"]["pooled"]
    assert res["ratio"] == pytest.approx(1.0) and res["ratio_ci95"] == pytest.approx([1.0, 1.0])
    noisy = [b + gen.choice([-2.0, 2.0], 300) for b in base]  # as often better as worse
    run = _fake_run(tmp_path / "noisy", [np.maximum(1.0, n) for n in noisy], base, ids)
    res = _paired([run], cwd=repo_root)[1]["metrics"]["ndcg@20"]["window_mean"]
    assert res["ratio_ci95"][0] < 1.0 < res["ratio_ci95"][1] or abs(res["ratio"] - 1) < 0.02


def test_runs_of_other_sessions_are_refused(tmp_path, repo_root):
    gen = np.random.default_rng(1)
    r = [gen.integers(1, 60, 50).astype(float)]
    a = _fake_run(tmp_path / "a", r, r, [np.arange(50)])
    b = _fake_run(tmp_path / "b", r, r, [np.arange(50) + 1])
    for runs, args, said in (
        ([a, b], [], "scores other sessions"),
        ([a], ["--against", "vsknn"], "no ranks of 'vsknn'"),
        ([tmp_path], [], "--save-ranks"),
        ([a], ["--windows", "2", "5"], "windows [5] asked for are not in every run's ranks"),
    ):
        proc, out = _paired(runs, *args, cwd=repo_root)
        assert proc.returncode == 2 and said in proc.stderr and out is None


def test_by_repeat_splits_the_sessions_by_their_target(ranked_runs, tiny_synthetic_data, repo_root):
    """--by-repeat: pooled metrics of the sessions whose target repeats an item of the session and
    of the others, each equal to a direct count over the eval split and the saved ranks."""
    proc, out = _paired(
        ranked_runs, "--metrics", "recall@20", "--by-repeat", str(tiny_synthetic_data), cwd=repo_root
    )
    assert proc.returncode == 0, proc.stderr
    rep = out["by_repeat"]["recall@20"]
    schema = load_schema(tiny_synthetic_data)
    hits = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}  # model hits, blend hits, sessions
    for run in ranked_runs:
        for w in rep["windows"]:
            st = load_split(split_path(tiny_synthetic_data, w, "valid"), schema)
            items, lengths = st.feats[schema["item_list"]].numpy(), st.lengths.numpy()
            with np.load(run / "ranks" / f"window_{w}.npz") as z:
                model, blend = z["model"], z["count_blend"]
            for i, n in enumerate(lengths):
                g = bool(items[i, n - 1] in set(items[i, : n - 1].tolist()))
                hits[g][0] += model[i] <= 20
                hits[g][1] += blend[i] <= 20
                hits[g][2] += 1
    total = hits[True][2] + hits[False][2]
    for g, name in ((True, "repeat"), (False, "new")):
        assert rep[name]["share"] == pytest.approx(hits[g][2] / total)
        if hits[g][2]:
            assert rep[name]["model"] == pytest.approx(hits[g][0] / hits[g][2])
            assert rep[name]["count_blend"] == pytest.approx(hits[g][1] / hits[g][2])
    assert hits[False][2] > 0


def test_by_frequency_groups_the_sessions_by_their_targets_training_count(ranked_runs, tiny_synthetic_data, repo_root):
    """--by-frequency: pooled metrics per group of how often the target occurs in the training splits
    of the windows before its own, each equal to a direct count over the parquet files and the ranks."""
    proc, out = _paired(
        ranked_runs, "--metrics", "recall@20", "--by-frequency", str(tiny_synthetic_data), cwd=repo_root
    )
    assert proc.returncode == 0, proc.stderr
    got = out["by_frequency"]["recall@20"]
    assert "| target seen in training |" in out["markdown"]
    schema = load_schema(tiny_synthetic_data)
    item = schema["item_list"]
    groups = {"0": (0, 0), "1-4": (1, 4), "5-19": (5, 19), "20-99": (20, 99), "100+": (100, 10**9)}
    hits = {g: [0.0, 0.0, 0] for g in groups}  # model hits, blend hits, sessions
    for w in got["windows"]:
        seen: dict[int, int] = {}
        for earlier in range(w):
            path = split_path(tiny_synthetic_data, earlier, "train")
            if not path.exists():
                continue
            tr = load_split(path, schema)
            for row, n in zip(tr.feats[item].tolist(), tr.lengths.tolist()):
                for x in row[:n]:
                    seen[x] = seen.get(x, 0) + 1
        st = load_split(split_path(tiny_synthetic_data, w, "valid"), schema)
        targets = [row[n - 1] for row, n in zip(st.feats[item].tolist(), st.lengths.tolist())]
        for run in ranked_runs:
            with np.load(run / "ranks" / f"window_{w}.npz") as z:
                model, blend = z["model"], z["count_blend"]
            for i, x in enumerate(targets):
                g = next(g for g, (lo, hi) in groups.items() if lo <= seen.get(x, 0) <= hi)
                hits[g][0] += model[i] <= 20
                hits[g][1] += blend[i] <= 20
                hits[g][2] += 1
    total = sum(h[2] for h in hits.values())
    assert sum(h[2] > 0 for h in hits.values()) >= 2  # the split separates something
    for g, (m, b, n) in hits.items():
        assert got[g]["share"] == pytest.approx(n / total)
        if n:
            assert got[g]["model"] == pytest.approx(m / n)
            assert got[g]["count_blend"] == pytest.approx(b / n)


def test_reach_is_recall_at_each_cutoff_and_the_ranked_share(tmp_path, repo_root):
    inf = float("inf")
    model = [np.array([1.0, 5.0, inf, 30.0]), np.array([2.0, inf])]
    blend = [np.array([3.0, 25.0, 40.0, 1000.0]), np.array([inf, 19.0])]
    run = _fake_run(tmp_path / "r", model, blend, [np.arange(4), np.arange(2)])
    proc, out = _paired([run], "--reach", "20", "5", "50", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert out["reach"]["model"] == pytest.approx(
        {"recall@5": 3 / 6, "recall@20": 3 / 6, "recall@50": 4 / 6, "ranked": 4 / 6}
    )
    assert out["reach"]["count_blend"] == pytest.approx(
        {"recall@5": 1 / 6, "recall@20": 2 / 6, "recall@50": 4 / 6, "ranked": 5 / 6}
    )
    assert "| model | 0.5000 | 0.5000 | 0.6667 | 0.6667 |" in proc.stdout
    proc, out = _paired([run], "--reach", "0", cwd=repo_root)
    assert proc.returncode == 2 and "--reach [0]: expected cutoffs >= 1" in proc.stderr
