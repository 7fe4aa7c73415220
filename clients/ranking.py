"""gRPC client for the `session_ranker` ensemble: raw interactions in, top-k raw item ids out.

    from clients import rank_sessions
    ranked = rank_sessions("127.0.0.1:8001", frame, top_k=10, concurrency=4)
    for row in ranked.records():      # {"session_id": 17, "item_ids": [...], "scores": [...]}
        ...

`frame` is a pandas DataFrame or a mapping of column -> 1-D array with the
columns of DATA/interactions.parquet (one row per interaction, rows of a
session in time order). Rows are grouped by session (order of first
appearance, row order kept inside a session), whole sessions are packed into
requests of at most `batch_sessions` sessions, and up to `concurrency`
requests are in flight. Any failed request raises `RankError` naming the
sessions it carried and the server's message.

What happens before the first request, once per call:
  - readiness: the server is live and ready and `model` is ready; otherwise
    `RankError("model '...' at URL is not ready: is tritonserver running and
    the repository loaded? (...)")`, and nothing is sent.
  - the model's inputs and k (its metadata), and the most sessions one request
    may carry (its config): the smallest non-zero `max_batch_size` of the model
    and, for an ensemble, of its steps -- in this repository the `model` step's
    (`python -m export --max-batch-sessions`; preprocess, postprocess and the
    ensemble itself declare 0). `batch_sessions=None` uses that number; a larger
    explicit value is a `ValueError` naming both numbers.

Retries: the repository's queue policy answers UNAVAILABLE on purpose when a
step's queue is full or a request waited too long (export/pbtxt.py, queue_policy), and
gRPC answers UNAVAILABLE when the server cannot be reached. A request answered
UNAVAILABLE is sent again up to `retries` more times, after waiting
min(BACKOFF_CAP_S, backoff_s * 2**attempt) * U(0, 1) seconds (exponential
backoff with full jitter; attempt = 0 after the first failure). Every other
error fails the request at once. A request that stays UNAVAILABLE raises
`RankError` saying how many attempts were made.

Connection: `ssl`, `root_certificates`, `private_key` and `certificate_chain`
are tritonclient.grpc.InferenceServerClient's own TLS arguments (file paths);
`headers` (e.g. {"authorization": "Bearer ..."} for a proxy in front of the
server) go with every call, names lower-cased as gRPC metadata requires;
`timeout_s` bounds every call (None: no limit).

For tests and embedding: `connect` makes the clients (called like
InferenceServerClient(url, ssl=..., root_certificates=..., private_key=...,
certificate_chain=...)), `sleep` waits between attempts and `rng` draws the
jitter (pass random.Random(seed) for a repeatable schedule).

Imports numpy, tritonclient, training.names and training.data.grouping only (no torch, no NVTabular).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data.grouping import group_by_first_appearance
from training.names import ENSEMBLE_NAME, OUT_ITEM_IDS, OUT_SCORES, OUT_SESSION_ID, SESSION_COL

__all__ = ["BACKOFF_CAP_S", "UNAVAILABLE", "RankError", "Rankings", "plan_requests", "infer_inputs", "rank_sessions", "same_ranking"]

# InferenceServerException.status() of a gRPC UNAVAILABLE answer: tritonclient.grpc
# (2.51, grpc/_utils.py get_error_grpc) stores str(rpc_error.code()), i.e. "StatusCode.UNAVAILABLE".
UNAVAILABLE = "StatusCode.UNAVAILABLE"
# The longest wait between two attempts, in seconds: with the default backoff_s 0.05 the
# exponential reaches it only after 5 failures; it keeps a large `retries` from waiting minutes.
BACKOFF_CAP_S = 2.0
# Legal gRPC metadata key characters (keys are lower case; HTTP/2 header names are case-insensitive).
_HEADER_KEY = re.compile(r"[0-9a-z_.\-]+")


class RankError(RuntimeError):
    """A request failed on the server or its answer did not match what was sent."""


@dataclass
class Rankings:
    """Top-k per session, sessions in order of first appearance in the input."""

    session_id: np.ndarray  # [S] int64
    item_ids: np.ndarray  # [S, k] raw item ids, best first
    scores: np.ndarray  # [S, k] float32 logits, descending

    def __len__(self) -> int:
        return len(self.session_id)

    def records(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield {
                "session_id": self.session_id[i].item(),
                "item_ids": self.item_ids[i].tolist(),
                "scores": [float(s) for s in self.scores[i]],
            }


def infer_inputs(columns: Mapping[str, np.ndarray]) -> list:
    """tritonclient.grpc InferInputs of 1-D columns (one value per row), named and typed by them."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, values in columns.items():
        values = np.ascontiguousarray(values)
        inp = grpcclient.InferInput(name, [len(values)], np_to_triton_dtype(values.dtype))
        inp.set_data_from_numpy(values)
        out.append(inp)
    return out


