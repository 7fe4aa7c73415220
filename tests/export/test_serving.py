"""The exported ensemble on a real tritonserver (127.0.0.1, free ports), queried over gRPC.

One server per module (module-scoped fixture): offline = online on >= 500
validation sessions, the preprocess step against NVTabular's Workflow.transform,
bad input, the client CLI. A second, tiny server tests `python -m export.serve`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from clients import RankError, rank_sessions
from export.floor import FLOOR_ENSEMBLE, write_floor_repository
from export.inference import TopKRanker, feature_order
from tests.sessions_util import ranker_inputs
from tests.triton_util import MAX_ROWS, MAX_SESSIONS, PROJECT_ROOT, K
from training.checkpoint import load_run
from training.names import (
    ENSEMBLE_NAME,
    ITEM_LIST,
    LENGTHS_TENSOR,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    SESSION_COL,
    SESSIONS_DIR,
    TORCH_MODEL,
)

pytestmark = pytest.mark.triton

MIN_SESSIONS = 500  # offline = online on at least this many validation sessions
# `server` (conftest.py): the artifacts exported with tests/triton_util.served_config (K, MAX_ROWS, MAX_SESSIONS)


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def infer(client, columns: dict[str, np.ndarray], model: str = ENSEMBLE_NAME, dtypes: dict[str, str] | None = None):
    """Send columns as they are (no client-side checks); returns {output: array}."""
    inputs = []
    for name, values in columns.items():
        dt = (dtypes or {}).get(name) or {"i": "INT64", "f": "FP32"}[values.dtype.kind]
        values = values.astype(triton_to_np_dtype(dt))
        inp = grpcclient.InferInput(name, list(values.shape), dt)
        inp.set_data_from_numpy(values)
        inputs.append(inp)
    result = client.infer(model, inputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}


def raw_columns(frame: pd.DataFrame, schema: dict) -> dict[str, np.ndarray]:
    return {c: frame[c].to_numpy().astype(dt) for c, dt in schema["raw_inputs"].items()}


@pytest.fixture(scope="module")
def good_request(interactions, schema):
    """Three real sessions: the request every bad-input test checks the server still answers identically."""
    sids = interactions[SESSION_COL].unique()[:3]
    return raw_columns(interactions[interactions[SESSION_COL].isin(sids)], schema)


@pytest.fixture(scope="module")
def good_answer(client, good_request):
    return infer(client, good_request)


def assert_still_serving(client, good_request, good_answer):
    again = infer(client, good_request)
    assert again.keys() == good_answer.keys()
    for name in good_answer:
        assert again[name].tobytes() == good_answer[name].tobytes(), name


# --- health, metadata -----------------------------------------------------------------
def test_served_configs_are_the_golden_files(server):
    """What this server was given is what export/golden/ shows a reader (tests/export/test_repository.py checks the
    generator against the same files)."""
    for model in (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL):
        served = (Path(server.cfg.repo) / model / "config.pbtxt").read_text()
        assert served == (PROJECT_ROOT / "export" / "golden" / model / "config.pbtxt").read_text(), model


def test_models_ready_and_ensemble_metadata(client, schema):
    assert client.is_server_live() and client.is_server_ready()
    for model in (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL):
        assert client.is_model_ready(model), model
    meta = client.get_model_metadata(ENSEMBLE_NAME, as_json=True)
    want = {"int64": "INT64", "float32": "FP32"}
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        (n, want[dt]) for n, dt in schema["raw_inputs"].items()
    ]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        OUT_SESSION_ID: ["-1"],
        OUT_ITEM_IDS: ["-1", str(K)],
        OUT_SCORES: ["-1", str(K)],
    }


# --- offline = online ---------------------------------------------------------------------
def validation_sessions(data: Path, schema: dict) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
    """All windows' valid.parquet: session ids and the ranker's padded inputs (encoded by the fitted workflow)."""
    frames = [pd.read_parquet(p) for p in sorted((data / SESSIONS_DIR).glob("*/valid.parquet"))]
    valid = pd.concat([f for f in frames if len(f)], ignore_index=True)
    return ranker_inputs(valid, feature_order(schema), schema["categorical"], int(schema["max_sequence_length"]))


def test_offline_equals_online(server, artifacts, schema, interactions):
    data, run = artifacts
    sids, inputs = validation_sessions(data, schema)
    assert len(sids) >= MIN_SESSIONS, f"only {len(sids)} validation sessions; make the synthetic data larger"
    model, _ = load_run(run)
    ranker = TopKRanker(model, feature_order(schema), K, schema["categorical"][ITEM_LIST])
    with torch.inference_mode():
        want_scores, want_encoded = ranker(*inputs)  # the in-process model, eager
    vocab = np.load(server.cfg.repo / POSTPROCESS_MODEL / "1" / "item_vocabulary.npy")
    want_ids = vocab[want_encoded.numpy()]

    rows = interactions[interactions[SESSION_COL].isin(set(sids.tolist()))]  # raw rows, file order
    ranked = rank_sessions(server.grpc_url, rows, batch_sessions=MAX_SESSIONS, concurrency=2)
    assert sorted(ranked.session_id.tolist()) == sorted(sids.tolist())
    order = pd.Index(ranked.session_id).get_indexer(sids)  # server row of each validation session
    got_ids, got_scores = ranked.item_ids[order], ranked.scores[order]
    mismatched = np.flatnonzero((got_ids != want_ids).any(axis=1))
    assert mismatched.size == 0, f"{mismatched.size} of {len(sids)} sessions ranked differently, e.g. {sids[mismatched[:5]]}"
    np.testing.assert_allclose(got_scores, want_scores.numpy(), atol=1e-5, rtol=0)


def _infer_new_client(url: str, columns: dict[str, np.ndarray]):
    """One request on its own connection (threads each send their own); an error is returned, not raised."""
    c = grpcclient.InferenceServerClient(url)
    try:
        return infer(c, columns)
    except InferenceServerException as e:
        return e
    finally:
        c.close()


def test_requests_never_merge_sessions(server, client, interactions, schema):
    """Concurrent requests that reuse one session id (dynamically batched in the model step) stay separate."""
    sids = interactions[SESSION_COL].unique()[:12]
    requests = []
    for sid in sids:
        cols = raw_columns(interactions[interactions[SESSION_COL] == sid], schema)
        cols[SESSION_COL] = np.full_like(cols[SESSION_COL], 1)  # the same id in every request
        requests.append(cols)
    solo = [infer(client, r) for r in requests]
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(lambda r: _infer_new_client(server.grpc_url, r), requests))
        for a, b in zip(solo, together):
            assert not isinstance(b, Exception), b
            np.testing.assert_array_equal(a[OUT_ITEM_IDS], b[OUT_ITEM_IDS])
            np.testing.assert_allclose(a[OUT_SCORES], b[OUT_SCORES], atol=1e-5, rtol=0)


# --- the preprocess step keeps the workflow's semantics -------------------------------------
def test_preprocess_step_matches_workflow_transform(client, artifacts, schema, interactions):
    import nvtabular as nvt
    from merlin.io import Dataset

    data, _ = artifacts
    sids = interactions[SESSION_COL].unique()[:MAX_SESSIONS]
    rows = interactions[interactions[SESSION_COL].isin(sids)]
    served = infer(client, raw_columns(rows, schema), model=PREPROCESS_MODEL)

    workflow = nvt.Workflow.load(str(data / "workflow"))
    expected = workflow.transform(Dataset(rows.reset_index(drop=True), cpu=True)).to_ddf().compute()
    expected = expected.set_index(SESSION_COL)
    # the workflow drops sessions shorter than min_session_length; serving keeps them
    lengths = served[LENGTHS_TENSOR][:, 0]
    kept = [i for i, s in enumerate(served[OUT_SESSION_ID]) if s in expected.index]
    assert len(kept) == len(expected) and len(kept) >= 10
    assert all(lengths[i] >= 1 for i in range(len(lengths)))
    for name in feature_order(schema):
        for i in kept:
            sid = served[OUT_SESSION_ID][i]
            want = np.asarray(expected.loc[sid, name])
            got = served[name][i]
            assert lengths[i] == len(want), (name, sid)
            np.testing.assert_array_equal(got[: len(want)], want.astype(got.dtype), err_msg=f"{name} {sid}")
            assert not got[len(want) :].any(), f"{name} {sid}: padding is not 0"


# --- bad input -----------------------------------------------------------------------------------
def _session(interactions, schema, n: int = 1) -> dict[str, np.ndarray]:
    sids = interactions[SESSION_COL].unique()[:n]
    return raw_columns(interactions[interactions[SESSION_COL].isin(sids)], schema)


def _set(name, value, row=0):
    def edit(cols):
        cols[name] = cols[name].copy()
        cols[name][row] = value
        return cols

    return edit


def _truncate(name):
    def edit(cols):
        cols[name] = cols[name][:-1]
        return cols

    return edit


def _drop(name):
    def edit(cols):
        del cols[name]
        return cols

    return edit


def _zero_rows(cols):
    return {k: v[:0] for k, v in cols.items()}


def _extra_input(cols):
    cols["item_ids"] = cols["item_id"].copy()
    return cols


BAD_INPUTS = [
    # (id, edit of a good request, dtype overrides, input named in the message, other text expected)
    ("nan-continuous", _set("age_days", np.nan), None, "age_days", "finite"),
    ("inf-continuous", _set("weekday_sin", np.inf), None, "weekday_sin", "finite"),
    ("negative-item-id", _set("item_id", -5), None, "item_id", "non-negative"),
    ("negative-category", _set("category", -1), None, "category", "non-negative"),
    ("negative-session-id", _set("session_id", -1), None, "session_id", "non-negative"),
    ("zero-rows", _zero_rows, None, "session_id", "0 rows"),
    ("session-id-shorter", _truncate("session_id"), None, "session_id", "rows"),
    ("item-id-shorter", _truncate("item_id"), None, "item_id", "rows"),
    ("wrong-dtype", lambda c: c, {"item_id": "INT32"}, "item_id", "INT32"),
    ("wrong-dtype-float", lambda c: c, {"age_days": "FP64"}, "age_days", "FP64"),
    ("missing-input", _drop("category"), None, "category", "missing"),
    ("unknown-input", _extra_input, None, "item_ids", "expected 5 inputs but got 6"),
]


@pytest.mark.parametrize("edit, dtypes, named, text", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_invalid_argument(client, interactions, schema, good_request, good_answer, edit, dtypes, named, text):
    cols = edit(_session(interactions, schema, n=2))
    with pytest.raises(InferenceServerException) as info:
        infer(client, cols, dtypes=dtypes)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert f"'{named}'" in info.value.message(), info.value.message()
    assert text in info.value.message(), info.value.message()
    assert_still_serving(client, good_request, good_answer)


def test_wrong_rank_is_invalid_argument(client, interactions, schema, good_request, good_answer):
    cols = _session(interactions, schema)
    cols["item_id"] = cols["item_id"].reshape(-1, 1)
    with pytest.raises(InferenceServerException) as info:
        infer(client, cols)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'item_id'" in info.value.message()
    assert_still_serving(client, good_request, good_answer)


def test_too_many_rows_and_sessions(client, interactions, schema, good_request, good_answer):
    rows = _session(interactions, schema, n=1)
    reps = MAX_ROWS // len(rows[SESSION_COL]) + 1
    big = {k: np.tile(v, reps) for k, v in rows.items()}  # one long session, > MAX_ROWS rows
    with pytest.raises(InferenceServerException) as info:
        infer(client, big)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'session_id'" in info.value.message() and f"maximum of {MAX_ROWS}" in info.value.message()

    many = _session(interactions, schema, n=MAX_SESSIONS + 1)
    with pytest.raises(InferenceServerException) as info:
        infer(client, many)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"'session_id' holds {MAX_SESSIONS + 1} sessions" in info.value.message()
    assert_still_serving(client, good_request, good_answer)


@pytest.mark.parametrize("column", ["item_id", "category"])
def test_unknown_ids_are_oov_and_still_ranked(client, interactions, schema, good_request, good_answer, column):
    """Raw ids the workflow never saw encode to OOV: every unknown id gives the same, valid ranking."""
    cols = _session(interactions, schema, n=1)
    answers = []
    for unknown in (10**9, 10**9 + 7):
        c = {k: v.copy() for k, v in cols.items()}
        c[column][-1] = unknown
        answers.append(infer(client, c))
    a, b = answers
    np.testing.assert_array_equal(a[OUT_ITEM_IDS], b[OUT_ITEM_IDS])
    assert a[OUT_ITEM_IDS].shape == (1, K)
    vocab = set(interactions["item_id"].unique().tolist())
    assert set(a[OUT_ITEM_IDS].ravel().tolist()) <= vocab, "ranked an item outside the catalogue"
    assert_still_serving(client, good_request, good_answer)


def test_bad_and_good_requests_together(server, interactions, schema, good_request, good_answer):
    """Bad requests in flight alongside good ones fail alone."""
    bad = _set("age_days", np.nan)(_session(interactions, schema))
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: _infer_new_client(server.grpc_url, bad if i % 2 else good_request), range(16)))
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, InferenceServerException) and r.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            assert r[OUT_ITEM_IDS].tobytes() == good_answer[OUT_ITEM_IDS].tobytes()


# --- client library ---------------------------------------------------------------------------------
def test_rank_sessions_uses_the_server_session_limit(server, client, interactions):
    """batch_sessions=None sends requests of the model step's max_batch_size sessions, with the same rankings."""
    limit = int(client.get_model_config(TORCH_MODEL, as_json=True)["config"]["max_batch_size"])
    assert limit == MAX_SESSIONS
    sids = interactions[SESSION_COL].unique()[: 2 * limit + 10]
    rows = interactions[interactions[SESSION_COL].isin(sids)]
    sent = []  # rows of every request the client sent

    def counting_client(url, **kwargs):
        c = grpcclient.InferenceServerClient(url, **kwargs)
        infer = c.infer

        def counted(model_name, inputs, **kw):
            sent.append(inputs[0].shape()[0])
            return infer(model_name, inputs, **kw)

        c.infer = counted
        return c

    ranked = rank_sessions(server.grpc_url, rows, connect=counting_client)
    assert len(sent) == -(-len(sids) // limit) == 3 and sum(sent) == len(rows)
    want = rank_sessions(server.grpc_url, rows, batch_sessions=16, concurrency=2)
    assert ranked.session_id.tolist() == want.session_id.tolist() == sids.tolist()
    np.testing.assert_array_equal(ranked.item_ids, want.item_ids)
    np.testing.assert_allclose(ranked.scores, want.scores, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match=f"batch_sessions {limit + 1} .*{limit} sessions"):
        rank_sessions(server.grpc_url, rows, batch_sessions=limit + 1)
    with pytest.raises(RankError, match=f"model 'no_such_model' at {server.grpc_url} is not ready"):
        rank_sessions(server.grpc_url, rows, model="no_such_model")


# --- client CLI -------------------------------------------------------------------------------------
def _rank_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients.rank", *args], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120
    )


