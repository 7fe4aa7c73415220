"""The fitted NVTabular workflow's serving transform, compiled: numpy and the standard library only.

    t = Transform.load(folder)           # folder/workflow.json + folder/workflow_arrays/*.npy
    out = t({"session_id": ..., "item_id": ..., ...})   # raw interaction rows of one request
    out["session_id"]  [S] int64          sessions in order of first appearance
    out[<feature>]     [S, max_len]       categorical int64 / continuous float32, last <= max_len
                                          interactions, right-padded with 0
    out["lengths"]     [S] int64 (>= 1)   (key: the spec's "lengths")

This file is the ONE source of the serving-time semantics. `training.serving_transform`
compiles a fitted `nvt.Workflow` into a spec (JSON: ordered steps, each a kernel
kind and its parameters) plus named numpy arrays (Categorify tables, first-seen
tables), and runs it with this module; parity with `Workflow.transform` is tested
column by column (tests/test_workflow.py, tests/test_preprocess_properties.py).
`python -m export` copies this file verbatim into the preprocess step's version
folder (sha256-recorded there), so a stock tritonserver (python3 + numpy) runs
exactly the tested code, with no NVTabular, pandas or project import.

It also holds the numpy math the workflow's ops call (`weekday_sin`,
`item_age_days`, `first_seen_lookup`: `training.workflow_ops` wraps them) and
`group_by_first_appearance` (re-exported by `training.grouping`).

Rules for this file: imports only the standard library and numpy; Python 3.10
syntax (the stub of tritonserver 24.01-24.10 images is Python 3.10); no pickle
(arrays are read with allow_pickle=False); names and special ids come from the
spec, written by the exporter from `training.names`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

FORMAT = 1  # spec format written/read here
SPEC_FILE = "workflow.json"
ARRAYS_DIR = "workflow_arrays"
SECONDS_PER_DAY = 86_400


class InputError(ValueError):
    """A serving request the workflow cannot transform (names column, value, expectation)."""


class SpecError(RuntimeError):
    """workflow.json / its arrays are not what this module can run (re-export)."""


# --------------------------------------------------------------------------- #
# Rows -> sessions (the one implementation; training.grouping re-exports it)
# --------------------------------------------------------------------------- #
class SessionGroups(NamedTuple):
    session_ids: np.ndarray  # [S] the distinct keys, in order of first appearance
    row_order: np.ndarray  # [N] row indices grouped by session (stable: input order inside a session)
    starts: np.ndarray  # [S] position in row_order of each session's first row
    counts: np.ndarray  # [S] rows per session


def group_by_first_appearance(keys: np.ndarray) -> SessionGroups:
    """Group the rows of `keys` ([N]) by key; sessions ordered by their first row, rows kept in input order."""
    uniq, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)  # numpy 2 keeps the input's shape here
    by_first = np.argsort(first_idx, kind="stable")  # sessions by first appearance
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[by_first] = np.arange(len(uniq))
    session = rank[inverse]  # [N] session rank of each row
    order = np.argsort(session, kind="stable")  # rows grouped by session, input order inside
    counts = np.bincount(session, minlength=len(uniq))  # rows per session, in rank order
    return SessionGroups(uniq[by_first], order, np.cumsum(counts) - counts, counts)


# --------------------------------------------------------------------------- #
# The numpy math of the workflow's ops (training.workflow_ops wraps these)
# --------------------------------------------------------------------------- #
def weekday_sin(timestamp: np.ndarray) -> np.ndarray:
    """sin(2*pi*weekday/7) of epoch seconds (UTC), weekday 0 = Monday -> float32."""
    days = np.floor_divide(np.asarray(timestamp, dtype=np.int64), SECONDS_PER_DAY)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday (weekday 3)
    return np.sin(2.0 * np.pi * weekday / 7.0).astype(np.float32)


def item_age_days(first_seen: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Days from the item's first appearance at fit time to this interaction (float32, >= 0);
    0 for items unseen at fit time (first_seen is NaN)."""
    ts = np.asarray(timestamp, dtype=np.float64)
    first = np.asarray(first_seen, dtype=np.float64)
    age = (ts - first) / SECONDS_PER_DAY
    return np.where(np.isnan(age), 0.0, np.maximum(age, 0.0)).astype(np.float32)


def first_seen_lookup(ids: np.ndarray, first: np.ndarray, values: np.ndarray) -> np.ndarray:
    """first[i] for each value equal to ids[i] (ids sorted ascending), NaN for values not in ids."""
    values = np.asarray(values, dtype=np.int64)
    if not len(ids):
        return np.full(len(values), np.nan)
    pos = np.searchsorted(ids, values)
    pos_c = np.minimum(pos, len(ids) - 1)
    found = (pos < len(ids)) & (ids[pos_c] == values)
    return np.where(found, first[pos_c], np.nan)


