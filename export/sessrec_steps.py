"""The work of each ensemble step as plain functions, tested without Triton.

The Python-backend `model.py` files in `export/triton_models/` only parse their
config, call these functions per request and wrap the result (or the error) in
a response. `python -m export` copies this file verbatim into each step's
version folder (sha256-recorded there): it imports only the standard library and
numpy, uses Python 3.10 syntax, and gets every tensor name and special id as an
argument (the exporter writes them into config.pbtxt parameters from
`training.names`, the one definition).

Errors a client can fix raise `RequestError` (a ValueError) whose message names
the input tensor; the step answers that request with INVALID_ARG and keeps
serving the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class RequestError(ValueError):
    """A request the server cannot answer; the message names the input and what was expected."""


def string_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """config.pbtxt `parameters` (as the model_config JSON gives them) -> {key: string value}."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def json_parameter(params: Mapping[str, str], key: str, model: str) -> Any:
    """A JSON-valued config parameter; ValueError naming the model and key when absent or malformed."""
    if key not in params:
        raise ValueError(f"config.pbtxt of {model} has no parameter {key!r}: re-export the repository")
    try:
        return json.loads(params[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"config.pbtxt of {model}: parameter {key!r} is not JSON ({e}): re-export") from e


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
    session_col: str,
    session_out: str,
    lengths: str,
) -> dict[str, np.ndarray]:
    """Raw interaction rows of one request -> the model step's tensors.

    Returns {session_out: [S] int64, <feature>: [S, L], lengths: [S, 1] int64}.
    `transform` is the compiled workflow (training.sessrec_transform.Transform, shipped as
    sessrec_transform.py); it returns the session ids under `session_col` and raises its
    InputError (a ValueError) for bad values, naming the column.
    Sessions never mix across requests: each request is transformed on its own."""
    names = list(columns)
    check_raw_columns(columns, names, max_rows)
    out = transform(dict(columns))
    sessions = out[session_col]
    if len(sessions) > max_sessions:
        raise RequestError(
            f"input '{session_col}' holds {len(sessions)} sessions, more than this server's maximum of "
            f"{max_sessions} per request (max_batch_sessions): split them over several requests"
        )
    result = {session_out: np.ascontiguousarray(sessions, dtype=np.int64)}
    for name in feature_names:
        result[name] = np.ascontiguousarray(out[name])
    # [S, 1]: the model step batches over sessions (max_batch_size > 0) and
    # reshapes [S, 1] -> [S]; an ensemble tensor needs the batch dim explicit.
    result[lengths] = np.ascontiguousarray(out[lengths], dtype=np.int64).reshape(-1, 1)
    return result


# --- model --------------------------------------------------------------------
def check_model_inputs(
    arrays: Sequence[np.ndarray],
    names: Sequence[str],
    cardinalities: Mapping[str, int],
    max_len: int,
) -> None:
    """The model step's inputs of one request, as the contract wants them; else RequestError naming the input.

    `arrays`/`names`: the forward's positional inputs (features [S, L], then lengths [S]).
    Categorical features (keys of `cardinalities`) hold ids in [0, cardinality),
    continuous ones finite numbers, lengths lie in [1, max_len]. From the ensemble
    this always holds (the preprocess step made them); a client calling the model
    step directly gets INVALID_ARG here instead of failing the whole dynamic batch
    its request was merged into."""
    for name, a in zip(names[:-1], arrays[:-1]):
        if a.size == 0:
            continue
        card = cardinalities.get(name)
        if card is not None:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= card:
                bad = lo if lo < 0 else hi
                raise RequestError(f"input '{name}' holds id {bad}: expected encoded ids in [0, {card})")
        elif not np.isfinite(a).all():
            raise RequestError(f"input '{name}' holds {a[~np.isfinite(a)][0]}: expected finite numbers")
    lengths = arrays[-1]
    if lengths.size and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        bad = int(lengths.min()) if int(lengths.min()) < 1 else int(lengths.max())
        raise RequestError(f"input '{names[-1]}' holds {bad}: expected session lengths in [1, {max_len}]")


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
def to_raw_item_ids(vocabulary: np.ndarray, encoded: np.ndarray, first_real_id: int, input_name: str) -> np.ndarray:
    """Encoded item ids [S, k] -> raw item ids [S, k] (vocabulary[i] = raw id of encoded id i).

    Ids below `first_real_id` (pad/null/OOV) or outside the vocabulary raise RequestError naming `input_name`."""
    if encoded.size and (encoded.min() < first_real_id or encoded.max() >= len(vocabulary)):
        raise RequestError(
            f"input '{input_name}': encoded item ids must be in [{first_real_id}, {len(vocabulary)}), got "
            f"[{encoded.min()}, {encoded.max()}]: the model returned a special or unknown id"
        )
    return vocabulary[encoded]