def same_ranking(ids_a, scores_a, ids_b, scores_b, atol: float = 1e-5) -> bool:
    """Two top-k answers for the same session are the same ranking: scores within `atol` position by
    position, and wherever the item ids differ, the items are swapped among near-tied scores (within
    `atol`). A session's scores move in the last bits with the other sessions the model step batched
    it with (another GEMM shape), which can swap two items whose scores tie to ~1e-7."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    scores_a, scores_b = np.asarray(scores_a), np.asarray(scores_b)
    if ids_a.shape != ids_b.shape or not np.allclose(scores_a, scores_b, atol=atol, rtol=0):
        return False
    for i in np.flatnonzero(ids_a != ids_b):
        moved = (ids_b == ids_a[i]) & (np.abs(scores_b - scores_a[i]) <= atol)  # swapped within a tie
        at_cutoff = abs(scores_a[i] - scores_a[-1]) <= atol  # tied with the last item: may fall out of the top-k
        if not moved.any() and not at_cutoff:
            return False
    return True


def _columns(interactions, names: list[str]) -> dict[str, np.ndarray]:
    """The needed columns of a DataFrame or a mapping, as 1-D numpy arrays."""
    if hasattr(interactions, "columns") and not isinstance(interactions, Mapping):
        available = list(interactions.columns)
    else:
        available = list(interactions)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"input is missing column(s) {missing}; the server expects {names} (got {available})"
        )
    out = {}
    for name in names:
        values = np.asarray(interactions[name])
        if values.ndim != 1:
            raise ValueError(
                f"column '{name}' must be 1-D (one value per interaction), got shape {values.shape}"
            )
        out[name] = values
    return out


def _coerce(name: str, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a column to the server's dtype when that loses nothing; else ValueError naming the column."""
    if values.dtype == dtype:
        return values
    if np.issubdtype(dtype, np.integer):
        if np.issubdtype(values.dtype, np.integer):
            info = np.iinfo(dtype)
            if values.size and (values.min() < info.min or values.max() > info.max):
                raise ValueError(f"column '{name}': values outside the range of {dtype}")
            return values.astype(dtype)
        if np.issubdtype(values.dtype, np.floating):
            bad = ~np.isfinite(values) | (values != np.round(values))
            if bad.any():
                raise ValueError(
                    f"column '{name}' must hold integers ({dtype}); got {values[bad][0]!r} "
                    f"at row {int(np.flatnonzero(bad)[0])} (missing values in a CSV?)"
                )
            return values.astype(dtype)
    if np.issubdtype(dtype, np.floating) and (
        np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
    ):
        return values.astype(dtype)
    raise ValueError(f"column '{name}' has dtype {values.dtype}; the server expects {dtype}")


