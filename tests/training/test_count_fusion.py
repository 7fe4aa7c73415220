"""bench.count_fusion (issue 17): the blend it adds terms to is the Trainer's count blend, window by
window, and a term's weight moves the ranks only through the term."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.count_fusion import main, parse_term, run

FLAGS = ["--recipe", "real", "--end-window", "3"]


def _count_blend_of_a_run(data, out, repo_root, *extra: str) -> dict[int, dict[str, float]]:
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--data", str(data), "--out", str(out), *FLAGS, *extra,
         "--epochs", "1", "--no-progress", "--threads", "1", "--eval-split", "valid"],
        capture_output=True, text=True, cwd=repo_root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        w["eval_window"]: w["baselines"]["count_blend"]
        for w in json.loads((out / "metrics.json").read_text())["windows"]
        if "baselines" in w
    }


def test_the_blend_at_weight_zero_is_the_count_blend_a_training_run_reports(
    tiny_synthetic_data, tmp_path, repo_root
):
    trained = _count_blend_of_a_run(tiny_synthetic_data, tmp_path / "run", repo_root)
    # a run whose memory weighs window w by 0.5 ** (t - w): its blend is decay_0.5's
    decayed = _count_blend_of_a_run(
        tiny_synthetic_data, tmp_path / "decayed", repo_root, "--memory-window-decay", "0.5"
    )
    terms = ["vsknn", "recent_1", "recent_99", "decay_1", "decay_0.5"]
    res = run(tiny_synthetic_data, terms, (0.0, 0.5, 1.0), recipe_args=FLAGS)
    rows = {r["eval_window"]: r for r in res["windows"]}
    assert rows and set(rows) <= set(trained)
    for w, r in rows.items():
        for term in ("blend", "vsknn", "recent_1", "recent_99", "decay_1"):
            for m in ("ndcg@20", "recall@20"):
                key = term if term == "blend" else f"{term}@0"
                assert r[key][m] == pytest.approx(trained[w][m], abs=1e-12), (w, term, m)
        for m in ("ndcg@20", "recall@20"):
            assert r["decay_0.5@0"][m] == pytest.approx(decayed[w][m], abs=1e-12), (w, "decay_0.5", m)
        # the last 99 windows are every window: blend + a * blend ranks as the blend; decay_1 weighs
        # every window 1 (float counts); a decay term replaces the blend, once (no alpha)
        for a in ("0.5", "1"):
            assert r[f"recent_99@{a}"] == r["recent_99@0"]
            assert f"decay_1@{a}" not in r and f"decay_0.5@{a}" not in r
    # the terms do move the ranks (else the comparison above could not fail for them)
    assert any(r["vsknn@1"] != r["vsknn@0"] for r in rows.values())
    assert any(r["recent_1@1"] != r["recent_1@0"] for r in rows.values())
    assert any(r["decay_0.5@0"] != r["decay_1@0"] for r in rows.values())
    assert decayed != trained  # the option reaches the run's tables
    # ratios are to the blend, also when a decay term comes first
    first_decay = run(tiny_synthetic_data, ["decay_0.5"], (0.0,), recipe_args=FLAGS)
    assert first_decay["mean"]["blend"] == res["mean"]["blend"]
    assert first_decay["ratio_to_blend"]["blend"] == {"ndcg@20": 1.0, "recall@20": 1.0}


def test_a_bad_term_names_itself(tiny_synthetic_data, tmp_path, capsys):
    with pytest.raises(ValueError, match="'recent_0'.*R >= 1"):
        parse_term("recent_0")
    for bad in ("decay_0", "decay_1.5", "decay_x"):
        with pytest.raises(ValueError, match=f"'{bad}'.*0 < G <= 1"):
            parse_term(bad)
    assert (
        main(["--data", str(tiny_synthetic_data), "--out", str(tmp_path / "f.json"), "--terms", "knn"]) == 2
    )
    assert "'knn'" in capsys.readouterr().err
    assert (
        main(["--data", str(tiny_synthetic_data), "--out", str(tmp_path / "f.json"), "--alphas", "0", "-1"])
        == 2
    )
    assert "alphas [0.0, -1.0]: expected weights >= 0" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()
