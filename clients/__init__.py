"""gRPC client for the `session_ranker` ensemble: raw interactions in, top-k raw item ids out.

    from clients import rank_sessions
    ranked = rank_sessions("127.0.0.1:8001", frame, top_k=10, batch_sessions=64, concurrency=4)
    for row in ranked.records():      # {"session_id": 17, "item_ids": [...], "scores": [...]}
        ...

`frame` is a pandas DataFrame or a mapping of column -> 1-D array with the
columns of DATA/interactions.parquet (one row per interaction, rows of a
session in time order). Rows are grouped by session (order of first
appearance, row order kept inside a session), whole sessions are packed into
requests of at most `batch_sessions` sessions, and up to `concurrency`
requests are in flight. Any failed request raises `RankError` naming the
sessions it carried and the server's message.

Imports numpy, tritonclient, training.names and training.grouping only (no torch, no NVTabular).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from training.grouping import group_by_first_appearance
from training.names import ENSEMBLE_NAME, OUT_ITEM_IDS, OUT_SCORES, OUT_SESSION_ID, SESSION_COL

__all__ = ["RankError", "Rankings", "plan_requests", "rank_sessions"]


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


def _columns(interactions, names: list[str]) -> dict[str, np.ndarray]:
    """The needed columns of a DataFrame or a mapping, as 1-D numpy arrays."""
    if hasattr(interactions, "columns") and not isinstance(interactions, Mapping):
        available = list(interactions.columns)
    else:
        available = list(interactions)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"input is missing column(s) {missing}; the server expects {names} (got {available})")
    out = {}
    for name in names:
        values = np.asarray(interactions[name])
        if values.ndim != 1:
            raise ValueError(f"column '{name}' must be 1-D (one value per interaction), got shape {values.shape}")
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


class _Sender:
    """One gRPC client per thread; sends one request and checks its answer."""

    def __init__(self, url: str, model: str, inputs: list[tuple[str, str]], timeout_s: float | None):
        self.url = url
        self.model = model
        self.inputs = inputs  # (name, triton datatype) in the server's order
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._clients = []
        self._lock = threading.Lock()

    def client(self):
        import tritonclient.grpc as grpcclient

        if not hasattr(self._local, "client"):
            self._local.client = grpcclient.InferenceServerClient(self.url)
            with self._lock:
                self._clients.append(self._local.client)
        return self._local.client

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()

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
        try:
            result = self.client().infer(self.model, infer_inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            first, last = expected_sessions[0], expected_sessions[-1]
            raise RankError(
                f"request with sessions {first}..{last} ({len(expected_sessions)} sessions, "
                f"{len(columns[self.inputs[0][0]])} rows) failed: {e}"
            ) from e
        sessions = result.as_numpy(OUT_SESSION_ID)
        if not np.array_equal(sessions, expected_sessions):
            raise RankError(
                f"the server answered sessions {sessions[:5].tolist()}... for a request of sessions "
                f"{expected_sessions[:5].tolist()}...: responses do not match requests"
            )
        return result.as_numpy(OUT_ITEM_IDS), result.as_numpy(OUT_SCORES)


def server_inputs(url: str, model: str = ENSEMBLE_NAME) -> tuple[list[tuple[str, str]], int]:
    """(input name, Triton datatype) pairs of the ensemble, in order, and its k."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        meta = client.get_model_metadata(model, as_json=True)
    except InferenceServerException as e:
        raise RankError(f"cannot read the metadata of model '{model}' at {url}: {e}") from e
    finally:
        client.close()
    inputs = [(i["name"], i["datatype"]) for i in meta["inputs"]]
    outputs = {o["name"]: o for o in meta["outputs"]}
    if OUT_ITEM_IDS not in outputs:
        raise RankError(f"model '{model}' at {url} has no output '{OUT_ITEM_IDS}' (outputs: {sorted(outputs)})")
    k = int(outputs[OUT_ITEM_IDS]["shape"][-1])
    return inputs, k


def rank_sessions(
    url: str,
    interactions,
    *,
    top_k: int | None = None,
    batch_sessions: int = 64,
    concurrency: int = 1,
    model: str = ENSEMBLE_NAME,
    timeout_s: float | None = 60.0,
) -> Rankings:
    """Rank the next item of every session in `interactions` (see the module docstring).

    top_k: how many items to keep per session (<= the k the repository was exported with;
    None = all of them)."""
    from tritonclient.utils import triton_to_np_dtype

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    inputs, k = server_inputs(url, model)
    if top_k is None:
        top_k = k
    if not 1 <= top_k <= k:
        raise ValueError(f"top_k must be in [1, {k}] (the repository was exported with --top-k {k}), got {top_k}")
    names = [name for name, _ in inputs]
    if SESSION_COL not in names:
        raise RankError(f"model '{model}' has no '{SESSION_COL}' input (inputs: {names})")
    columns = _columns(interactions, names)
    columns = {name: _coerce(name, columns[name], triton_to_np_dtype(dt)) for name, dt in inputs}
    sessions, plan = plan_requests(columns[SESSION_COL], batch_sessions)
    if not plan:
        return Rankings(np.zeros(0, np.int64), np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32))
    send = _Sender(url, model, inputs, timeout_s)
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
