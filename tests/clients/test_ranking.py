"""clients.rank_sessions and python -m clients.rank against a fake server (no tritonserver).

The fake stands in for tritonclient.grpc.InferenceServerClient through
rank_sessions' `connect` argument: it records every call, answers readiness,
metadata and config like the exported `session_ranker` ensemble, and ranks
each session as items sid*100, sid*100+1, ... so answers are checkable.
Errors are real tritonclient InferenceServerExceptions with the status strings
tritonclient.grpc gives them ("StatusCode.UNAVAILABLE", ...).
"""

from __future__ import annotations

import argparse
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from clients import BACKOFF_CAP_S, UNAVAILABLE, RankError, plan_requests, rank_sessions
from clients.rank import main, parse_header
from training.names import (
    ENSEMBLE_NAME,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    SESSION_COL,
    TORCH_MODEL,
)

K = 5
URL = "fake:8001"


def error(status: str, msg: str = "the server says no") -> InferenceServerException:
    return InferenceServerException(msg=msg, status=status)


def unavailable() -> InferenceServerException:
    return error(UNAVAILABLE, "Exceeds maximum queue size")


class FakeServer:
    """What rank_sessions sees of a tritonserver; every client it makes shares this state."""

    def __init__(
        self, limits=None, live=True, ready=True, model_ready=True, infer_errors=(), ready_error=None
    ):
        # max_batch_size per model; a missing or 0 entry is left out of the config, as protobuf JSON does
        self.limits = {ENSEMBLE_NAME: 0, PREPROCESS_MODEL: 0, TORCH_MODEL: 4, POSTPROCESS_MODEL: 0}
        self.limits.update(limits or {})
        self.live, self.ready, self.model_ready, self.ready_error = live, ready, model_ready, ready_error
        self.infer_errors = list(infer_errors)  # raised by the next infer calls, in order
        self.calls: list[tuple[str, dict]] = []  # (method, keyword arguments)
        self.connects: list[tuple[str, dict]] = []  # (url, keyword arguments) of every client made
        self.requests: list[np.ndarray] = []  # session_id column of every infer call
        self.closed = 0
        self._lock = threading.Lock()

    def connect(self, url, **kwargs):
        with self._lock:
            self.connects.append((url, kwargs))
        return FakeClient(self)

    def record(self, method: str, **kwargs) -> None:
        with self._lock:
            self.calls.append((method, kwargs))

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs[name]


class FakeClient:
    def __init__(self, server: FakeServer):
        self.server = server

    def is_server_live(self, headers=None, client_timeout=None):
        self.server.record("is_server_live", headers=headers, client_timeout=client_timeout)
        if self.server.ready_error is not None:
            raise self.server.ready_error
        return self.server.live

    def is_server_ready(self, headers=None, client_timeout=None):
        self.server.record("is_server_ready", headers=headers, client_timeout=client_timeout)
        return self.server.ready

    def is_model_ready(self, model_name, headers=None, client_timeout=None):
        self.server.record("is_model_ready", model=model_name, headers=headers, client_timeout=client_timeout)
        return self.server.model_ready

    def get_model_metadata(self, model_name, as_json=False, headers=None, client_timeout=None):
        self.server.record(
            "get_model_metadata", model=model_name, headers=headers, client_timeout=client_timeout
        )
        assert model_name == ENSEMBLE_NAME and as_json
        return {
            "name": model_name,
            "inputs": [
                {"name": SESSION_COL, "datatype": "INT64", "shape": ["-1"]},
                {"name": "item_id", "datatype": "INT64", "shape": ["-1"]},
            ],
            "outputs": [
                {"name": OUT_SESSION_ID, "datatype": "INT64", "shape": ["-1"]},
                {"name": OUT_ITEM_IDS, "datatype": "INT64", "shape": ["-1", str(K)]},
                {"name": OUT_SCORES, "datatype": "FP32", "shape": ["-1", str(K)]},
            ],
        }

    def get_model_config(self, model_name, as_json=False, headers=None, client_timeout=None):
        self.server.record(
            "get_model_config", model=model_name, headers=headers, client_timeout=client_timeout
        )
        assert as_json
        config = {"name": model_name}
        if self.server.limits.get(model_name):
            config["max_batch_size"] = self.server.limits[model_name]
        if model_name == ENSEMBLE_NAME:
            config["platform"] = "ensemble"
            steps = (PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL)
            config["ensemble_scheduling"] = {
                "step": [{"model_name": s, "model_version": "-1"} for s in steps]
            }
        return {"config": config}

    def infer(self, model_name, inputs, outputs=None, headers=None, client_timeout=None):
        self.server.record("infer", model=model_name, headers=headers, client_timeout=client_timeout)
        columns = {
            i.name(): np.frombuffer(i._get_content(), dtype=triton_to_np_dtype(i.datatype())) for i in inputs
        }
        with self.server._lock:
            self.server.requests.append(columns[SESSION_COL])
            if self.server.infer_errors:
                raise self.server.infer_errors.pop(0)
        sid = columns[SESSION_COL]
        _, first = np.unique(sid, return_index=True)
        sessions = sid[np.sort(first)]
        return FakeResult(
            {
                OUT_SESSION_ID: sessions,
                OUT_ITEM_IDS: sessions[:, None] * 100 + np.arange(K),
                OUT_SCORES: np.tile(np.arange(K, 0, -1, dtype=np.float32), (len(sessions), 1)),
            }
        )

    def close(self):
        with self.server._lock:
            self.server.closed += 1


