"""Load the prepared session splits (DATA/sessions_by_day/<w>/<split>.parquet)
into padded tensors, with validation that names the file and the column.

    from training.data.splits import load_split, split_path
    from training.schema import Schema
    schema = Schema.load("data/synthetic")
    st = load_split(split_path("data/synthetic", 3, "train"), schema)
    st.feats["item_id-list"]  # (N, L) int64, right-padded with 0
    st.lengths                # (N,) int64

Imports only torch, numpy and pyarrow (see docs/contracts.md for the format).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from training.names import ITEM_LIST, SESSION_COL, SESSIONS_DIR
from training.schema import DataError, Schema

__all__ = [
    "DataError",
    "SessionTensors",
    "available_windows",
    "eval_inputs_targets",
    "load_schema",
    "load_split",
    "split_path",
]


def load_schema(data_dir: str | Path) -> dict[str, Any]:
    """DATA/schema.json as a dict (checked like `Schema.load`, which new code uses).

    Kept for training/train.py and training/tune.py, which still take the dict."""
    return Schema.load(data_dir).to_dict()


def split_path(data_dir: str | Path, window: int, split: str) -> Path:
    return Path(data_dir) / SESSIONS_DIR / str(window) / f"{split}.parquet"


def available_windows(data_dir: str | Path, schema: Schema | Mapping[str, Any] | None = None) -> list[int]:
    windows = Schema.of(schema).windows if schema is not None else None
    if windows is not None:
        return list(windows)
    root = Path(data_dir) / SESSIONS_DIR
    return (
        sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
        if root.is_dir()
        else []
    )


@dataclass
class SessionTensors:
    """N right-padded sessions: feats[name] is (N, L), lengths is (N,) (1 <= lengths <= L)."""

    feats: dict[str, Tensor]
    lengths: Tensor
    session_id: Tensor
    source: str = ""

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def select(self, idx: Tensor) -> SessionTensors:
        return SessionTensors(
            {k: v[idx] for k, v in self.feats.items()}, self.lengths[idx], self.session_id[idx], self.source
        )

    def batch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """A training batch: rows `idx` trimmed to their longest session (padding never changes
        the result): (feats {name: (b, width)}, lengths (b,))."""
        lengths = self.lengths[idx]
        width = int(lengths.max())
        return {k: v[idx, :width] for k, v in self.feats.items()}, lengths

    def prefixes(self, whole: bool = True) -> SessionTensors:
        """Every prefix of two or more items of every session (a session of n items gives n - 1; with
        whole=False the session itself left out: n - 2), in session order, shortest first; positions
        past a prefix's length are zeroed (padding). Stacking masks each at its last item
        (TrainConfig.stack_prefixes): the evaluation's task, the whole context before the target, at
        every position of the session."""
        return self.heads(*self.prefix_rows(whole))

    def prefix_rows(self, whole: bool = True) -> tuple[Tensor, Tensor]:
        """`prefixes`' (P,) rows and (P,) lengths, for `heads`."""
        n = (self.lengths - (1 if whole else 2)).clamp(min=0)  # (N,) prefixes per session
        idx = torch.repeat_interleave(torch.arange(len(self)), n)  # (P,)
        first = torch.cumsum(n, 0) - n  # (N,) where each session's prefixes start
        return idx, torch.arange(len(idx)) - first[idx] + 2  # lengths 2 ..

    def heads(self, rows: Tensor, lengths: Tensor) -> SessionTensors:
        """(P,) rows, (P,) lengths -> row rows[i]'s first lengths[i] positions, the others zeroed (padding)."""
        feats = {}
        for k, v in self.feats.items():
            keep = torch.arange(v.shape[1])[None, :] < lengths[:, None]  # (P, L)
            feats[k] = torch.where(keep, v[rows], torch.zeros((), dtype=v.dtype))
        return SessionTensors(feats, lengths, self.session_id[rows], self.source)


