"""clients.SessionRanker without a server: a fake `session_ranker_stateful` that behaves as export/README.md
documents (it holds each session's clicks; a click without START for a session it does not hold is
INVALID_ARGUMENT with "START flag"; START resets), so that every recovery path is exercised
deterministically: not held -> resend, UNAVAILABLE -> backoff and resend with START (a click is never
counted twice), a copy that does not match -> resend, the server's idle timeout applied on this side,
the routing header, argument checks."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from clients import UNAVAILABLE, RankError, SessionRanker, needs_resend
from training.names import (
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_CLICKS,
    STATEFUL_ENSEMBLE_NAME,
    STATEFUL_PREPROCESS_MODEL,
)

K, MAX_LEN, IDLE_S = 3, 4, 60.0
NOT_HELD = "inference request for sequence {} to model 'preprocess_stateful' must specify the START flag on the first request of the sequence"


class Result:
    def __init__(self, outputs):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs[name]

    def get_response(self):
        return type("Response", (), {"model_version": "1"})()


class FakeStatefulServer:
    """Sessions -> the item ids it holds (last MAX_LEN) and clicks since START; the ranking it answers is
    a function of the held items, so a lost or doubled click shows in the answer."""

    def __init__(self):
        self.sessions: dict = {}
        self.errors: list = []  # raised by the next infer calls, in order (None: answer normally)
        self.apply_before_error = False  # an UNAVAILABLE after the click was applied (a later step's queue)
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def connect(self, url, **kw):
        return FakeClient(self)

    def ranking(self, items: list[int]) -> np.ndarray:
        return np.array([[sum(items) * 10 + i for i in range(K)]], dtype=np.int64)


class FakeClient:
    def __init__(self, server: FakeStatefulServer):
        self.s = server

    def is_server_live(self, **kw):
        return True

    is_server_ready = is_server_live

    def is_model_ready(self, model, **kw):
        return True

    def get_model_metadata(self, model, as_json=False, **kw):
        return {
            "inputs": [{"name": "item_id", "datatype": "INT64", "shape": ["-1"]}],
            "outputs": [{"name": OUT_ITEM_IDS, "datatype": "INT64", "shape": ["-1", str(K)]},
                        {"name": OUT_SCORES, "datatype": "FP32", "shape": ["-1", str(K)]},
                        {"name": OUT_SESSION_CLICKS, "datatype": "INT64", "shape": ["1"]}],
        }  # fmt: skip

    def get_model_config(self, model, as_json=False, **kw):
        if model == STATEFUL_ENSEMBLE_NAME:
            return {"config": {"platform": "ensemble", "ensemble_scheduling": {"step": [
                {"model_name": STATEFUL_PREPROCESS_MODEL}, {"model_name": "model"}]}}}  # fmt: skip
        if model == STATEFUL_PREPROCESS_MODEL:
            return {"config": {"sequence_batching": {"max_sequence_idle_microseconds": str(int(IDLE_S * 1e6))},
                               "output": [{"name": "item_id-list", "dims": ["-1", str(MAX_LEN)]}]}}  # fmt: skip
        return {"config": {"max_batch_size": 64}}

    def infer(self, model, inputs, outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, **kw):
        s = self.s
        items = np.frombuffer(inputs[0]._get_content(), dtype=triton_to_np_dtype(inputs[0].datatype())).tolist()
        with s.lock:
            s.calls.append({"session": sequence_id, "items": items, "start": sequence_start, "end": sequence_end,
                            "headers": kw.get("headers")})  # fmt: skip
            error = s.errors.pop(0) if s.errors else None
            if error is not None and not s.apply_before_error:
                raise error
            if sequence_start:
                s.sessions[sequence_id] = ([], 0)
            elif sequence_id not in s.sessions:
                raise InferenceServerException(msg=NOT_HELD.format(sequence_id), status="StatusCode.INVALID_ARGUMENT")
            held, clicks = s.sessions[sequence_id]
            held, clicks = (held + items)[-MAX_LEN:], clicks + len(items)
            s.sessions[sequence_id] = (held, clicks)
            if sequence_end:
                del s.sessions[sequence_id]
            if error is not None:
                raise error
        return Result({OUT_ITEM_IDS: s.ranking(held), OUT_SCORES: np.zeros((1, K), np.float32),
                       OUT_SESSION_CLICKS: np.array([clicks], np.int64)})  # fmt: skip

    def close(self):
        pass


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def ranker(server, **kw) -> SessionRanker:
    kw.setdefault("sleep", lambda s: None)
    kw.setdefault("rng", random.Random(0))
    return SessionRanker("fake:8001", connect=server.connect, **kw)


def want(server, items):
    return server.ranking(items[-MAX_LEN:])[0]


def test_clicks_go_one_at_a_time_and_answers_cover_the_session():
    server = FakeStatefulServer()
    r = ranker(server)
    for n, item in enumerate([1, 2, 3, 4, 5, 6], start=1):
        got = r.click(7, {"item_id": item})
        assert got.clicks == n and got.resent is None and np.array_equal(got.item_ids, want(server, list(range(1, n + 1))))
    assert [c["items"] for c in server.calls] == [[i] for i in range(1, 7)]
    assert [c["start"] for c in server.calls] == [True] + [False] * 5
    r.click(7, {"item_id": [7, 8]}, end=True)  # several clicks at once, the last with END
    assert server.calls[-1] == {"session": 7, "items": [7, 8], "start": False, "end": True, "headers": None}
    assert 7 not in r.sessions and 7 not in server.sessions


def test_a_session_the_server_forgot_is_resent_with_start():
    server = FakeStatefulServer()
    r = ranker(server)
    for item in (1, 2, 3, 4, 5):
        r.click(9, {"item_id": item})
    del server.sessions[9]  # restart, version switch, idle timeout, another replica...
    got = r.click(9, {"item_id": 6})
    assert got.resent == "resent_not_held" and got.clicks == MAX_LEN  # the kept clicks: the last MAX_LEN
    assert server.calls[-1] == {"session": 9, "items": [3, 4, 5, 6], "start": True, "end": False, "headers": None}
    assert np.array_equal(got.item_ids, want(server, [1, 2, 3, 4, 5, 6]))
    assert r.click(9, {"item_id": 7}).clicks == MAX_LEN + 1 and r.stats["resent_not_held"] == 1


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "applied-then-failed"])
def test_unavailable_is_retried_by_resending_with_start(applied):
    """The click may or may not have reached the session before UNAVAILABLE (a later step's full queue):
    a resend with START rebuilds the session either way, so no click is counted twice."""
    server = FakeStatefulServer()
    r = ranker(server)
    r.click(5, {"item_id": 1})
    r.click(5, {"item_id": 2})
    server.errors = [InferenceServerException(msg="Exceeds maximum queue size", status=UNAVAILABLE)]
    server.apply_before_error = applied
    got = r.click(5, {"item_id": 3})
    assert got.resent == "resent_unavailable" and got.clicks == 3
    assert np.array_equal(got.item_ids, want(server, [1, 2, 3]))
    assert server.sessions[5] == ([1, 2, 3], 3)


def test_unavailable_every_time_raises_after_the_retries():
    server = FakeStatefulServer()
    r = ranker(server, retries=2)
    r.click(5, {"item_id": 1})
    server.errors = [InferenceServerException(msg="down", status=UNAVAILABLE)] * 3
    with pytest.raises(RankError, match="click of session 5 failed"):
        r.click(5, {"item_id": 2})
    assert len(server.calls) == 4


def test_a_copy_that_does_not_match_is_resent():
    """A rollback to a version that still held an older copy: the answer counts fewer clicks than were sent."""
    server = FakeStatefulServer()
    r = ranker(server)
    for item in (1, 2, 3):
        r.click(4, {"item_id": item})
    server.sessions[4] = ([1], 1)  # stale
    got = r.click(4, {"item_id": 4})
    assert got.resent == "resent_mismatch" and got.clicks == 4
    assert np.array_equal(got.item_ids, want(server, [1, 2, 3, 4]))


def test_after_the_servers_idle_timeout_a_click_starts_a_new_session():
    clock, server = Clock(), FakeStatefulServer()
    r = ranker(server, clock=clock)
    r.click(3, {"item_id": 1})
    clock.t += IDLE_S + 1  # the server forgot it too; the shopper's old clicks are not resurrected
    got = r.click(3, {"item_id": 2})
    assert got.clicks == 1 and got.resent is None and server.calls[-1]["start"] is True
    assert np.array_equal(got.item_ids, want(server, [2]))


def test_route_header_carries_the_session_id():
    server = FakeStatefulServer()
    r = ranker(server, route_header="X-Session-Id", headers={"authorization": "Bearer t"})
    r.click("visitor-1", {"item_id": 1})
    assert server.calls[-1]["headers"] == {"authorization": "Bearer t", "x-session-id": "visitor-1"}


def test_sessions_on_many_threads_never_mix():
    server = FakeStatefulServer()
    r = ranker(server)
    out: dict = {}

    def shopper(sid):
        for item in range(1, 6):
            out[(sid, item)] = r.click(sid, {"item_id": sid * 100 + item})

    threads = [threading.Thread(target=shopper, args=(sid,)) for sid in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (sid, n), got in out.items():
        assert np.array_equal(got.item_ids, want(server, [sid * 100 + i for i in range(1, n + 1)])), (sid, n)


def test_needs_resend_is_the_documented_status():
    assert needs_resend(InferenceServerException(msg=NOT_HELD.format(1), status="StatusCode.INVALID_ARGUMENT"))
    assert not needs_resend(InferenceServerException(msg="column 'age_days' has value nan", status="StatusCode.INVALID_ARGUMENT"))
    assert not needs_resend(InferenceServerException(msg="START flag", status=UNAVAILABLE))