def interactions(n_sessions: int = 10, rows: int = 3) -> dict[str, np.ndarray]:
    sid = np.repeat(np.arange(1, n_sessions + 1, dtype=np.int64), rows)
    return {SESSION_COL: sid, "item_id": np.arange(len(sid), dtype=np.int64), "ignored": np.zeros(len(sid))}


def rank(server: FakeServer, data=None, sleeps: list[float] | None = None, **kwargs):
    """rank_sessions over the fake; waits are recorded in `sleeps` instead of slept."""
    sleeps = [] if sleeps is None else sleeps
    kwargs.setdefault("rng", random.Random(0))
    ranked = rank_sessions(
        URL, interactions() if data is None else data, connect=server.connect, sleep=sleeps.append, **kwargs
    )
    return ranked, sleeps


def expected_sleeps(n: int, backoff_s: float, seed: int) -> list[float]:
    r = random.Random(seed)
    return [min(BACKOFF_CAP_S, backoff_s * 2**attempt) * r.random() for attempt in range(n)]


# --- retries ------------------------------------------------------------------------------------
def test_unavailable_twice_then_answer():
    server = FakeServer(limits={TORCH_MODEL: 10}, infer_errors=[unavailable(), unavailable()])
    ranked, sleeps = rank(server, backoff_s=0.05, rng=random.Random(7))
    assert server.methods().count("infer") == 3
    assert ranked.session_id.tolist() == list(range(1, 11))
    assert ranked.item_ids[:, 0].tolist() == [s * 100 for s in range(1, 11)]
    assert sleeps == expected_sleeps(2, 0.05, seed=7)
    assert 0 <= sleeps[0] <= 0.05 and 0 <= sleeps[1] <= 0.1


def test_backoff_is_capped():
    server = FakeServer(limits={TORCH_MODEL: 10}, infer_errors=[unavailable()] * 8)
    _, sleeps = rank(server, retries=8, backoff_s=1.0, rng=random.Random(3))
    assert sleeps == expected_sleeps(8, 1.0, seed=3)
    assert max(sleeps) <= BACKOFF_CAP_S


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_unavailable_forever_fails_after_retries_plus_one_attempts(retries):
    server = FakeServer(limits={TORCH_MODEL: 10}, infer_errors=[unavailable()] * 10)
    sleeps = []
    with pytest.raises(RankError) as info:
        rank(server, sleeps=sleeps, retries=retries, rng=random.Random(1))
    attempts = retries + 1
    assert server.methods().count("infer") == attempts
    assert sleeps == expected_sleeps(retries, 0.05, seed=1)
    msg = str(info.value)
    assert f"after {attempts} attempt" in msg and "UNAVAILABLE" in msg and "Exceeds maximum queue size" in msg
    assert "sessions 1..10 (10 sessions, 30 rows)" in msg
    assert isinstance(info.value.__cause__, InferenceServerException)


