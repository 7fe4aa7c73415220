"""Faults of the stateful path against a real tritonserver (issue 18, item 3): the server answers with the
documented status, never with a silently shorter history, and clients.SessionRanker resends so that the
caller loses no recommendation.

- the LRU cap of the step's store (a server whose store holds 2 sessions): the evicted session's next
  click is refused by the step ("... resend its clicks with the START flag");
- a version switch mid-session (export.versions.swap_to): the new version does not hold the session,
  Triton refuses the click, the client resends; a rollback to the previous version (which still holds
  an older copy of the session) is caught by the session_clicks check and resent;
- a server restart mid-session: the new server holds nothing; the client resends;
- the idle timeout: Triton forgets a sequence idle longer than max_sequence_idle_microseconds (a
  server with 2 s) and sends the step nothing; the next click without START is refused.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import SessionRanker, needs_resend
from clients.ranking import infer_inputs
from export.repository import ExportConfig, add_ensemble_version, export_repository
from export.tritonserver import ServerConfig, TritonServer
from export.versions import swap_to
from tests.stateful_util import sessions_of, stateless_prefix_rankings
from tests.triton_util import K, start_server
from training.names import OUT_SESSION_CLICKS, SESSION_COL, STATEFUL_ENSEMBLE_NAME, STATEFUL_PREPROCESS_MODEL

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def small(artifacts, tmp_path_factory):
    """(repository, server): explicit model control, a store of 2 sessions (Triton: 4 sequence slots)."""
    data, run = artifacts
    repo = export_repository(ExportConfig(run=run, data=data, out=tmp_path_factory.mktemp("faults") / "repo",
                                          top_k=K, max_live_sessions=2))  # fmt: skip
    server = start_server(repo, model_control="explicit")
    holder = {"server": server}
    yield repo, holder
    assert holder["server"].stop() == 0, holder["server"].log_tail()


@pytest.fixture(scope="module")
def sessions(interactions, schema):
    counts = interactions[SESSION_COL].value_counts(sort=False)
    ids = [s for s in interactions[SESSION_COL].drop_duplicates() if counts[s] >= 6][:3]
    return sessions_of(interactions, dict(schema["raw_inputs"]), ids)


def _row(g, j: int) -> dict:
    return {c: g[c].to_numpy()[j] for c in g.columns if c != SESSION_COL}


def _check(got, want, key) -> None:
    assert np.array_equal(got.item_ids, want[key][0]), key
    np.testing.assert_allclose(got.scores, want[key][1], atol=1e-5, rtol=0)


def test_a_session_evicted_by_the_cap_is_refused_then_resent(small, sessions, schema):
    _repo, holder = small
    url = holder["server"].grpc_url
    want = stateless_prefix_rankings(url, sessions)
    (a, ga), (b, gb), (c, gc) = sessions.items()
    with SessionRanker(url) as ranker:
        for key, g in ((a, ga), (b, gb), (c, gc)):  # c evicts a, the least recently used
            assert ranker.click(key, _row(g, 0)).resent is None
        client = grpcclient.InferenceServerClient(url)
        inputs = infer_inputs({n: np.atleast_1d(v).astype(schema["raw_inputs"][n]) for n, v in _row(ga, 1).items()})
        with pytest.raises(InferenceServerException, match="not held by this server") as e:
            client.infer(STATEFUL_ENSEMBLE_NAME, inputs, sequence_id=a)  # Triton still has a's slot: the step refuses
        assert needs_resend(e.value) and "cap of 2 live sessions" in e.value.message()
        client.close()
        got = ranker.click(a, _row(ga, 1))  # the ranker sees the same status and resends a's 2 clicks
        assert got.resent == "resent_not_held" and got.clicks == 2
        _check(got, want, (a, 2))
        for key, g in ((a, ga), (b, gb), (c, gc)):
            ranker.click(key, _row(g, len(g) - 1), end=True)  # free the slots for the next tests


def test_version_switch_and_rollback_mid_session(small, sessions, artifacts):
    """Clicks 1-2 on version 1; switch to version 2 (the same run: the same rankings, another version):
    click 3 is refused by version 2 (Triton does not know the sequence) and resent; click 4 on version 2;
    rollback to version 1, which still holds clicks 1-2 of the session: its answer counts 3 clicks where
    the client sent 5, so the client resends all of them. Every answer is the whole session's ranking.

    First a round trip 1 -> 2 -> 1 with no session: the first load of a Python step writes __pycache__
    into its version folder, so the first switch after a start reloads version 1 of every step too
    (checked on 2.51), which would drop version 1's sessions and hide the stale copy this test wants."""
    repo, holder = small
    server = holder["server"]
    data, run = artifacts
    (key, g), = list(sessions.items())[:1]  # fmt: skip
    key += 40_000_000
    want = stateless_prefix_rankings(server.grpc_url, {key: g})
    assert add_ensemble_version(ExportConfig(run=run, data=data, out=repo)) == 2
    for v in (2, 1):
        swap_to(server.http_url, repo, v, server.admin_headers)
    with SessionRanker(server.grpc_url) as ranker:
        seen = [ranker.click(key, _row(g, j)) for j in range(2)]
        swap_to(server.http_url, repo, 2, server.admin_headers)
        seen += [ranker.click(key, _row(g, j)) for j in (2, 3)]
        swap_to(server.http_url, repo, 1, server.admin_headers)
        seen.append(ranker.click(key, _row(g, 4), end=True))
        stats = dict(ranker.stats)
    assert [s.version for s in seen] == ["1", "1", "2", "2", "1"]
    assert [s.resent for s in seen] == [None, None, "resent_not_held", None, "resent_mismatch"], seen
    assert [s.clicks for s in seen] == [1, 2, 3, 4, 5]
    assert stats["resent_not_held"] == 1 and stats["resent_mismatch"] == 1 and stats["requests"] == 7, stats
    for j, got in enumerate(seen):
        _check(got, want, (key, j + 1))