def _list_column(table: pa.Table, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (offsets (N+1,) starting at 0, flat values)."""
    col = table.column(name)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise DataError(
            f"{path}: column {name!r} has type {col.type}, expected a list column (one list per session)"
        )
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: column {name!r} holds a null list (row {row}); every session needs a list")
    values = arr.flatten()
    if values.null_count:
        raise DataError(f"{path}: column {name!r} holds {values.null_count} null values inside its lists")
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


def load_split(path: str | Path, schema: Schema | Mapping[str, Any]) -> SessionTensors:
    """Read one split file into padded tensors, checking it against the schema.

    Raises DataError naming the file and the column for: a missing or corrupt
    file, a missing feature, lists of different lengths across features, an
    empty or over-long list, ids outside the feature's vocabulary, non-finite
    continuous values.
    """
    path = Path(path)
    schema = Schema.of(schema)
    categorical, continuous, max_len = schema.categorical, list(schema.continuous), schema.max_len
    if not path.is_file():
        raise DataError(
            f"{path} does not exist (each window must hold train/valid/test.parquet, see docs/contracts.md)"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path}: cannot read the parquet file ({type(e).__name__}: {e}); re-run training.prepare"
        ) from e
    needed = [*categorical, *continuous]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: column(s) {missing} missing; the model needs {needed} (from schema.json), "
            f"the file has {table.column_names}"
        )
    n = table.num_rows
    lengths: np.ndarray | None = None
    feats: dict[str, Tensor] = {}
    for name in needed:
        offsets, values = _list_column(table, name, path)
        lens = np.diff(offsets)
        if lengths is None:
            lengths = lens
            if n and lens.min() < 1:
                raise DataError(f"{path}: column {name!r} has an empty list at row {int(np.argmin(lens))}")
            if n and lens.max() > max_len:
                raise DataError(
                    f"{path}: column {name!r} has a list of {int(lens.max())} items at row {int(np.argmax(lens))}, "
                    f"more than max_sequence_length={max_len} in schema.json"
                )
        elif not np.array_equal(lens, lengths):
            row = int(np.flatnonzero(lens != lengths)[0])
            raise DataError(
                f"{path}: column {name!r} has {int(lens[row])} values at row {row} but {needed[0]!r} has "
                f"{int(lengths[row])}; all list features of a session must have the same length"
            )
        if name in categorical:
            if values.size and not np.issubdtype(values.dtype, np.integer):
                raise DataError(
                    f"{path}: column {name!r} holds {values.dtype} values, expected integer encoded ids"
                )
            values = values.astype(np.int64, copy=False)
            card = categorical[name]
            bad = (values < 0) | (values >= card)
            if bad.any():
                raise DataError(
                    f"{path}: column {name!r} holds id {int(values[bad][0])} outside the vocabulary [0, {card}) "
                    f"of schema.json ({int(bad.sum())} bad values); was the split written by another workflow?"
                )
            dtype = np.int64
        else:
            values = values.astype(np.float32, copy=False)
            if values.size and not np.isfinite(values).all():
                raise DataError(f"{path}: column {name!r} holds non-finite values (NaN or inf)")
            dtype = np.float32
        padded = np.zeros((n, max_len), dtype=dtype)  # (N, L) right-padded with 0
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(values.size) - np.repeat(offsets[:-1], lens)
        padded[rows, cols] = values
        feats[name] = torch.from_numpy(padded)
    assert lengths is not None
    if SESSION_COL in table.column_names:
        sid = torch.from_numpy(
            np.array(table.column(SESSION_COL).to_numpy(zero_copy_only=False), dtype=np.int64)
        )
    else:
        sid = torch.arange(n, dtype=torch.int64)
    return SessionTensors(feats, torch.from_numpy(lengths.astype(np.int64)), sid, str(path))


def eval_inputs_targets(
    st: SessionTensors, item_feature: str = ITEM_LIST
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Evaluation protocol: the input is every item but the last, the target is the last item.

    Returns (feats with the last position of every session zeroed (pad), input lengths =
    lengths - 1 (may be 0 for a one-click session), targets (N,)).
    """
    n, L = st.feats[item_feature].shape
    rows = torch.arange(n)
    last = st.lengths - 1  # (N,)
    targets = st.feats[item_feature][rows, last]  # (N,)
    keep = torch.arange(L)[None, :] < last[:, None]  # (N, L)
    feats = {k: v * keep.to(v.dtype) for k, v in st.feats.items()}
    return feats, last.clone(), targets


def newest(parts: list[SessionTensors], budget: int) -> list[SessionTensors]:
    """The newest sessions of `parts` (oldest window first, the last one whole), at most `budget`
    in all unless the last part alone holds more (0 = all): earlier windows are taken newest
    first, and of the oldest one taken only its last rows (a split's rows are in session-id order,
    which follows time in the logs seen here)."""
    if budget <= 0 or not parts:
        return parts
    out, left = [parts[-1]], budget - len(parts[-1])
    for p in reversed(parts[:-1]):
        if left <= 0:
            break
        out.insert(0, p if len(p) <= left else p.select(torch.arange(len(p) - left, len(p))))
        left -= len(p)
    return out


def concat_sessions(parts: list[SessionTensors]) -> SessionTensors:
    """Sessions of several splits in one SessionTensors (padded to the widest)."""
    parts = [p for p in parts if len(p)]
    width = max(next(iter(p.feats.values())).shape[1] for p in parts)

    def pad(v: Tensor) -> Tensor:
        return torch.nn.functional.pad(v, (0, width - v.shape[1]))

    return SessionTensors(
        {k: torch.cat([pad(p.feats[k]) for p in parts]) for k in parts[0].feats},
        torch.cat([p.lengths for p in parts]),
        torch.cat([p.session_id for p in parts]),
        parts[-1].source,
    )