@pytest.mark.parametrize(
    "status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.DEADLINE_EXCEEDED"]
)
def test_other_errors_fail_at_once(status):
    server = FakeServer(
        limits={TORCH_MODEL: 10}, infer_errors=[error(status, "input 'age_days' must be finite")]
    )
    sleeps = []
    with pytest.raises(RankError) as info:
        rank(server, sleeps=sleeps, retries=5)
    assert server.methods().count("infer") == 1 and sleeps == []
    # the message is the one rank_sessions gave before retries existed
    want = "request with sessions 1..10 (10 sessions, 30 rows) failed: "
    assert str(info.value) == f"{want}[{status}] input 'age_days' must be finite"


def test_error_after_unavailable_says_which_attempt():
    invalid = error("StatusCode.INVALID_ARGUMENT", "bad")
    server = FakeServer(limits={TORCH_MODEL: 10}, infer_errors=[unavailable(), invalid])
    with pytest.raises(RankError, match=r"failed on attempt 2 \(the earlier ones were UNAVAILABLE\).*bad"):
        rank(server)
    assert server.methods().count("infer") == 2


def test_retries_with_concurrent_requests():
    server = FakeServer(limits={TORCH_MODEL: 3}, infer_errors=[unavailable(), unavailable()])
    ranked, sleeps = rank(server, concurrency=3)
    assert ranked.session_id.tolist() == list(range(1, 11))
    assert ranked.item_ids[:, 0].tolist() == [s * 100 for s in range(1, 11)]
    assert server.methods().count("infer") == 4 + 2 and len(sleeps) == 2


# --- readiness ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "state, why",
    [
        ({"live": False}, "server not live"),
        ({"ready": False}, "server not ready"),
        ({"model_ready": False}, "model not ready"),
        ({"ready_error": error(UNAVAILABLE, "failed to connect to all addresses")}, "failed to connect"),
    ],
)
def test_not_ready_fails_before_any_request(state, why):
    server = FakeServer(**state)
    with pytest.raises(RankError) as info:
        rank(server)
    msg = str(info.value)
    assert msg.startswith(
        f"model '{ENSEMBLE_NAME}' at {URL} is not ready: is tritonserver running and the repository"
    )
    assert why in msg
    assert "infer" not in server.methods() and "get_model_metadata" not in server.methods()
    assert server.closed == len(server.connects) == 1


def test_readiness_checked_once_per_call():
    server = FakeServer(limits={TORCH_MODEL: 2})
    rank(server, concurrency=2)
    methods = server.methods()
    assert methods[:3] == ["is_server_live", "is_server_ready", "is_model_ready"]
    assert methods.count("is_server_live") == 1 and methods.count("infer") == 5
    assert server.closed == len(server.connects)  # every client made is closed


# --- the session limit --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "limits, want",
    [
        ({TORCH_MODEL: 4}, 4),
        ({TORCH_MODEL: 64}, 64),
        ({TORCH_MODEL: 4, PREPROCESS_MODEL: 3}, 3),  # the smallest declared limit of any step
        ({TORCH_MODEL: 0, ENSEMBLE_NAME: 2}, 2),  # a model that is not batched by a step
    ],
)
def test_batch_limit_read_from_model_config(limits, want):
    server = FakeServer(limits=limits)
    ranked, _ = rank(server, data=interactions(n_sessions=10))
    assert [len(np.unique(r)) for r in server.requests] == [min(want, 10 - i) for i in range(0, 10, want)]
    assert ranked.session_id.tolist() == list(range(1, 11))
    configs = [kw["model"] for m, kw in server.calls if m == "get_model_config"]
    assert configs == [ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL]