UDFS: dict[str, Callable[..., np.ndarray]] = {"weekday_sin": weekday_sin, "item_age_days": item_age_days}
TWO_ARG_UDFS = {"item_age_days"}  # f(column, frame[time_col])


# --------------------------------------------------------------------------- #
# Ragged session lists
# --------------------------------------------------------------------------- #
class Ragged:
    """A session-level list column: session s holds flat[starts[s] : starts[s] + lengths[s]].

    Slicing only moves `starts`/`lengths`; nothing is padded before the final [S, L]
    output, so one long session in a request costs O(rows), not O(sessions x rows).
    """

    __slots__ = ("flat", "starts", "lengths")

    def __init__(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.flat = flat
        self.starts = starts
        self.lengths = lengths

    def padded(self, width: int, dtype) -> np.ndarray:
        """[S, width], the last <= width values of each list, right-padded with 0."""
        keep = np.minimum(self.lengths, width)
        first = self.starts + self.lengths - keep
        cols = np.arange(width)
        idx = np.minimum(first[:, None] + cols[None, :], max(len(self.flat) - 1, 0))
        values = self.flat[idx] if len(self.flat) else np.zeros(idx.shape, dtype=dtype)
        return np.where(cols[None, :] < keep[:, None], values, 0).astype(dtype, copy=False)


Frame = dict  # column name -> np.ndarray [N] (rows) | np.ndarray [S] | Ragged


# --------------------------------------------------------------------------- #
# Kernels: (params, arrays, spec) -> function Frame -> Frame
# --------------------------------------------------------------------------- #
def _identity_kernel(params, arrays, spec):
    return lambda frame: frame


def _vocab_lookup(sorted_values: np.ndarray, sorted_labels: np.ndarray, default: int):
    """Encoder raw value -> label via binary search on the sorted vocabulary."""
    n = len(sorted_values)

    def encode(x: np.ndarray) -> np.ndarray:
        if n == 0:
            return np.full(len(x), default, dtype=np.int64)
        pos = np.searchsorted(sorted_values, x)
        pos_c = np.minimum(pos, n - 1)
        hit = sorted_values[pos_c] == x
        return np.where(hit, sorted_labels[pos_c], default)

    return encode


def _categorify_kernel(params, arrays, spec):
    oov = int(spec["special_ids"]["oov"])
    encoders = {
        col: _vocab_lookup(arrays[t["values"]], arrays[t["labels"]], oov) for col, t in params["tables"].items()
    }

    def run(frame: Frame) -> Frame:
        out = dict(frame)
        for c, enc in encoders.items():
            out[c] = enc(frame[c])
        return out

    return run


def _first_seen_kernel(params, arrays, spec):
    tables = {col: (t["output"], arrays[t["ids"]], arrays[t["first"]]) for col, t in params["tables"].items()}

    def run(frame: Frame) -> Frame:
        return {name: first_seen_lookup(ids, first, frame[c]) for c, (name, ids, first) in tables.items()}

    return run


def _udf_kernel(params, arrays, spec):
    name = params["function"]
    if name not in UDFS:
        raise SpecError(f"{SPEC_FILE}: unknown function {name!r} (known: {sorted(UDFS)})")
    f = UDFS[name]
    outputs = list(params["outputs"])
    time_col = params.get("time_col")

    def run(frame: Frame) -> Frame:
        if name in TWO_ARG_UDFS:
            return {c: np.asarray(f(frame[c], frame[time_col])) for c in outputs}
        return {c: np.asarray(f(frame[c])) for c in outputs}

    return run


def _rename_kernel(params, arrays, spec):
    mapping = dict(params["mapping"])  # new -> old

    def run(frame: Frame) -> Frame:
        return {new: frame[old] for new, old in mapping.items()}

    return run


def _groupby_kernel(params, arrays, spec):
    key_col, sep = params["key"], params["sep"]
    plan = [(col, set(aggs)) for col, aggs in params["plan"]]

    def run(frame: Frame) -> Frame:
        g = group_by_first_appearance(frame[key_col])
        out: Frame = {key_col: g.session_ids}
        for col, wanted in plan:
            if col not in frame:
                continue  # e.g. the window index, which serving does not get
            values = frame[col]
            if "list" in wanted:
                out[f"{col}{sep}list"] = Ragged(values[g.row_order], g.starts, g.counts)
            if "count" in wanted:
                out[f"{col}{sep}count"] = g.counts
            if "first" in wanted or "last" in wanted:
                srt = values[g.row_order]
                if "first" in wanted:
                    out[f"{col}{sep}first"] = srt[g.starts]
                if "last" in wanted:
                    out[f"{col}{sep}last"] = srt[g.starts + g.counts - 1]
        return out

    return run


def _list_slice_kernel(params, arrays, spec):
    """ListSlice(-keep): the last `keep` values of every list."""
    keep, cols = int(params["keep"]), list(params["columns"])

    def run(frame: Frame) -> Frame:
        out = dict(frame)
        for c in cols:
            col = frame.get(c)
            if col is None:
                continue
            new_len = np.minimum(col.lengths, keep)
            out[c] = Ragged(col.flat, col.starts + col.lengths - new_len, new_len)
        return out

    return run


KERNELS = {
    "identity": _identity_kernel,
    "categorify": _categorify_kernel,
    "first_seen": _first_seen_kernel,
    "udf": _udf_kernel,
    "rename": _rename_kernel,
    "groupby": _groupby_kernel,
    "list_slice": _list_slice_kernel,
}


# --------------------------------------------------------------------------- #
# Casting and validation of the raw columns
# --------------------------------------------------------------------------- #
def cast_column(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    kind = arr.dtype.kind
    if dtype.kind in "iu":
        if kind in "iu":
            if kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
                bad = arr[arr > np.iinfo(np.int64).max][0]
                raise InputError(f"column {name!r} has value {bad}: expected integers that fit in int64")
            out = arr.astype(np.int64, copy=False)
        elif kind == "f":
            finite = np.isfinite(arr)
            if not finite.all():
                raise InputError(f"column {name!r} has value {arr[~finite][0]}: expected integer ids, not NaN/inf")
            frac = arr != np.floor(arr)
            if frac.any():
                raise InputError(f"column {name!r} has value {arr[frac][0]}: expected integer ids (no fraction)")
            out = arr.astype(np.int64)
        else:
            sample = arr[0] if arr.size else None
            raise InputError(
                f"column {name!r} has dtype {arr.dtype} (e.g. {sample!r}): expected {dtype} "
                "(integer values; bool/str/object cannot be cast safely)"
            )
        if out.size and out.min() < 0:
            raise InputError(f"column {name!r} has value {out[out < 0][0]}: expected non-negative integers")
        return out
    # float features
    if kind not in "fiu":
        sample = arr[0] if arr.size else None
        raise InputError(
            f"column {name!r} has dtype {arr.dtype} (e.g. {sample!r}): expected {dtype} numbers "
            "(bool/str/object cannot be cast safely)"
        )
    out = arr.astype(dtype, copy=False)
    finite = np.isfinite(out)
    if not finite.all():
        raise InputError(f"column {name!r} has value {out[~finite][0]}: expected finite {dtype} numbers")
    return out


# --------------------------------------------------------------------------- #
# The compiled transform
# --------------------------------------------------------------------------- #
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Transform:
    """A compiled workflow: `spec` (JSON-able dict) + `arrays` ({name: np.ndarray}).

    Call it with `{column: 1-D array}` holding `raw_inputs` (extra columns are
    ignored; [N, 1] arrays and safely castable dtypes are accepted). Bad input
    raises `InputError` (a ValueError) naming the column, a sample value and what
    was expected. Calls share no mutable state (thread-safe).
    """

    def __init__(self, spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray]):
        if spec.get("format") != FORMAT:
            raise SpecError(f"{SPEC_FILE} has format {spec.get('format')!r}; this module reads format {FORMAT}")
        self.spec = dict(spec)
        self.arrays = dict(arrays)
        self.raw_inputs: dict[str, np.dtype] = {k: np.dtype(v) for k, v in spec["raw_inputs"].items()}
        self.max_len = int(spec["max_len"])
        self.categorical: dict[str, int] = {k: int(v) for k, v in spec["categorical"].items()}
        self.continuous: list[str] = list(spec["continuous"])
        self.item_list: str = spec["item_list"]
        self.session_col: str = spec["session_col"]
        self.lengths_name: str = spec["lengths"]
        self._steps = []
        for i, step in enumerate(spec["steps"]):
            kind = step["kernel"]
            if kind not in KERNELS:
                raise SpecError(f"{SPEC_FILE}: step {i} has unknown kernel {kind!r} (known: {sorted(KERNELS)})")
            run = KERNELS[kind](step.get("params", {}), self.arrays, spec)
            self._steps.append((tuple(step["parents"]), tuple(step["root_cols"]), run, tuple(step["outputs"])))
        if not self._steps:
            raise SpecError(f"{SPEC_FILE} has no steps")

    # ---- files --------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike) -> Transform:
        """Read folder/workflow.json and the .npy files it names (allow_pickle=False)."""
        folder = os.fspath(folder)
        with open(os.path.join(folder, SPEC_FILE), encoding="utf-8") as f:
            spec = json.load(f)
        arrays = {}
        for name in spec.get("arrays", []):
            if not _ARRAY_NAME.match(name):
                raise SpecError(f"{SPEC_FILE} names an array {name!r}: expected [A-Za-z0-9_.-] only")
            arrays[name] = np.load(os.path.join(folder, ARRAYS_DIR, name + ".npy"), allow_pickle=False)
        return cls(spec, arrays)

    def save(self, folder: str | os.PathLike) -> list[str]:
        """Write workflow.json + workflow_arrays/<name>.npy (deterministic bytes); returns the paths written."""
        folder = os.fspath(folder)
        os.makedirs(os.path.join(folder, ARRAYS_DIR), exist_ok=True)
        written = []
        spec = dict(self.spec, arrays=sorted(self.arrays))
        path = os.path.join(folder, SPEC_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(spec, indent=1, sort_keys=True) + "\n")
        written.append(path)
        for name in sorted(self.arrays):
            if not _ARRAY_NAME.match(name):
                raise SpecError(f"array name {name!r}: expected [A-Za-z0-9_.-] only")
            arr = np.asarray(self.arrays[name])
            if arr.dtype.hasobject:
                raise SpecError(f"array {name!r} has dtype object: only plain numeric arrays are written")
            path = os.path.join(folder, ARRAYS_DIR, name + ".npy")
            np.save(path, arr, allow_pickle=False)
            written.append(path)
        return written

    # ---- public API -----------------------------------------------------------
    def item_vocabulary(self) -> np.ndarray:
        """Raw item id for every encoded id (index = encoded id; -1 for special ids)."""
        t = self.spec["item_table"]
        values, labels = self.arrays[t["values"]], self.arrays[t["labels"]]
        special = self.spec["special_ids"]
        size = max(self.categorical.get(self.item_list, 0), int(labels.max(initial=int(special["oov"]))) + 1)
        vocab = np.full(size, -1, dtype=np.int64)
        vocab[labels] = values
        vocab[[int(special[k]) for k in ("pad", "null", "oov")]] = -1
        return vocab

    def __call__(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        frame = self._validate(columns)
        results: list[Frame] = []
        for parents, root_cols, run, outputs in self._steps:
            merged: Frame = {}
            for p in parents:
                merged.update(results[p])
            for c in root_cols:
                if c in frame:
                    merged[c] = frame[c]
            out = run(merged)
            results.append({c: out[c] for c in outputs if c in out})
        return self._assemble(results[-1])

    def _validate(self, columns: Mapping[str, Any]) -> Frame:
        if not isinstance(columns, Mapping):
            raise InputError(
                f"expected a mapping of column name -> 1-D array with columns {list(self.raw_inputs)}, "
                f"got {type(columns).__name__}"
            )
        frame: Frame = {}
        first_name, n = None, None
        for name, dtype in self.raw_inputs.items():
            if name not in columns:
                raise InputError(
                    f"missing column {name!r}: expected {dtype} values, one per interaction row "
                    f"(required columns: {list(self.raw_inputs)}; got {sorted(map(str, columns))})"
                )
            arr = np.asarray(columns[name])
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise InputError(f"column {name!r} has shape {arr.shape}: expected a 1-D array of {dtype}")
            if n is None:
                first_name, n = name, len(arr)
                if n == 0:
                    raise InputError(f"column {name!r} has zero rows: expected at least one interaction row")
            elif len(arr) != n:
                raise InputError(
                    f"column {name!r} has {len(arr)} values but column {first_name!r} has {n}: "
                    "expected one value per interaction row in every column"
                )
            frame[name] = cast_column(name, arr, dtype)
        return frame

    def _assemble(self, final: Frame) -> dict[str, np.ndarray]:
        out = {self.session_col: np.asarray(final[self.session_col], dtype=np.int64)}
        lengths = None
        for name in [*self.categorical, *self.continuous]:
            col = final[name]
            dtype = np.float32 if name in self.continuous else np.int64
            out[name] = col.padded(self.max_len, dtype)
            if name == self.item_list:
                lengths = np.minimum(col.lengths, self.max_len).astype(np.int64)
        out[self.lengths_name] = lengths
        return out