def plan_requests(session_ids: np.ndarray, batch_sessions: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Group rows by session and pack whole sessions into requests.

    Returns (the session ids in order of first appearance [S], one row-index
    array per request; rows of a session stay together and in input order)."""
    if batch_sessions < 1:
        raise ValueError(f"batch_sessions must be >= 1, got {batch_sessions}")
    if len(session_ids) == 0:
        return np.zeros(0, dtype=np.int64), []
    groups = group_by_first_appearance(session_ids)
    n = len(groups.session_ids)
    ends = groups.starts + groups.counts
    requests = []
    for start in range(0, n, batch_sessions):
        lo = groups.starts[start]
        hi = ends[min(start + batch_sessions, n) - 1]
        requests.append(groups.row_order[lo:hi])
    return groups.session_ids, requests


@dataclass(frozen=True)
class _Connection:
    """How every call reaches the server: clients made by `connect` with the TLS settings,
    the same headers and timeout on each call."""

    url: str
    model: str
    timeout_s: float | None
    headers: dict[str, str] | None
    # ssl, root_certificates, private_key, certificate_chain as InferenceServerClient takes them
    tls: dict[str, Any]
    connect: Callable[..., Any]

    def open(self):
        return self.connect(self.url, **self.tls)

    @property
    def per_call(self) -> dict[str, Any]:
        """Keyword arguments of every tritonclient call."""
        return {"headers": self.headers, "client_timeout": self.timeout_s}


@dataclass(frozen=True)
class _Backoff:
    """Attempts after the first on UNAVAILABLE, and the wait before each."""

    retries: int
    base_s: float
    sleep: Callable[[float], None]
    rng: random.Random  # random() is one C call: safe to share between sender threads

    def wait(self, attempt: int) -> float:
        """Sleep after failed attempt `attempt` (0 = the first): exponential, capped, full jitter."""
        delay = min(BACKOFF_CAP_S, self.base_s * 2**attempt) * self.rng.random()
        self.sleep(delay)
        return delay


@dataclass(frozen=True)
class _ServedModel:
    inputs: list[tuple[str, str]]  # (name, Triton datatype) in the server's order
    k: int  # items per session the repository was exported with
    max_sessions: int | None  # most sessions per request; None: nothing declares a max_batch_size


def _check_ready(conn: _Connection, client) -> None:
    """One readiness check: server live, server ready, model ready; RankError otherwise."""
    from tritonclient.utils import InferenceServerException

    not_ready = (
        f"model '{conn.model}' at {conn.url} is not ready: is tritonserver running and the repository loaded?"
    )
    try:
        live = client.is_server_live(**conn.per_call)
        ready = live and client.is_server_ready(**conn.per_call)
        model_ready = ready and client.is_model_ready(conn.model, **conn.per_call)
    except InferenceServerException as e:
        raise RankError(f"{not_ready} ({e})") from e
    if not model_ready:
        state = "server not live" if not live else "server not ready" if not ready else "model not ready"
        raise RankError(f"{not_ready} ({state})")


def _model_config(conn: _Connection, client, name: str) -> dict:
    from tritonclient.utils import InferenceServerException

    try:
        return client.get_model_config(name, as_json=True, **conn.per_call)["config"]
    except InferenceServerException as e:
        raise RankError(f"cannot read the config of model '{name}' at {conn.url}: {e}") from e


def _session_limit(conn: _Connection, client) -> int | None:
    """The smallest non-zero max_batch_size of the model and its ensemble steps (module docstring)."""
    config = _model_config(conn, client, conn.model)
    steps = [s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])]
    sizes = [int(config.get("max_batch_size", 0))]  # the JSON omits a max_batch_size of 0
    sizes += [int(_model_config(conn, client, step).get("max_batch_size", 0)) for step in steps]
    declared = [s for s in sizes if s > 0]
    return min(declared) if declared else None


def _describe(conn: _Connection) -> _ServedModel:
    """Readiness, then the model's inputs, k and session limit, over one client."""
    from tritonclient.utils import InferenceServerException

    client = conn.open()
    try:
        _check_ready(conn, client)
        try:
            meta = client.get_model_metadata(conn.model, as_json=True, **conn.per_call)
        except InferenceServerException as e:
            raise RankError(f"cannot read the metadata of model '{conn.model}' at {conn.url}: {e}") from e
        max_sessions = _session_limit(conn, client)
    finally:
        client.close()
    inputs = [(i["name"], i["datatype"]) for i in meta["inputs"]]
    outputs = {o["name"]: o for o in meta["outputs"]}
    if OUT_ITEM_IDS not in outputs:
        raise RankError(
            f"model '{conn.model}' at {conn.url} has no output '{OUT_ITEM_IDS}' (outputs: {sorted(outputs)})"
        )
    return _ServedModel(inputs, int(outputs[OUT_ITEM_IDS]["shape"][-1]), max_sessions)


class ThreadClients:
    """One gRPC client of `conn` per calling thread (tritonclient's clients are not thread-safe),
    opened on first use; `close` closes every one of them."""

    def __init__(self, conn: _Connection):
        self.conn = conn
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()

    def get(self):
        if not hasattr(self._local, "client"):
            self._local.client = self.conn.open()
            with self._lock:
                self._clients.append(self._local.client)
        return self._local.client

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()


class _Sender:
    """One gRPC client per thread; sends one request (again on UNAVAILABLE) and checks its answer."""

    def __init__(self, conn: _Connection, inputs: list[tuple[str, str]], backoff: _Backoff):
        self.conn = conn
        self.inputs = inputs  # (name, triton datatype) in the server's order
        self.backoff = backoff
        self._threads = ThreadClients(conn)

    def client(self):
        return self._threads.get()

    def close(self) -> None:
        self._threads.close()

    def __call__(self, columns: dict[str, np.ndarray], expected_sessions: np.ndarray):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        infer_inputs = []
        for name, datatype in self.inputs:
            values = columns[name]
            inp = grpcclient.InferInput(name, [len(values)], datatype)
            inp.set_data_from_numpy(values)
            infer_inputs.append(inp)
        outputs = [grpcclient.InferRequestedOutput(n) for n in (OUT_SESSION_ID, OUT_ITEM_IDS, OUT_SCORES)]
        attempts = self.backoff.retries + 1
        for attempt in range(attempts):
            try:
                client = self.client()
                result = client.infer(self.conn.model, infer_inputs, outputs=outputs, **self.conn.per_call)
                break
            except InferenceServerException as e:
                unavailable = e.status() == UNAVAILABLE
                if unavailable and attempt + 1 < attempts:
                    self.backoff.wait(attempt)
                    continue
                first, last = expected_sessions[0], expected_sessions[-1]
                what = (
                    f"request with sessions {first}..{last} ({len(expected_sessions)} sessions, "
                    f"{len(columns[self.inputs[0][0]])} rows) failed"
                )
                if unavailable:
                    what += f" after {attempt + 1} attempt{'s' if attempt else ''} (UNAVAILABLE each time)"
                elif attempt:
                    what += f" on attempt {attempt + 1} (the earlier ones were UNAVAILABLE)"
                raise RankError(f"{what}: {e}") from e
        sessions = result.as_numpy(OUT_SESSION_ID)
        if not np.array_equal(sessions, expected_sessions):
            raise RankError(
                f"the server answered sessions {sessions[:5].tolist()}... for a request of sessions "
                f"{expected_sessions[:5].tolist()}...: responses do not match requests"
            )
        return result.as_numpy(OUT_ITEM_IDS), result.as_numpy(OUT_SCORES)


def _headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """Header names lower-cased (gRPC rejects upper case); ValueError naming a bad one."""
    if not headers:
        return None
    out = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"headers must map str to str, got {key!r}: {value!r}")
        name = key.lower()
        if not _HEADER_KEY.fullmatch(name):
            raise ValueError(f"header name {key!r}: expected letters, digits, '-', '_' or '.'")
        out[name] = value
    return out


