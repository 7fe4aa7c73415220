"""The stateful ensemble `session_ranker_stateful` (issue 18) against a real tritonserver.

One server for the module: the serving artifacts exported with two instances of the stateful step
(`--session-instances 2`) and 16 live sessions per instance. Checked here: the protocol with plain
tritonclient (sequence_id / sequence_start / sequence_end, the documented status for a session the
server does not hold, START resets, END forgets, a bad click leaves the session as it was); that
clicking through real sessions, interleaved over threads and spread over both instances, gives
exactly the rankings of sending every prefix statelessly (no session's clicks reach another's
ranking); and the client API's transparent resend.

Faults (LRU cap, idle timeout, restart, version switch and rollback) are in tests/system/test_stateful_faults.py;
the DIGINETICA parity in tests/system/test_stateful_parity.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import RankError, SessionRanker, needs_resend
from clients.ranking import infer_inputs
from export.repository import ExportConfig, export_repository
from tests.stateful_util import differences, replay_clicks, sessions_of, stateless_prefix_rankings
from tests.triton_util import K, start_server
from training.names import (
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_CLICKS,
    RESEND_WITH_START,
    SESSION_COL,
    STATEFUL_ENSEMBLE_NAME,
    STATEFUL_PREPROCESS_MODEL,
)

pytestmark = pytest.mark.triton

INSTANCES = 2
LIVE = 16  # sessions each instance's store holds (Triton: twice as many sequence slots)


@pytest.fixture(scope="module")
def stateful_server(artifacts, tmp_path_factory):
    data, run = artifacts
    out = tmp_path_factory.mktemp("stateful") / "repo"
    repo = export_repository(
        ExportConfig(run=run, data=data, out=out, top_k=K, session_instances=INSTANCES, max_live_sessions=LIVE)
    )
    server = start_server(repo, model_control="explicit")  # stop() unloads the live sessions: exit 0
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def raw(schema) -> dict[str, str]:
    return dict(schema["raw_inputs"])


def _click(g, j: int, raw: dict[str, str], upto: int | None = None) -> dict[str, np.ndarray]:
    """Row j (or rows j..upto-1) of session frame g, the stateful inputs (no session id)."""
    sl = slice(j, j + 1 if upto is None else upto)
    return {c: g[c].to_numpy()[sl].astype(dt) for c, dt in raw.items() if c != SESSION_COL}


def _long_sessions(interactions, raw, n: int, min_len: int = 3) -> dict:
    counts = interactions[SESSION_COL].value_counts(sort=False)
    ids = [s for s in interactions[SESSION_COL].drop_duplicates() if counts[s] >= min_len][:n]
    return sessions_of(interactions, raw, ids)


def test_plain_tritonclient_protocol(stateful_server, interactions, raw):
    """What export/README.md documents: START with the first click, then one click per request; the
    answer is the whole session's ranking (= the stateless answer for the same clicks) and
    session_clicks counts the clicks; END forgets; a session the server does not hold, and a request
    without a correlation id, are INVALID_ARGUMENT naming what to do."""
    (sid, g), = _long_sessions(interactions, raw, 1).items()  # fmt: skip
    client = grpcclient.InferenceServerClient(stateful_server.grpc_url)
    for j in range(len(g)):
        r = client.infer(STATEFUL_ENSEMBLE_NAME, infer_inputs(_click(g, j, raw)), sequence_id=sid,
                         sequence_start=j == 0, sequence_end=j == len(g) - 1)  # fmt: skip
        whole = client.infer("session_ranker", infer_inputs({c: g[c].to_numpy()[: j + 1] for c in raw}))
        assert r.as_numpy(OUT_SESSION_CLICKS).tolist() == [j + 1]
        assert r.as_numpy(OUT_ITEM_IDS).shape == (1, K)
        assert np.array_equal(r.as_numpy(OUT_ITEM_IDS), whole.as_numpy(OUT_ITEM_IDS))
        np.testing.assert_allclose(r.as_numpy(OUT_SCORES), whole.as_numpy(OUT_SCORES), atol=1e-5, rtol=0)
    with pytest.raises(InferenceServerException) as e:  # after END: not held any more
        client.infer(STATEFUL_ENSEMBLE_NAME, infer_inputs(_click(g, 0, raw)), sequence_id=sid)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and RESEND_WITH_START in e.value.message()
    assert needs_resend(e.value)
    with pytest.raises(InferenceServerException, match="correlation ID") as e:
        client.infer(STATEFUL_ENSEMBLE_NAME, infer_inputs(_click(g, 0, raw)))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and not needs_resend(e.value)
    # several clicks in one request, and a string session id
    r = client.infer(STATEFUL_ENSEMBLE_NAME, infer_inputs(_click(g, 0, raw, upto=len(g))), sequence_id=f"visitor-{sid}",
                     sequence_start=True, sequence_end=True)  # fmt: skip
    assert r.as_numpy(OUT_SESSION_CLICKS).tolist() == [len(g)]
    assert np.array_equal(r.as_numpy(OUT_ITEM_IDS), whole.as_numpy(OUT_ITEM_IDS))
    client.close()


def test_start_resets_and_a_bad_click_changes_nothing(stateful_server, interactions, raw):
    (sid, g), = _long_sessions(interactions, raw, 1, min_len=3).items()  # fmt: skip
    sid = sid + 10_000_000  # not the previous test's
    client = grpcclient.InferenceServerClient(stateful_server.grpc_url)
    kw = {"model_name": STATEFUL_ENSEMBLE_NAME, "sequence_id": sid}
    client.infer(inputs=infer_inputs(_click(g, 0, raw)), sequence_start=True, **kw)
    two = client.infer(inputs=infer_inputs(_click(g, 1, raw)), **kw)
    bad = _click(g, 2, raw)
    bad[next(c for c, dt in raw.items() if dt.startswith("float"))][0] = np.nan
    with pytest.raises(InferenceServerException, match="nan") as e:
        client.infer(inputs=infer_inputs(bad), **kw)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and not needs_resend(e.value)
    three = client.infer(inputs=infer_inputs(_click(g, 2, raw)), **kw)  # the bad click was not kept
    assert three.as_numpy(OUT_SESSION_CLICKS).tolist() == [3]
    again = client.infer(inputs=infer_inputs(_click(g, 0, raw, upto=2)), sequence_start=True, **kw)  # START resets
    assert again.as_numpy(OUT_SESSION_CLICKS).tolist() == [2]
    assert np.array_equal(again.as_numpy(OUT_ITEM_IDS), two.as_numpy(OUT_ITEM_IDS))
    client.infer(inputs=infer_inputs(_click(g, 2, raw)), sequence_end=True, **kw)
    client.close()


def _stub_cpu_ticks(server) -> dict[int, int]:
    """utime + stime of each live preprocess_stateful stub (pid -> clock ticks)."""
    out = {}
    for p in server.stub_processes():
        if p.model == STATEFUL_PREPROCESS_MODEL and p.state != "Z":
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[p.pid] = int(fields[11]) + int(fields[12])
    return out


def test_interleaved_sessions_on_two_instances_equal_stateless_prefixes(stateful_server, interactions, raw):
    """16 real sessions clicked through by 4 threads, each interleaving its sessions one click at a time,
    so that consecutive requests of a thread belong to different sessions and both instances of the
    stateful step hold some of them: every answer equals the stateless ranking of the same prefix (no
    session's clicks reach another's ranking), with no resend."""
    sessions = _long_sessions(interactions, raw, LIVE)
    want = stateless_prefix_rankings(stateful_server.grpc_url, sessions)
    before = _stub_cpu_ticks(stateful_server)
    assert len(before) == INSTANCES
    with SessionRanker(stateful_server.grpc_url) as ranker:
        got = replay_clicks(ranker, sessions, threads=4)
        stats = dict(ranker.stats)
    busy = {pid: t - before[pid] for pid, t in _stub_cpu_ticks(stateful_server).items()}
    bad, same = differences(got, want)
    assert bad == [], f"{len(bad)} of {len(want)} prefixes ranked differently: {bad[:5]}"
    assert {g.resent for g in got.values()} == {None} and stats["requests"] == len(want), stats
    assert all(t > 0 for t in busy.values()), f"an instance did no work: {busy}"
    assert [got[(s, j)].clicks for s, j in want] == [j for _, j in want]
    print(f"stateful = stateless on {len(want)} prefixes of {len(sessions)} interleaved sessions "
          f"({same} with identical item ids, the others swap items tied to 1e-5); stub CPU ticks {busy}")  # fmt: skip


def test_client_resends_a_session_the_server_forgot(stateful_server, interactions, raw):
    """Another client ends the session on the server (sequence_end): the ranker's next click is answered
    with the documented status, the ranker resends the session's kept clicks with START, and the caller
    gets the ranking of the whole session."""
    (sid, g), = _long_sessions(interactions, raw, 1, min_len=3).items()  # fmt: skip
    sid += 20_000_000
    want = stateless_prefix_rankings(stateful_server.grpc_url, {sid: g})
    other = grpcclient.InferenceServerClient(stateful_server.grpc_url)
    with SessionRanker(stateful_server.grpc_url) as ranker:
        first = ranker.click(sid, {c: g[c].to_numpy()[0] for c in g.columns if c != SESSION_COL})
        assert first.resent is None and first.clicks == 1
        other.infer(STATEFUL_ENSEMBLE_NAME, infer_inputs(_click(g, 0, raw)), sequence_id=sid, sequence_end=True)
        second = ranker.click(sid, {c: g[c].to_numpy()[1] for c in g.columns if c != SESSION_COL})
        assert second.resent == "resent_not_held" and second.clicks == 2
        assert ranker.stats["resent_not_held"] == 1 and ranker.stats["requests"] == 3
        assert np.array_equal(second.item_ids, want[(sid, 2)][0])
    other.close()


def test_client_checks_its_arguments(stateful_server):
    with SessionRanker(stateful_server.grpc_url, top_k=5) as ranker:
        for bad in (0, "", -3, 1.5, True):
            with pytest.raises(ValueError, match="session"):
                ranker.click(bad, {})
        with pytest.raises(ValueError, match="missing column"):
            ranker.click(7, {"item_id": 3})
    with pytest.raises(RankError, match="not a stateful"):
        SessionRanker(stateful_server.grpc_url, model="session_ranker")


def test_many_sessions_at_once_stay_apart(stateful_server, interactions, raw):
    """A burst: 8 threads, 32 sessions (every live slot of both instances' stores), each session's
    clicks sent as fast as the server answers; then every session's last ranking checked."""
    sessions = _long_sessions(interactions, raw, INSTANCES * LIVE, min_len=2)
    sessions = {s + 30_000_000: g for s, g in sessions.items()}
    want = stateless_prefix_rankings(stateful_server.grpc_url, sessions)
    t0 = time.monotonic()
    with SessionRanker(stateful_server.grpc_url) as ranker:
        got = replay_clicks(ranker, sessions, threads=8)
    bad, _ = differences(got, want)
    assert bad == [], bad[:5]
    print(f"{len(got)} clicks of {len(sessions)} sessions from 8 threads in {time.monotonic() - t0:.1f} s")
