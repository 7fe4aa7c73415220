"""An exported repository served by tritonserver whose stub Python holds only numpy and torch.

A stock tritonserver image gives its Python-backend stubs python3 + numpy (and, for
a python-backend model step, whatever torch one installs); it has no NVTabular,
merlin, pandas, nor this project. Here the stubs run in a bare venv
(tests/bare_python.py: the standard library, numpy, torch and typing_extensions; its
bin/ first on PATH, which is how the stub finds its Python; no PYTHONPATH; cwd a temp
dir), proven bare first (importing pandas/nvtabular/merlin/training/export fails there). Then offline =
online on >= 500 sessions, for

- the synthetic serving artifacts (tests/conftest.py `artifacts`: category + raw
  continuous columns, item memory);
- a run prepared from the DIGINETICA click log (timestamp-derived weekday_sin and
  age_days, the `real` recipe: masked LM + item memory with the two-hop fill), skipped without the data.

Offline: the workflow-encoded sessions of DATA/sessions_by_day (what
Workflow.transform wrote) through the eager in-process model; online: the same
sessions' raw rows through the ensemble.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clients import rank_sessions
from export.inference import TopKRanker, feature_order
from export.repository import ExportConfig, export_repository
from export.tritonserver import PROJECT_ROOT, ServerConfig, TritonServer
from tests.bare_python import bare_python_env, check_bare
from tests.sessions_util import ranker_inputs
from training.checkpoint import load_run
from training.names import INTERACTIONS_FILE, ITEM_LIST, POSTPROCESS_MODEL, SESSION_COL, SESSIONS_DIR
from training.schema import Schema

pytestmark = pytest.mark.triton

K = 20
MIN_SESSIONS = 500
MAX_SESSIONS = 1000  # compared per repository (the real log has more; 1000 keeps the test short)


@pytest.fixture(scope="module")
def bare_home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bare")
    home = bare_python_env(root / "stub-env")
    cwd = root / "cwd"
    cwd.mkdir()
    results = check_bare(home, cwd)  # numpy/torch import; pandas, nvtabular, merlin, training, export do not
    assert results["numpy"] == results["torch"] == "ok"
    return home


def held_out_sessions(data: Path, limit: int) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
    """Valid then test sessions of every window (at most `limit`): ids and the ranker's padded inputs."""
    schema = Schema.load(data)
    paths = sorted((data / SESSIONS_DIR).glob("*/valid.parquet")) + sorted(
        (data / SESSIONS_DIR).glob("*/test.parquet")
    )
    frames = [f for f in (pd.read_parquet(p) for p in paths) if len(f)]
    held = pd.concat(frames, ignore_index=True).drop_duplicates(SESSION_COL).head(limit)
    return ranker_inputs(held, schema.features, schema.categorical, schema.max_len)


def assert_offline_equals_online_on_bare_stub(data: Path, run: Path, out: Path, home: Path) -> int:
    repo = export_repository(ExportConfig(run=run, data=data, out=out, top_k=K))
    schema = Schema.load(data)
    sids, inputs = held_out_sessions(data, MAX_SESSIONS)
    assert len(sids) >= MIN_SESSIONS, f"only {len(sids)} held-out sessions in {data}"
    model, _ = load_run(run)
    ranker = TopKRanker(model, feature_order(schema), K, schema.categorical[ITEM_LIST])
    with torch.inference_mode():
        want_scores, want_encoded = ranker(*inputs)  # the in-process model, eager
    vocab = np.load(repo / POSTPROCESS_MODEL / "1" / "item_vocabulary.npy", allow_pickle=False)
    want_ids = vocab[want_encoded.numpy()]

    interactions = pd.read_parquet(data / INTERACTIONS_FILE)
    rows = interactions[interactions[SESSION_COL].isin(set(sids.tolist()))]  # raw rows, file order
    cfg = ServerConfig(repo=repo, grpc_port=0, http_port=0, metrics_port=0, stub_python_env=home)
    with TritonServer(cfg) as server:
        stubs = [p for p in server.stub_processes() if p.state != "Z"]
        assert stubs, "no Python-backend stub is running"
        for p in stubs:  # every stub runs with the bare venv first on PATH and no PYTHONPATH
            env = dict(
                kv.split("=", 1) for kv in Path(f"/proc/{p.pid}/environ").read_text().split("\0") if "=" in kv
            )
            assert env["PATH"].split(":")[0] == str(home / "bin") and "PYTHONPATH" not in env, (
                p.cmdline,
                env["PATH"],
            )
            assert Path(f"/proc/{p.pid}/cwd").resolve() != PROJECT_ROOT
        ranked = rank_sessions(server.grpc_url, rows, batch_sessions=64, concurrency=2)
        log = server.log_tail(200_000)
    assert "Traceback" not in log, log[-4000:]
    assert sorted(ranked.session_id.tolist()) == sorted(sids.tolist())
    order = pd.Index(ranked.session_id).get_indexer(sids)
    got_ids, got_scores = ranked.item_ids[order], ranked.scores[order]
    mismatched = np.flatnonzero((got_ids != want_ids).any(axis=1))
    assert mismatched.size == 0, (
        f"{mismatched.size} of {len(sids)} sessions ranked differently, e.g. {sids[mismatched[:5]]}"
    )
    np.testing.assert_allclose(got_scores, want_scores.numpy(), atol=1e-5, rtol=0)
    return len(sids)


def test_synthetic_run_on_a_bare_stub(artifacts, bare_home, tmp_path):
    data, run = artifacts
    n = assert_offline_equals_online_on_bare_stub(data, run, tmp_path / "repo", bare_home)
    print(f"synthetic: offline = online on {n} sessions, stub Python = numpy + torch only")


@pytest.mark.slow
@pytest.mark.diginetica
def test_real_click_log_run_on_a_bare_stub(diginetica_data, diginetica_run, bare_home, tmp_path):
    """DIGINETICA views: timestamp-derived features (weekday_sin, age_days via ItemFirstSeen), the real
    recipe (masked LM, item memory with the two-hop fill, a LayerNorm per input feature), trained on window 2 (window 1's training split is empty under the
    growing-vocabulary protocol: nothing is known after it, so there is nothing to rank top-k from):
    conftest's `diginetica_run`."""
    run = diginetica_run
    _, meta = load_run(run)
    cfg = meta["model_config"]
    assert cfg["memory"] is True and cfg["objective"] == "mlm" and cfg["memory_hop2"] > 0, cfg
    assert cfg["feature_norm"] is True, cfg
    schema = Schema.load(diginetica_data)
    assert (
        set(schema.continuous) == {"age_days-list", "weekday_sin-list"} and "timestamp" in schema.raw_inputs
    )
    n = assert_offline_equals_online_on_bare_stub(diginetica_data, run, tmp_path / "repo", bare_home)
    print(f"diginetica: offline = online on {n} sessions, stub Python = numpy + torch only")
