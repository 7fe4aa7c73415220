"""The work of each ensemble step as plain functions, tested without Triton.

The Python-backend `model.py` files in `export/triton_models/` only parse their
config, call these functions per request and wrap the result (or the error) in
a response. numpy only at import time; torch is imported by the model step.

Errors a client can fix raise `RequestError` (a ValueError) whose message names
the input tensor; the step answers that request with INVALID_ARG and keeps
serving the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from training.names import FIRST_REAL_ID, LENGTHS_TENSOR, OUT_SESSION_ID, SESSION_COL


class RequestError(ValueError):
    """A request the server cannot answer; the message names the input and what was expected."""


# --- preprocess ---------------------------------------------------------------
def check_raw_columns(columns: Mapping[str, np.ndarray], names: Sequence[str], max_rows: int) -> int:
    """Cheap structural checks before the transform; returns the number of rows.

    Triton already enforced names, dtypes and rank ([-1]); left to check:
    one row per interaction in every column, at least one row, at most `max_rows`."""
    n = {name: int(columns[name].shape[0]) for name in names}
    first = names[0]
    for name in names[1:]:
        if n[name] != n[first]:
            raise RequestError(
                f"input '{name}' has {n[name]} rows but '{first}' has {n[first]}: "
                "every raw input needs one value per interaction row"
            )
    rows = n[first]
    if rows == 0:
        raise RequestError(f"input '{first}' has 0 rows: send at least one interaction per session")
    if rows > max_rows:
        raise RequestError(
            f"input '{first}' has {rows} rows, more than this server's maximum of {max_rows} per request "
            "(max_request_rows): split the sessions over several requests"
        )
    return rows


def preprocess(
    columns: Mapping[str, np.ndarray],
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feature_names: Sequence[str],
    max_rows: int,
    max_sessions: int,
) -> dict[str, np.ndarray]:
    """Raw interaction rows of one request -> the model step's tensors.

    Returns {OUT_SESSION_ID: [S] int64, <feature>: [S, L], LENGTHS_TENSOR: [S, 1] int64}.
    `transform` is the fitted workflow's serving transform (training.workflow.ServingTransform);
    it raises training.workflow.InputError (a ValueError) for bad values, naming the column.
    Sessions never mix across requests: each request is transformed on its own."""
    names = list(columns)
    check_raw_columns(columns, names, max_rows)
    out = transform(dict(columns))
    sessions = out[SESSION_COL]
    if len(sessions) > max_sessions:
        raise RequestError(
            f"input '{SESSION_COL}' holds {len(sessions)} sessions, more than this server's maximum of "
            f"{max_sessions} per request (max_batch_sessions): split them over several requests"
        )
    result = {OUT_SESSION_ID: np.ascontiguousarray(sessions, dtype=np.int64)}
    for name in feature_names:
        result[name] = np.ascontiguousarray(out[name])
    # [S, 1]: the model step batches over sessions (max_batch_size > 0) and
    # reshapes [S, 1] -> [S]; an ensemble tensor needs the batch dim explicit.
    result[LENGTHS_TENSOR] = np.ascontiguousarray(out[LENGTHS_TENSOR], dtype=np.int64).reshape(-1, 1)
    return result


# --- model --------------------------------------------------------------------
def default_torch_threads(cpu_count: int | None = None) -> int:
    """Intra-op threads of the model step when the config says 0: half the cores, 1..4.

    The preprocess/postprocess stubs, tritonserver and often the client share
    the machine; an oversubscribed OpenMP pool costs far more than a thread less
    (measured on 2 busy cores: batch-1 forward 0.9 ms with 1 thread, 57 ms with 2)."""
    n = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(4, n // 2))


def concat_requests(per_request: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], list[int]]:
    """Stack the inputs of the requests of one dynamic batch along the session axis.

    Returns (one array per input, [S_total, ...]) and the number of sessions of each request."""
    sizes = [int(inputs[0].shape[0]) for inputs in per_request]
    if len(per_request) == 1:
        # a copy: Triton's input buffers are read-only and torch.from_numpy wants writable memory
        return [np.array(a, order="C", copy=True) for a in per_request[0]], sizes
    stacked = [np.concatenate([inputs[i] for inputs in per_request]) for i in range(len(per_request[0]))]
    return stacked, sizes


def split_rows(arrays: Sequence[np.ndarray], sizes: Sequence[int]) -> list[list[np.ndarray]]:
    """Inverse of concat_requests for the outputs: one list of arrays per request."""
    bounds = np.cumsum([0, *sizes])
    return [[a[bounds[i] : bounds[i + 1]] for a in arrays] for i in range(len(sizes))]


# --- postprocess ----------------------------------------------------------------
def to_raw_item_ids(vocabulary: np.ndarray, encoded: np.ndarray) -> np.ndarray:
    """Encoded item ids [S, k] -> raw item ids [S, k] (vocabulary[i] = raw id of encoded id i)."""
    if encoded.size and (encoded.min() < FIRST_REAL_ID or encoded.max() >= len(vocabulary)):
        raise RequestError(
            f"encoded item ids must be in [{FIRST_REAL_ID}, {len(vocabulary)}), got "
            f"[{encoded.min()}, {encoded.max()}]: the model returned a special or unknown id"
        )
    return vocabulary[encoded]
