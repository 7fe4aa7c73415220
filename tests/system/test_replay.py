"""Issue 12, the served side: window snapshots, the vocabulary truncated to a window, whole-ensemble
versions and the replay through one live server (clients.replay)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.triton_util import PROJECT_ROOT
from training.names import (
    ENSEMBLE_NAME,
    FIRST_REAL_ID,
    ITEM_COL,
    ITEM_LIST,
    OOV_ID,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    TORCH_MODEL,
)
from training.schema import Schema

WINDOWS = (1, 2, 3)  # trained windows of the replay run


def _run(args: list[str]) -> None:
    subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, check=True, capture_output=True)


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory):
    """(DATA, RUN): 3,000 synthetic rows, windows 1..3 trained 1 epoch with the item memory and --keep-windows."""
    root = tmp_path_factory.mktemp("replay")
    data, run = root / "data", root / "run"
    _run(["-m", "training.prepare", "--synthetic", "--seed", "0", "--num-rows", "3000", "--out", str(data), "--quiet"])
    _run(["-m", "training.train", "--data", str(data), "--out", str(run), "--epochs", "1",
          "--end-window", str(WINDOWS[-1] + 1), "--memory", "--no-progress", "--keep-windows"])  # fmt: skip
    return data, run


def test_keep_windows_writes_loadable_snapshots(replay_run):
    from training.checkpoint import load_run

    data, run = replay_run
    schema = Schema.load(data)
    for t in WINDOWS:
        model, meta = load_run(run / "windows" / str(t))
        assert meta["window"] == t
        assert model.cfg.categorical[ITEM_LIST] == max(schema.known_size(ITEM_LIST, t), FIRST_REAL_ID + 1)
    last = load_run(run)[0].state_dict()
    snap = load_run(run / "windows" / str(WINDOWS[-1]))[0].state_dict()
    assert all(np.array_equal(last[k].numpy(), snap[k].numpy()) for k in last)


# --- the compiled workflow truncated to a window (no server) -------------------------------------
def test_known_prefix_truncates_categorify_and_vocabulary(tiny_synthetic_data):
    import pandas as pd

    from training.data.serving_transform import ServingTransform, known_prefix

    schema = Schema.load(tiny_synthetic_data)
    full = ServingTransform.load(tiny_synthetic_data).compiled
    t = 1
    known = schema.known_sizes(t)
    n = known[ITEM_LIST]
    assert FIRST_REAL_ID < n < schema.categorical[ITEM_LIST], "the fixture's vocabulary should grow after window 1"
    cut = known_prefix(full, known, t)
    vocab, full_vocab = cut.item_vocabulary(), full.item_vocabulary()
    assert len(vocab) == n and np.array_equal(vocab, full_vocab[:n])
    assert cut.spec["categorical"][ITEM_LIST] == n and cut.spec["window"] == t
    # every raw item: known ones keep their id, the others become OOV
    rows = pd.read_parquet(tiny_synthetic_data / "interactions.parquet").drop_duplicates(ITEM_COL).head(400)
    cols = {c: rows[c].to_numpy() for c in schema.raw_inputs}
    cols["session_id"] = np.arange(len(rows), dtype=np.int64)  # one row per session
    a, b = full(cols)[ITEM_LIST][:, 0], cut(cols)[ITEM_LIST][:, 0]
    assert np.array_equal(b, np.where(a < n, a, OOV_ID))
    assert (a >= n).any() and (a < n).any()
    for feat, size in known.items():
        assert cut(cols)[feat].max() < size, feat
    # the same function through compile_workflow's window option
    again = ServingTransform.load(tiny_synthetic_data, window=t).compiled
    assert np.array_equal(again.item_vocabulary(), vocab)


@pytest.mark.diginetica
def test_known_prefix_truncates_first_seen(diginetica_data):
    """Real log: the item age comes from the workflow's first-seen table; items unknown after t are
    dropped from it (age 0, as for an item the workflow never saw), known ones keep their age."""
    import pandas as pd

    from training.data.serving_transform import ServingTransform

    schema = Schema.load(diginetica_data)
    t = 2
    n = schema.known_size(ITEM_LIST, t)
    full = ServingTransform.load(diginetica_data).compiled
    cut = ServingTransform.load(diginetica_data, window=t).compiled
    fs = [s for s in cut.spec["steps"] if s["kernel"] == "first_seen"]
    assert fs, "the DIGINETICA workflow derives the item age"
    names = fs[0]["params"]["tables"][ITEM_COL]
    assert len(cut.arrays[names["ids"]]) < len(full.arrays[names["ids"]])
    rows = pd.read_parquet(diginetica_data / "interactions.parquet").drop_duplicates(ITEM_COL).head(2000)
    cols = {c: rows[c].to_numpy() for c in schema.raw_inputs}
    cols["session_id"] = np.arange(len(rows), dtype=np.int64)
    a, b = full(cols), cut(cols)
    age = [f for f in schema.continuous if f.startswith("age")][0]
    unknown = a[ITEM_LIST][:, 0] >= n
    assert unknown.any() and (~unknown).any()
    assert np.all(b[ITEM_LIST][unknown, 0] == OOV_ID) and np.all(b[age][unknown, 0] == 0.0)
    assert np.array_equal(b[age][~unknown, 0], a[age][~unknown, 0])


# --- version folders -----------------------------------------------------------------------------
def test_window_versions_hold_the_window_state(replay_run, tmp_path):
    """export at --window 1, then --window 2 --new-version: version 2 of every model, its vocabulary and
    table sizes those known after window 2, every config.pbtxt unchanged (the ensemble pins 1)."""
    from export.repository import MANIFEST, ExportConfig, add_ensemble_version, export_repository
    from training.integrity import verify_folder

    data, run = replay_run
    schema = Schema.load(data)
    out = export_repository(ExportConfig(run=run, data=data, out=tmp_path / "repo", window=1))
    configs = {p: p.read_bytes() for p in out.rglob("config.pbtxt")}
    assert add_ensemble_version(ExportConfig(run=run, data=data, out=out, window=2)) == 2
    assert {p: p.read_bytes() for p in out.rglob("config.pbtxt")} == configs
    for v, t in ((1, 1), (2, 2)):
        n = schema.known_size(ITEM_LIST, t)
        for m in (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL):
            verify_folder(out / m / str(v))
        assert len(np.load(out / POSTPROCESS_MODEL / str(v) / "item_vocabulary.npy")) == n
        spec = json.loads((out / PREPROCESS_MODEL / str(v) / "workflow.json").read_text())
        assert spec["categorical"][ITEM_LIST] == n and spec["window"] == t
        params = json.loads((out / TORCH_MODEL / str(v) / "sessrec_model.json").read_text())
        assert params["cardinalities"][ITEM_LIST] == n and params["window"] == t
        record = json.loads((out / ENSEMBLE_NAME / str(v) / "sessrec_run.json").read_text())
        assert record["version"] == v and record["window"] == t and record["items_known"] == n
        assert record["run"]["window"] == t
    manifest = json.loads((out / MANIFEST).read_text())
    assert {k: v["window"] for k, v in manifest["versions"].items()} == {"1": 1, "2": 2}


def test_missing_window_snapshot_is_refused(artifacts, tmp_path):
    from export.repository import ExportConfig, export_repository

    data, run = artifacts  # trained without --keep-windows, last window 1
    with pytest.raises(FileNotFoundError, match="--keep-windows"):
        export_repository(ExportConfig(run=run, data=data, out=tmp_path / "repo", window=5))


def test_served_ranks_tie_rule():
    from clients.replay import served_ranks

    ids = np.array([[10, 11, 12], [10, 11, 12], [10, 11, 12]])
    scores = np.array([[3.0, 2.0, 2.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    # tie with the item above it counts against the target; a target not served is a miss
    assert served_ranks(ids, scores, np.array([11, 12, 99])).tolist() == [3.0, 3.0, np.inf]


# --- the replay through one live server ------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.slow
def test_replay_served_equals_offline(replay_run, tmp_path):
    """One server, version 1 for window 1 and a swap per later window, a background client all along:
    served metrics = offline ones per window, 0 failed requests, items_known grows and never exceeds the
    items seen so far, REPLAY.json as specified. A stateful background client (version switch
    mid-session, issue 18): no failed click, and every answer equals the stateless answer of the same
    prefix from the same version."""
    from clients.replay import METRICS, ReplayConfig, check, replay

    data, run = replay_run
    out = tmp_path / "REPLAY.json"
    result = replay(ReplayConfig(data=data, run=run, repo=tmp_path / "repo", out=out), log=print)
    assert json.loads(out.read_text()) == result
    assert check(result, 1e-6) == []
    assert result["swaps"] == len(WINDOWS) - 1 and result["background_requests"] > 0
    assert result["background_failed_requests"] == 0
    stateful = result["stateful_background"]  # issue 18: clicks through the stateful ensemble across the swaps
    assert stateful["failed"] == 0 and stateful["wrong"] == 0 and stateful["compared"] > 0, stateful
    print(f"stateful background: {stateful}")
    assert [w["train_window"] for w in result["windows"]] == list(WINDOWS)
    assert [w["version"] for w in result["windows"]] == list(range(1, len(WINDOWS) + 1))
    known = [w["items_known"] for w in result["windows"]]
    assert known == sorted(known) and known[-1] > known[0]
    for w in result["windows"]:
        assert w["items_known"] <= w["items_seen"]
        assert w["failed_requests"] == 0 and w["sessions"] > 0
        for m in METRICS:
            assert abs(w[m] - w["offline"][m]) <= 1e-6, (w["train_window"], m)