def test_rank_cli_json_and_table(server, interactions, tmp_path):
    sids = interactions[SESSION_COL].unique()[:40]
    frame = interactions[interactions[SESSION_COL].isin(sids)]
    path = tmp_path / "clicks.csv"
    frame.to_csv(path, index=False)
    proc = _rank_cli("--url", server.grpc_url, "--input", str(path), "--json", "--top-k", "5",
                     "--batch-sessions", "16", "--concurrency", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    want = rank_sessions(server.grpc_url, frame, top_k=5)
    assert [r["session_id"] for r in lines] == want.session_id.tolist() == sids.tolist()
    assert [r["item_ids"] for r in lines] == want.item_ids.tolist()
    np.testing.assert_allclose([r["scores"] for r in lines], want.scores, atol=1e-6)

    table = _rank_cli("--url", server.grpc_url, "--input", str(path), "--top-k", "3")
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 1 + len(sids)


def test_rank_cli_fails_loudly(server, interactions, tmp_path):
    path = tmp_path / "no_category.csv"
    interactions.drop(columns=["category"]).head(20).to_csv(path, index=False)
    proc = _rank_cli("--url", server.grpc_url, "--input", str(path))
    assert proc.returncode == 1 and "category" in proc.stderr
    path = tmp_path / "nan.csv"
    bad = interactions.head(20).copy()
    bad.loc[bad.index[3], "age_days"] = np.nan
    bad.to_csv(path, index=False)
    proc = _rank_cli("--url", server.grpc_url, "--input", str(path))
    assert proc.returncode == 1 and "age_days" in proc.stderr and "INVALID_ARG" in proc.stderr
    proc = _rank_cli("--url", server.grpc_url, "--input", str(path), "--top-k", str(K + 1))
    assert proc.returncode == 1 and "top_k" in proc.stderr


# --- python -m export.serve ---------------------------------------------------------------------------
def test_serve_cli_prints_endpoints_and_stops_on_sigterm(schema, tmp_path):
    repo = write_floor_repository(tmp_path / "floor", schema["raw_inputs"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "export.serve", "--repo", str(repo), "--grpc-port", "0", "--http-port", "0",
         "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    try:
        lines = []
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("grpc"):
                url = line.split()[-1]
        assert url and url.startswith("127.0.0.1:"), "".join(lines) + proc.stderr.read()
        c = grpcclient.InferenceServerClient(url)
        out = infer(c, {"session_id": np.array([1, 1]), "item_id": np.array([3, 4]), "category": np.array([1, 1]),
                        "age_days": np.zeros(2, np.float32), "weekday_sin": np.zeros(2, np.float32)},
                    model=FLOOR_ENSEMBLE)
        assert out["item_id_b"].tolist() == [3, 4]
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:  # the test failed before SIGTERM: do not leave a server behind
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
