"""gRPC client of `session_ranker_stateful`: send a shopper's newest click, get the whole session's ranking.

    from clients import SessionRanker
    with SessionRanker("127.0.0.1:8001", top_k=10) as ranker:
        got = ranker.click(17, {"item_id": 42, "category": 3, "age_days": 0.5, "weekday_sin": 0.0})
        got.item_ids, got.scores, got.clicks      # [k] raw ids, [k] scores, clicks the server holds
        ranker.click(17, next_click, end=True)    # the last click: the server forgets the session now

The server holds each live session (export/triton_models/preprocess_stateful): a request carries only
the new click's raw columns (every raw input but `session_id`: the session is the request's correlation
id, tritonclient's `sequence_id`), with `sequence_start` on a session's first click. What this client
adds, so that the caller never loses a recommendation:

- it keeps each session's last max_len clicks (the server's own bound, read from its config), and forgets
  a session after the server's idle timeout, as the server does (a click after that starts a new
  session: Serenade treats sessions idle that long as empty);
- the documented status -- INVALID_ARGUMENT whose message holds "START flag" (`RESEND_WITH_START`):
  Triton's "must specify the START flag on the first request of the sequence" (the server restarted, the
  ensemble switched versions, the session idled out on the server, another replica got it) or the step's
  "... resend its clicks with the START flag" (its store evicted the session) -- makes it resend the kept
  clicks plus the new one with START, once; the answer then covers the whole session again;
- UNAVAILABLE (a full queue, a server that is not reachable) is retried with the backoff of
  clients.ranking, by resending the kept clicks with START: the server may or may not have applied the
  failed click, and a START rebuilds the session exactly, so a retry never counts a click twice;
- every answer's `session_clicks` must equal the clicks sent since the last START; otherwise (a state
  that does not match, e.g. after a rollback to a version that still held an older copy) the kept clicks
  are resent with START.

`stats` counts what happened ({"requests", "resent_not_held", "resent_unavailable", "resent_mismatch"}).
A session's clicks are sent one request at a time (a lock per session); different sessions go in
parallel from any number of threads (one gRPC client per thread). Any other error raises RankError.

Imports numpy, tritonclient, training.names and clients.ranking only.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.ranking import (
    UNAVAILABLE,
    RankError,
    ThreadClients,
    _Backoff,
    _check_ready,
    _coerce,
    _Connection,
    _headers,
    _model_config,
    _tls,
    infer_inputs,
)
from training.names import (
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_CLICKS,
    RESEND_WITH_START,
    SESSION_COL,
    STATEFUL_ENSEMBLE_NAME,
)

__all__ = ["SessionRanker", "SessionRanking", "needs_resend"]

INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"


def needs_resend(error) -> bool:
    """The documented status: the server does not hold the session; resend its clicks with START."""
    return error.status() == INVALID_ARGUMENT and RESEND_WITH_START in (error.message() or "")


def _session_id(session: Hashable) -> int | str:
    """A correlation id Triton takes: a positive integer (uint64) or a non-empty string."""
    if isinstance(session, np.integer):
        session = int(session)
    if isinstance(session, bool) or not isinstance(session, (int, str)) or session in (0, ""):
        raise ValueError(f"session {session!r}: use a positive integer or a non-empty string")
    if isinstance(session, int) and not 0 < session < 2**64:
        raise ValueError(f"session {session}: an integer session id must be in [1, 2**64)")
    return session


@dataclass
class SessionRanking:
    """The ranking after one click: the whole session so far, as the server holds it."""

    session: Hashable
    item_ids: np.ndarray  # [k] raw item ids, best first
    scores: np.ndarray  # [k] float32
    clicks: int  # clicks the server holds for the session since its START (this one included)
    resent: str | None  # why the kept clicks were resent with START (None: the click alone sufficed)
    version: str  # the ensemble version that answered (two are served around a version switch)


@dataclass
class _Session:
    rows: dict[str, np.ndarray]  # the last max_len clicks, one array per raw column
    sent: int  # clicks the server should hold since our last START
    touched: float
    lock: threading.Lock


@dataclass(frozen=True)
class _StatefulModel:
    inputs: list[tuple[str, str]]  # (name, Triton datatype): the raw columns but the session id
    k: int
    max_len: int  # clicks the server keeps per session
    idle_timeout_s: float  # the server's max_sequence_idle_microseconds


def _describe_stateful(conn: _Connection) -> _StatefulModel:
    """Readiness, then the ensemble's inputs and k, and its first step's bounds (config.pbtxt)."""
    from tritonclient.utils import InferenceServerException

    client = conn.open()
    try:
        _check_ready(conn, client)
        try:
            meta = client.get_model_metadata(conn.model, as_json=True, **conn.per_call)
        except InferenceServerException as e:
            raise RankError(f"cannot read the metadata of model '{conn.model}' at {conn.url}: {e}") from e
        steps = _model_config(conn, client, conn.model).get("ensemble_scheduling", {}).get("step", [])
        first = _model_config(conn, client, steps[0]["model_name"]) if steps else {}
    finally:
        client.close()
    seq = first.get("sequence_batching")
    outputs = {o["name"]: o for o in meta["outputs"]}
    if seq is None or OUT_SESSION_CLICKS not in outputs or OUT_ITEM_IDS not in outputs:
        raise RankError(
            f"model '{conn.model}' at {conn.url} is not a stateful session ranker (its first step has no "
            f"sequence_batching, or it has no '{OUT_SESSION_CLICKS}' output): use clients.rank_sessions"
        )
    max_len = int(first["output"][0]["dims"][-1])
    idle = int(seq.get("max_sequence_idle_microseconds", 1_000_000)) / 1e6
    inputs = [(i["name"], i["datatype"]) for i in meta["inputs"]]
    return _StatefulModel(inputs, int(outputs[OUT_ITEM_IDS]["shape"][-1]), max_len, idle)


class SessionRanker:
    """Clicks in, rankings out, through `session_ranker_stateful` (see the module docstring).

    top_k: items kept per answer (<= the repository's k; None: all). max_sessions: sessions kept on
    this side (least recently used forgotten beyond it; the server has its own cap). route_header: a
    header (gRPC metadata) that carries the session id with every click, for a load balancer that
    routes sessions to replicas by hashing it (export/README.md, "More than one server"). retries/backoff_s:
    UNAVAILABLE handling as in rank_sessions. ssl, root_certificates, private_key, certificate_chain,
    headers, timeout_s, connect, sleep, rng: as rank_sessions takes them. clock: time source (tests)."""

    def __init__(
        self,
        url: str,
        *,
        top_k: int | None = None,
        model: str = STATEFUL_ENSEMBLE_NAME,
        max_sessions: int = 1_000_000,
        timeout_s: float | None = 60.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        headers: Mapping[str, str] | None = None,
        route_header: str | None = None,
        connect: Callable[..., Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if retries < 0 or backoff_s < 0 or max_sessions < 1:
            raise ValueError(f"retries {retries}, backoff_s {backoff_s} must be >= 0, max_sessions >= 1")
        if connect is None:
            import tritonclient.grpc as grpcclient

            connect = grpcclient.InferenceServerClient
        tls = _tls(ssl, root_certificates=root_certificates, private_key=private_key,
                   certificate_chain=certificate_chain)  # fmt: skip
        self.conn = _Connection(url, model, timeout_s, _headers(headers), tls, connect)
        self.served = _describe_stateful(self.conn)
        k = self.served.k
        self.top_k = k if top_k is None else top_k
        if not 1 <= self.top_k <= k:
            raise ValueError(f"top_k must be in [1, {k}] (the repository was exported with --top-k {k})")
        names = [n for n, _ in self.served.inputs]
        if SESSION_COL in names:
            raise RankError(f"model '{model}' takes a '{SESSION_COL}' input: not a stateful ensemble")
        self.route_header = None if route_header is None else next(iter(_headers({route_header: ""})))
        self.backoff = _Backoff(retries, backoff_s, sleep, rng if rng is not None else random.Random())
        self.max_sessions, self.clock = max_sessions, clock
        self.sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        self.stats = {"requests": 0, "resent_not_held": 0, "resent_unavailable": 0, "resent_mismatch": 0}
        self._lock = threading.Lock()  # the session table and the stats
        self._threads = ThreadClients(self.conn)

    # --- connections -------------------------------------------------------------------------
    def _client(self):
        return self._threads.get()

    def close(self) -> None:
        self._threads.close()

    def __enter__(self) -> SessionRanker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- sessions ----------------------------------------------------------------------------------
    def _session(self, key: Hashable) -> _Session:
        """The session's local record (a new, empty one when absent or idle past the server's timeout)."""
        now = self.clock()
        with self._lock:
            s = self.sessions.get(key)
            if s is not None and now - s.touched > self.served.idle_timeout_s:
                s = None  # the server forgot it too: a click now starts a new session
            if s is None:
                s = _Session({}, 0, now, threading.Lock())
                self.sessions[key] = s
                while len(self.sessions) > self.max_sessions:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(key)
            s.touched = now
        return s

    def forget(self, key: Hashable) -> None:
        """Drop the session on this side (the server forgets it after its idle timeout, or on END)."""
        with self._lock:
            self.sessions.pop(key, None)

    def _columns(self, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
        from tritonclient.utils import triton_to_np_dtype

        out = {}
        for name, dt in self.served.inputs:
            if name not in rows:
                expected = [n for n, _ in self.served.inputs]
                raise ValueError(f"click is missing column {name!r}; the server expects {expected}")
            values = np.atleast_1d(np.asarray(rows[name]))
            if values.ndim != 1:
                raise ValueError(f"column {name!r} must be a scalar or 1-D (one value per click), got {values.shape}")
            out[name] = _coerce(name, values, np.dtype(triton_to_np_dtype(dt)))
        lengths = {len(v) for v in out.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every column needs the same number (>= 1) of clicks, got {sorted(lengths)}")
        return out

    # --- one click ----------------------------------------------------------------------------------
    def _infer(self, key: Hashable, columns: dict[str, np.ndarray], start: bool, end: bool):
        import tritonclient.grpc as grpcclient

        inputs = infer_inputs({name: columns[name] for name, _ in self.served.inputs})
        outputs = [grpcclient.InferRequestedOutput(n) for n in (OUT_ITEM_IDS, OUT_SCORES, OUT_SESSION_CLICKS)]
        with self._lock:
            self.stats["requests"] += 1
        per_call = dict(self.conn.per_call)
        if self.route_header is not None:  # a load balancer hashes it: the session's replica
            per_call["headers"] = {**(per_call["headers"] or {}), self.route_header: str(key)}
        return self._client().infer(
            self.conn.model, inputs, outputs=outputs, sequence_id=key, sequence_start=start, sequence_end=end,
            **per_call,
        )  # fmt: skip

    def click(self, session: Hashable, rows: Mapping[str, Any], *, end: bool = False) -> SessionRanking:
        """Send the newest click(s) of `session` (column -> scalar, or 1-D arrays for several clicks,
        oldest first); return the ranking of the whole session. end=True: the session's last click (the
        server answers, then forgets it; so does this client)."""
        from tritonclient.utils import InferenceServerException

        session = _session_id(session)
        new = self._columns(rows)
        s = self._session(session)
        with s.lock:
            kept = {n: np.concatenate([s.rows[n], v]) if s.rows else v for n, v in new.items()}
            kept = {n: v[-self.served.max_len :] for n, v in kept.items()}
            start, payload, reason = not s.rows, new, None
            attempt = 0
            while True:
                try:
                    result = self._infer(session, payload, start, end)
                except InferenceServerException as e:
                    if needs_resend(e) and reason is None:
                        reason = "resent_not_held"
                    elif e.status() == UNAVAILABLE and attempt < self.backoff.retries:
                        self.backoff.wait(attempt)
                        attempt += 1
                        reason = "resent_unavailable"
                    else:
                        raise RankError(f"click of session {session!r} failed{f' ({reason})' if reason else ''}: {e}") from e
                    with self._lock:
                        self.stats[reason] += 1
                    start, payload = True, kept
                    continue
                clicks = int(result.as_numpy(OUT_SESSION_CLICKS)[0])
                want = len(payload[self.served.inputs[0][0]]) + (0 if start else s.sent)
                if clicks != want:
                    if reason == "resent_mismatch":
                        raise RankError(f"session {session!r}: the server holds {clicks} clicks after a resend "
                                        f"of {want}: the server does not keep sessions as documented")  # fmt: skip
                    reason = "resent_mismatch"
                    with self._lock:
                        self.stats[reason] += 1
                    start, payload = True, kept
                    continue
                break
            s.rows, s.sent = kept, clicks
        if end:
            self.forget(session)
        return SessionRanking(
            session,
            result.as_numpy(OUT_ITEM_IDS)[0, : self.top_k],
            result.as_numpy(OUT_SCORES)[0, : self.top_k],
            clicks,
            reason,
            result.get_response().model_version,
        )