def _tls(ssl: bool, **files: str | Path | None) -> dict[str, Any]:
    """InferenceServerClient's TLS arguments; a file given without ssl, or missing, is a ValueError."""
    given = {name: path for name, path in files.items() if path is not None}
    if given and not ssl:
        raise ValueError(f"{', '.join(given)} given but ssl is False: pass ssl=True (--ssl) to use TLS")
    for name, path in given.items():
        if not Path(path).is_file():
            raise ValueError(f"{name} {path} is not a file (expected a PEM file)")
    return {"ssl": ssl, **{name: None if path is None else str(path) for name, path in files.items()}}


def rank_sessions(
    url: str,
    interactions,
    *,
    top_k: int | None = None,
    batch_sessions: int | None = None,
    concurrency: int = 1,
    model: str = ENSEMBLE_NAME,
    timeout_s: float | None = 60.0,
    retries: int = 3,
    backoff_s: float = 0.05,
    ssl: bool = False,
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    certificate_chain: str | Path | None = None,
    headers: Mapping[str, str] | None = None,
    connect: Callable[..., Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Rankings:
    """Rank the next item of every session in `interactions` (see the module docstring).

    top_k: how many items to keep per session (<= the k the repository was exported with;
    None = all of them). batch_sessions: sessions per request (None = the server's limit).
    retries: attempts after the first on UNAVAILABLE only. backoff_s: the first wait's upper
    bound. connect / sleep / rng: the client factory, the wait and the jitter source."""
    from tritonclient.utils import triton_to_np_dtype

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if backoff_s < 0:
        raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
    if connect is None:
        import tritonclient.grpc as grpcclient

        connect = grpcclient.InferenceServerClient
    tls = _tls(
        ssl, root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )
    conn = _Connection(url, model, timeout_s, _headers(headers), tls, connect)
    served = _describe(conn)
    inputs, k = served.inputs, served.k
    if top_k is None:
        top_k = k
    if not 1 <= top_k <= k:
        raise ValueError(
            f"top_k must be in [1, {k}] (the repository was exported with --top-k {k}), got {top_k}"
        )
    if batch_sessions is None:
        if served.max_sessions is None:
            raise RankError(
                f"model '{model}' at {url} declares no session limit (max_batch_size 0 on it and on "
                "every step): pass batch_sessions"
            )
        batch_sessions = served.max_sessions
    elif served.max_sessions is not None and batch_sessions > served.max_sessions:
        raise ValueError(
            f"batch_sessions {batch_sessions} is more than model '{model}' at {url} accepts per request "
            f"({served.max_sessions} sessions, its max_batch_size): pass at most {served.max_sessions}, "
            "or None for that limit"
        )
    names = [name for name, _ in inputs]
    if SESSION_COL not in names:
        raise RankError(f"model '{model}' has no '{SESSION_COL}' input (inputs: {names})")
    columns = _columns(interactions, names)
    columns = {name: _coerce(name, columns[name], triton_to_np_dtype(dt)) for name, dt in inputs}
    sessions, plan = plan_requests(columns[SESSION_COL], batch_sessions)
    if not plan:
        return Rankings(
            np.zeros(0, np.int64), np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32)
        )
    backoff = _Backoff(retries, backoff_s, sleep, rng if rng is not None else random.Random())
    send = _Sender(conn, inputs, backoff)
    starts = list(range(0, len(sessions), batch_sessions))

    def one(i: int):
        rows = plan[i]
        request = {name: np.ascontiguousarray(values[rows]) for name, values in columns.items()}
        return send(request, sessions[starts[i] : starts[i] + batch_sessions])

    try:
        if concurrency == 1 or len(plan) == 1:
            answers = [one(i) for i in range(len(plan))]
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                answers = list(pool.map(one, range(len(plan))))
    finally:
        send.close()
    item_ids = np.concatenate([a[0] for a in answers])[:, :top_k]
    scores = np.concatenate([a[1] for a in answers])[:, :top_k]
    return Rankings(session_id=sessions, item_ids=item_ids, scores=scores)
