"""bench.scorer_fits: scorer fits compared on a run's saved pool, as the forward check compares them (fit on
the pool's windows <= t, score window t+1's sessions), run as the user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training.scorer_fit as sf
from tests.training.test_scorer_fit import Z_COL, planted
from training.model.scorer import CandidateScorer


def _pool(run: Path, sizes=(300, 300, 300)) -> dict:
    """A run folder whose pool holds windows 2, 3, 4 of planted sessions (feature 3 marks the target)."""
    pool = {}
    for i, n in enumerate(sizes):
        x, ok, y = planted(n, seed=i)
        pool[2 + i] = (x.half(), ok, y)
        sf.save_pool_window(run, 2 + i, pool)
    return pool


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bench.scorer_fits", *args], capture_output=True, text=True, cwd=cwd)
    print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
    return proc


def test_each_variant_is_fitted_on_earlier_windows_and_scored_on_the_next(tmp_path, repo_root):
    run = tmp_path / "run"
    pool = _pool(run)
    out = tmp_path / "fits.json"
    proc = _cli([str(run), "--variants", "m1", "m2", "avg1", "--seeds", "0", "1", "--hidden", "8", "--out", str(out)], repo_root)
    assert proc.returncode == 0
    got = json.loads(out.read_text())["runs"][0]
    # windows 2 and 3 are fitted (300 and 600 sessions >= MIN_SESSIONS); 4 has no next window
    assert got["checked_windows"] == [3, 4] and got["sessions"] == 600
    # by hand: m1's fit for window t, seed s is fit_mlp(seed (1000 t + s) * 10) on the windows <= t
    mine, plain = [], []
    for t in (2, 3):
        x = torch.cat([pool[w][0] for w in range(2, t + 1)])
        ok = torch.cat([pool[w][1] for w in range(2, t + 1)])
        y = torch.cat([pool[w][2] for w in range(2, t + 1)])
        xt, okt, yt = pool[t + 1]
        for s in (0, 1):
            fit = sf.fit_mlp(x, ok, y, 8, (1000 * t + s) * 10)
            mine.append(sf.ndcg_at(CandidateScorer.mlp((xt.float() - fit["mu"]) / fit["sd"], fit["weights"]), okt, yt))
            plain.append(sf.ndcg_at(xt.float()[:, :, Z_COL], okt, yt))
    assert got["plain ndcg@20"] == pytest.approx(float(torch.cat(plain).mean()))
    assert got["ndcg@20"]["m1"] == pytest.approx(float(torch.cat(mine).mean()))
    # the planted feature is learnt: every variant above the combiner's noise
    assert all(r > 1.1 for r in got["ratio_to_plain"].values()), got["ratio_to_plain"]
    assert "| m2 |" in proc.stdout


def test_weight_averaging_and_the_cosine_schedule_change_the_fit_and_the_default_does_not():
    x, ok, y = planted(600)
    base = sf.fit_mlp(x, ok, y, 8, 1, steps=40)
    again = sf.fit_mlp(x, ok, y, 8, 1, steps=40, average_tail=0.0, cosine=False)
    assert all(torch.equal(base["weights"][k], again["weights"][k]) for k in base["weights"])
    for kw in ({"average_tail": 0.5}, {"cosine": True}):
        other = sf.fit_mlp(x, ok, y, 8, 1, steps=40, **kw)
        assert not torch.equal(other["weights"]["w1"], base["weights"]["w1"]), kw
    # averaging over the last step only is the last step's weights
    last = sf.fit_mlp(x, ok, y, 8, 1, steps=40, average_tail=1 / 40)
    assert all(torch.allclose(last["weights"][k], base["weights"][k]) for k in base["weights"])


def test_bad_variants_and_runs_without_a_pool_are_clear_errors(tmp_path, repo_root):
    run = tmp_path / "run"
    _pool(run)
    proc = _cli([str(run), "--variants", "m0", "--out", str(tmp_path / "x.json")], repo_root)
    assert proc.returncode == 2 and "'m0' is not a variant" in proc.stderr
    proc = _cli([str(tmp_path / "none"), "--out", str(tmp_path / "x.json")], repo_root)
    assert proc.returncode == 2 and "no scorer pool" in proc.stderr
    assert not (tmp_path / "x.json").exists()