def test_server_restart_mid_session(small, sessions):
    """The server stops and a new one starts on the same ports: it holds no session; the ranker's next
    click is refused (Triton's 'must specify the START flag'), resent, and answered in full."""
    repo, holder = small
    old = holder["server"]
    (key, g), = list(sessions.items())[1:2]  # fmt: skip
    key += 50_000_000
    want = stateless_prefix_rankings(old.grpc_url, {key: g})
    with SessionRanker(old.grpc_url) as ranker:
        first = ranker.click(key, _row(g, 0))
        assert old.stop() == 0, old.log_tail()
        cfg = ServerConfig(repo=repo, grpc_port=old.grpc_port, http_port=old.http_port, metrics_port=old.metrics_port,
                           model_control="explicit")  # fmt: skip
        holder["server"] = TritonServer(cfg).start()
        second = ranker.click(key, _row(g, 1), end=True)
    assert first.resent is None and second.resent == "resent_not_held" and second.clicks == 2
    _check(second, want, (key, 2))


def test_an_idle_session_is_forgotten_without_an_end(artifacts, tmp_path, sessions, schema):
    """max_sequence_idle_microseconds of 2 s, the stateful step served alone (its folder verifies on its
    own): after 3.5 s without a click Triton has released the sequence (no END reaches the step) and a
    click without START is refused with the documented status; START starts the session again."""
    data, run = artifacts
    full = export_repository(ExportConfig(run=run, data=data, out=tmp_path / "full", session_idle_timeout_s=2))
    alone = tmp_path / "alone"
    shutil.copytree(full / STATEFUL_PREPROCESS_MODEL, alone / STATEFUL_PREPROCESS_MODEL)
    (key, g), = list(sessions.items())[2:3]  # fmt: skip
    raw = {c: dt for c, dt in schema["raw_inputs"].items() if c != SESSION_COL}

    def inputs(j):
        return infer_inputs({name: g[name].to_numpy()[j : j + 1].astype(dt) for name, dt in raw.items()})

    server = start_server(alone, model_control="explicit")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.infer(STATEFUL_PREPROCESS_MODEL, inputs(0), sequence_id=key, sequence_start=True)
        r = client.infer(STATEFUL_PREPROCESS_MODEL, inputs(1), sequence_id=key)
        assert r.as_numpy(OUT_SESSION_CLICKS).tolist() == [2]
        time.sleep(3.5)  # the reaper frees it after 2 s; a margin for a busy machine
        with pytest.raises(InferenceServerException) as e:
            client.infer(STATEFUL_PREPROCESS_MODEL, inputs(2), sequence_id=key)
        assert needs_resend(e.value), e.value.message()
        r = client.infer(STATEFUL_PREPROCESS_MODEL, inputs(2), sequence_id=key, sequence_start=True, sequence_end=True)
        assert r.as_numpy(OUT_SESSION_CLICKS).tolist() == [1]
        client.close()
    finally:
        assert server.stop() == 0, server.log_tail()
