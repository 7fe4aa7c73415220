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


def test_a_setting_added_since_at_its_default_and_a_moved_run_are_not_changes(tiny_synthetic_data, tmp_path):
    """A run from before an option existed did what the option's default does (new options default off),
    and a run folder moved elsewhere computed the same: both are reused. The option at another value,
    or a setting the run recorded differently, still is a change."""
    from bench.ablation import changed_settings
    from bench.common import PROJECT_ROOT

    out = tmp_path / "abl.json"
    assert _ablation(tiny_synthetic_data, out, PROJECT_ROOT).returncode == 0
    run = tmp_path / "abl" / "recipe" / "s0"
    moved = tmp_path / "elsewhere" / "s0"
    moved.parent.mkdir()
    run.rename(moved)
    flags = ARGS[-1].split()
    assert changed_settings(tiny_synthetic_data, moved, flags, 0) == []
    metrics = moved / "metrics.json"
    result = json.loads(metrics.read_text())
    del result["train_config"]["members"]  # as before it existed
    del result["train_config"]["model"]["cooc_curve"]
    metrics.write_text(json.dumps(result))
    assert changed_settings(tiny_synthetic_data, moved, flags, 0) == []  # both at their defaults now
    other = [*flags, "--members", "3", "--cooc-curve", "3"]  # not at their defaults
    assert changed_settings(tiny_synthetic_data, moved, other, 0) == ["members", "model.cooc_curve"]
    result["train_config"]["seed"] = 5
    metrics.write_text(json.dumps(result))
    assert changed_settings(tiny_synthetic_data, moved, flags, 0) == ["seed"]


def test_the_forward_sessions_effect_is_pooled_over_the_checks_sessions_and_paired_by_seed():
    from bench.ablation import forward_scores, markdown, paired_effect

    def result(scores):  # one forward check per window: (sessions, ndcg@20, recall@20); None = no check
        return {"windows": [
            {"eval_window": w, **({"guard_check": {"sessions": n, "model": {"ndcg@20": nd, "recall@20": rc}}} if n else {})}
            for w, (n, nd, rc) in enumerate(scores, start=2)
        ]}  # fmt: skip

    ref = result([(100, 0.1, 0.2), (0, 0, 0), (300, 0.2, 0.4)])
    got = forward_scores(ref)
    assert got == {"sessions": 400, "ndcg@20": (100 * 0.1 + 300 * 0.2) / 400, "recall@20": (100 * 0.2 + 300 * 0.4) / 400}
    assert forward_scores(result([(0, 0, 0)])) is None  # no check ran: nothing to pool
    row = {0: {"forward": forward_scores(result([(100, 0.11, 0.2), (300, 0.22, 0.4)]))}, 1: {"forward": got}}
    refs = {0: {"forward": got}, 1: {"forward": got}}
    eff = paired_effect(row, refs, [0, 1], ("ndcg@20", "recall@20"), key="forward")
    assert abs(eff["ndcg@20"][0] - 0.05) < 1e-9 and abs(eff["ndcg@20"][1] - 0.05) < 1e-9  # +10 % and 0
    assert eff["recall@20"] == (0.0, 0.0)
    model = {"ndcg@20": (0.1, 0.0), "recall@20": (0.2, 0.0), "mrr@20": (0.05, 0.0)}
    table = markdown({"rows": {"x": {"what": "w", "mean": {"model": model, "count_blend": model}, "forward_effect": eff}}})
    assert table.splitlines()[-1].endswith("| +5.0% ± 5.0 / +0.0% ± 0.0 |")


def test_where_the_model_starts_to_lead_reads_the_last_windows_back():
    from bench.ablation import curve_markdown, leads_from

    def curve(model, blend):  # one point per window, 1,000 more training sessions each; V-SKNN always 0.01
        return [
            {"eval_window": w, "trained_sessions": 1000 * w, "model ndcg@20": m, "count_blend ndcg@20": b,
             "vsknn ndcg@20": 0.01, "model recall@20": m, "count_blend recall@20": b, "vsknn recall@20": 0.01}
            for w, (m, b) in enumerate(zip(model, blend), start=2)
        ]  # fmt: skip

    # trails, leads, trails, then leads to the end: from the fourth point (5,000 sessions) on
    c = curve([0.1, 0.3, 0.1, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2])
    assert leads_from(c, "count_blend", "ndcg@20") == 5000
    assert leads_from(c, "vsknn", "recall@20") == 2000  # ahead everywhere: from the first point
    assert leads_from(curve([0.3, 0.3, 0.1], [0.2, 0.2, 0.2]), "count_blend", "ndcg@20") is None  # behind at the end
    assert leads_from(curve([0.3, 0.2], [0.2, 0.2]), "count_blend", "ndcg@20") is None  # level is not a lead
    table = curve_markdown(c)
    assert "| 5 | 5,000 | 0.3000 / 0.3000 | 0.2000 / 0.2000 | 0.0100 / 0.0100 | 1.500x / 1.500x | 30.000x / 30.000x |" in table
    assert "leads count_blend in every later window: ndcg@20 from 5,000 training sessions on" in table
