"""bench.ablation's bookkeeping (run as the user runs it: `python -m bench.ablation`).

What must hold: a finished run is marked DONE with its flags and reused by the next ablation; a run
an interrupted ablation left without DONE (its checkpoint written, the marker not) is resumed after
its last finished window and ends with the same metrics, instead of being refused by
`training.train` ("already holds a checkpoint") and failing the whole ablation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ARGS = ["--rows", "recipe", "--seeds", "0", "--par", "1", "--extra", "--epochs 1 --end-window 3 --threads 1"]


def _ablation(data: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.ablation", "--data", str(data), "--out", str(out), *ARGS],
        capture_output=True, text=True, cwd=cwd,
    )  # fmt: skip


def test_finished_runs_are_reused_and_unmarked_ones_resumed(tiny_synthetic_data, tmp_path, repo_root):
    out = tmp_path / "abl.json"
    proc = _ablation(tiny_synthetic_data, out, repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "abl" / "recipe" / "s0"
    assert (run / "DONE").is_file()
    first = json.loads((run / "metrics.json").read_text())
    assert first["ablation_flags"] == ARGS[-1].split() and first["windows"]
    summary = json.loads(out.read_text())["rows"]["recipe"]["mean"]["model"]

    # reused: nothing is started again
    proc = _ablation(tiny_synthetic_data, out, repo_root)
    assert proc.returncode == 0 and "[ablation] recipe seed 0" not in proc.stderr, proc.stderr[-3000:]

    # an interrupted ablation: the run's checkpoint is there, its DONE marker is not
    (run / "DONE").unlink()
    proc = _ablation(tiny_synthetic_data, out, repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ablation] recipe seed 0" in proc.stderr and (run / "DONE").is_file()
    again = json.loads((run / "metrics.json").read_text())
    assert [w["ndcg@20"] for w in again["windows"]] == [w["ndcg@20"] for w in first["windows"]]
    assert json.loads(out.read_text())["rows"]["recipe"]["mean"]["model"] == summary


def test_a_finished_run_with_other_settings_than_the_code_gives_is_refused(tiny_synthetic_data, tmp_path, repo_root):
    """Its flags alone no longer say what it is once a recipe default changed: reused, it would put
    another recipe's scores in the table. The ablation stops, names the run and the settings, deletes
    nothing."""
    out = tmp_path / "abl.json"
    assert _ablation(tiny_synthetic_data, out, repo_root).returncode == 0
    metrics = tmp_path / "abl" / "recipe" / "s0" / "metrics.json"
    result = json.loads(metrics.read_text())
    result["train_config"]["lr"] = 0.123  # as if the recipe's lr had changed since it ran
    result["train_config"]["model"]["dropout"] = 0.9
    metrics.write_text(json.dumps(result))
    proc = _ablation(tiny_synthetic_data, out, repo_root)
    assert proc.returncode != 0 and "[ablation] recipe seed 0" not in proc.stderr
    assert str(metrics.parent) in proc.stderr and "(lr, model.dropout)" in proc.stderr, proc.stderr[-2000:]
    assert metrics.is_file() and (metrics.parent / "DONE").is_file()  # nothing deleted