def test_explicit_batch_sessions_within_the_limit_is_used():
    server = FakeServer(limits={TORCH_MODEL: 4})
    rank(server, batch_sessions=2)
    assert [len(np.unique(r)) for r in server.requests] == [2] * 5


def test_explicit_batch_sessions_above_the_limit_is_an_error():
    server = FakeServer(limits={TORCH_MODEL: 4})
    with pytest.raises(ValueError) as info:
        rank(server, batch_sessions=5)
    msg = str(info.value)
    assert "batch_sessions 5" in msg and "4 sessions" in msg and "max_batch_size" in msg
    assert "infer" not in server.methods()


def test_no_declared_limit_needs_an_explicit_batch_sessions():
    server = FakeServer(limits={TORCH_MODEL: 0})
    with pytest.raises(RankError, match="declares no session limit.*pass batch_sessions"):
        rank(server)
    ranked, _ = rank(FakeServer(limits={TORCH_MODEL: 0}), batch_sessions=7)
    assert len(ranked) == 10


# --- connection: headers, timeout, TLS ----------------------------------------------------------
def test_headers_and_timeout_go_with_every_call():
    server = FakeServer(limits={TORCH_MODEL: 4}, infer_errors=[unavailable()])
    rank(server, headers={"Authorization": "Bearer abc", "x-trace": "1"}, timeout_s=7.5)
    assert {"is_server_live", "is_model_ready", "get_model_metadata", "get_model_config", "infer"} <= set(
        server.methods()
    )
    for method, kwargs in server.calls:
        assert kwargs["headers"] == {"authorization": "Bearer abc", "x-trace": "1"}, method
        assert kwargs["client_timeout"] == 7.5, method


def test_no_headers_sends_none():
    server = FakeServer()
    rank(server)
    assert all(kw["headers"] is None and kw["client_timeout"] == 60.0 for _, kw in server.calls)


@pytest.mark.parametrize("headers", [{"bad key": "x"}, {"": "x"}, {"ok": 3}, {"caf\u00e9": "x"}])
def test_bad_headers_are_value_errors(headers):
    server = FakeServer()
    with pytest.raises(ValueError, match="header"):
        rank(server, headers=headers)
    assert server.calls == []


def test_tls_arguments_reach_the_client(tmp_path):
    files = {}
    for name in ("root_certificates", "private_key", "certificate_chain"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-----BEGIN-----\n")
    server = FakeServer()
    rank(server, ssl=True, **files)
    assert server.connects and all(url == URL for url, _ in server.connects)
    for _, kwargs in server.connects:
        assert kwargs == {"ssl": True, **{n: str(p) for n, p in files.items()}}
    plain = FakeServer()
    rank(plain)
    assert plain.connects[0][1] == {
        "ssl": False,
        "root_certificates": None,
        "private_key": None,
        "certificate_chain": None,
    }


def test_tls_files_without_ssl_or_missing_are_value_errors(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    with pytest.raises(ValueError, match="root_certificates given but ssl is False"):
        rank(FakeServer(), root_certificates=pem)
    with pytest.raises(ValueError, match=r"private_key .*missing\.pem is not a file"):
        rank(FakeServer(), ssl=True, private_key=tmp_path / "missing.pem")


@pytest.mark.parametrize(
    "kwargs, field",
    [({"retries": -1}, "retries"), ({"backoff_s": -0.1}, "backoff_s"), ({"concurrency": 0}, "concurrency")],
)
def test_bad_settings_are_value_errors(kwargs, field):
    server = FakeServer()
    with pytest.raises(ValueError, match=field):
        rank(server, **kwargs)
    assert server.calls == []


# --- the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("authorization=Bearer abc", ("authorization", "Bearer abc")),
        ("x-token=a=b", ("x-token", "a=b")),
        ("x-empty=", ("x-empty", "")),
        (" key =v", ("key", "v")),
    ],
)
def test_parse_header(text, want):
    assert parse_header(text) == want


@pytest.mark.parametrize("text", ["authorization", "=value", " =value", ""])
def test_parse_header_rejects_malformed(text):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse_header(text)
    assert repr(text) in str(info.value) and "KEY=VALUE" in str(info.value)


@pytest.fixture
def clicks(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("session_id,item_id\n1,10\n1,11\n2,12\n")
    return path


def test_cli_malformed_header_exits_2_naming_it(clicks, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--input", str(clicks), "--header", "authorization"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--header" in err and "'authorization'" in err and "KEY=VALUE" in err


def test_cli_repeated_header_name_exits_2(clicks, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--input", str(clicks), "--header", "a=1", "--header", "a=2"])
    assert info.value.code == 2 and "more than once" in capsys.readouterr().err


def test_cli_passes_every_setting(clicks, monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_rank_sessions(url, columns, **kwargs):
        seen.update(kwargs, url=url)
        return rank_sessions(
            url, columns, connect=FakeServer().connect, batch_sessions=kwargs["batch_sessions"]
        )

    monkeypatch.setattr("clients.rank.rank_sessions", fake_rank_sessions)
    ca = tmp_path / "ca.pem"
    argv = [
        "--url",
        "h:1",
        "--input",
        str(clicks),
        "--retries",
        "5",
        "--backoff",
        "0.2",
        "--timeout",
        "9",
        "--ssl",
        "--root-certificates",
        str(ca),
        "--header",
        "authorization=Bearer x",
        "--header",
        "x-a=b",
    ]
    assert main(argv) == 0
    assert seen == {
        "url": "h:1",
        "top_k": None,
        "batch_sessions": None,
        "concurrency": 1,
        "timeout_s": 9.0,
        "retries": 5,
        "backoff_s": 0.2,
        "ssl": True,
        "root_certificates": ca,
        "private_key": None,
        "certificate_chain": None,
        "headers": {"authorization": "Bearer x", "x-a": "b"},
    }
    assert "ranked 2 sessions" in capsys.readouterr().err


def test_cli_reports_not_ready_and_exits_1(clicks, monkeypatch, capsys):
    def not_ready(url, columns, **kwargs):
        return rank_sessions(url, columns, connect=FakeServer(live=False).connect)

    monkeypatch.setattr("clients.rank.rank_sessions", not_ready)
    assert main(["--url", "h:1", "--input", str(clicks)]) == 1
    err = capsys.readouterr().err
    assert "error: model 'session_ranker' at h:1 is not ready" in err


def test_demo_and_replay_flags_keep_their_meaning():
    from clients.demo import DemoConfig
    from clients.demo import parse_args as demo_args
    from clients.replay import ReplayConfig
    from clients.replay import parse_args as replay_args

    def demo(*argv):
        return demo_args(list(argv))

    assert demo() == DemoConfig(Path("data/topics"), Path("runs/topics"), Path("model_repository"), 0,
                                "", "--epochs 4", 5, 10)  # fmt: skip
    got = demo("--data", "d", "--run", "r", "--repo", "m", "--seed", "3", "--prepare-args=--input x.csv",
               "--train-args", "--epochs 1", "--sessions", "2", "--top-k", "4")  # fmt: skip
    assert got == DemoConfig(Path("d"), Path("r"), Path("m"), 3, "--input x.csv", "--epochs 1", 2, 4)
    got = replay_args(["--data", "d", "--run", "r", "--repo", "m", "--out", "o.json", "--eval-split", "test",
                       "--batch-sessions", "8", "--background-sessions", "2", "--tolerance", "0.5"])  # fmt: skip
    assert got == ReplayConfig(Path("d"), Path("r"), Path("m"), Path("o.json"), "test", 8, 2, 0.5)


# --- client request planning ---------------------------------------------------------
def test_plan_requests_keeps_sessions_whole_and_ordered():
    sid = np.array([7, 7, 3, 9, 3, 7, 1])
    sessions, plan = plan_requests(sid, batch_sessions=2)
    assert sessions.tolist() == [7, 3, 9, 1]
    assert [sid[rows].tolist() for rows in plan] == [[7, 7, 7, 3, 3], [9, 1]]
    assert plan[0].tolist() == [0, 1, 5, 2, 4]  # input order inside a session
