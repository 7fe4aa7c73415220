"""`ServingTransform`: the fitted NVTabular workflow's transform for one request, in numpy.

It runs the same fitted graph as `Workflow.transform` on numpy arrays (~10 rows
in well under a millisecond, where `Workflow.transform` takes 30-100 ms): it walks
the workflow's nodes and reads each op's fitted state (Categorify's category
files, ItemFirstSeen's table, the LambdaOp functions, ListSlice's length); there
is no second copy of the vocabulary. It keeps sessions of length 1 (the Filter is
for training data only) and right-pads lists to [S, max_len]. Rows are grouped
into sessions by `training.grouping.group_by_first_appearance`.

Parity with `Workflow.transform` is tested in tests/test_workflow.py and
tests/test_preprocess_properties.py; the contract is in docs/contracts.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.dag import ColumnSelector, Node
from merlin.dag.ops.add_metadata import AddMetadata as DagAddMetadata
from merlin.dag.ops.concat_columns import ConcatColumns
from merlin.dag.ops.rename import Rename
from merlin.dag.ops.selection import SelectionOp
from merlin.dag.ops.subset_columns import SubsetColumns
from merlin.dag.ops.udf import UDF
from nvtabular import ops
from nvtabular.ops.groupby import _get_agg_dicts

from training.grouping import group_by_first_appearance
from training.integrity import IntegrityError
from training.names import (
    ITEM_COL,
    LENGTHS_TENSOR,
    OOV_ID,
    SCHEMA_FILE,
    SESSION_COL,
    SPECIAL_IDS,
    WORKFLOW_DIR,
)
from training.schema import Schema
from training.workflow import verify_workflow_files
from training.workflow_ops import ItemFirstSeen, MinLength


class InputError(ValueError):
    """A serving request the workflow cannot transform (names column, value, expectation)."""


class UnsupportedWorkflowError(RuntimeError):
    """The workflow uses an op that `ServingTransform` cannot run."""


class _Ragged:
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


Frame = dict  # column name -> np.ndarray [N] (rows) | np.ndarray [S] | _Ragged


@dataclass
class _Step:
    key: int  # id() of the node
    parents: tuple[int, ...]
    root_cols: tuple[str, ...]
    kernel: Callable[[Frame], Frame]
    outputs: tuple[str, ...]


@dataclass
class _Grouping:
    """Rows -> sessions for one request: sessions in order of first appearance."""

    session_ids: np.ndarray  # [S]
    row_order: np.ndarray  # [N] rows sorted by session, stable (row order kept inside a session)
    starts: np.ndarray  # [S] first position of each session in row_order
    counts: np.ndarray  # [S]

    @classmethod
    def of(cls, keys: np.ndarray) -> _Grouping:
        return cls(*group_by_first_appearance(keys))

    def lists(self, values: np.ndarray) -> _Ragged:
        return _Ragged(values[self.row_order], self.starts, self.counts)


def _vocab_lookup(values: np.ndarray, labels: np.ndarray, default: int) -> Callable[[np.ndarray], np.ndarray]:
    """Encoder raw value -> label via binary search on the sorted vocabulary."""
    order = np.argsort(values, kind="stable")
    sorted_values = np.ascontiguousarray(values[order])
    sorted_labels = np.ascontiguousarray(labels[order])
    n = len(sorted_values)

    def encode(x: np.ndarray) -> np.ndarray:
        if n == 0:
            return np.full(len(x), default, dtype=np.int64)
        pos = np.searchsorted(sorted_values, x)
        pos_c = np.minimum(pos, n - 1)
        hit = sorted_values[pos_c] == x
        return np.where(hit, sorted_labels[pos_c], default)

    return encode


def _categorify_tables(op: ops.Categorify, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw values, encoded labels) of one Categorify column, from its fitted category file."""
    if op.num_buckets or op.single_table or op.encode_type != "joint" or op.max_size:
        raise UnsupportedWorkflowError(
            f"ServingTransform supports Categorify without num_buckets/max_size/single_table (column {col})"
        )
    storage = op.storage_name.get(col, col)
    table = pd.read_parquet(op.categories[storage], columns=[storage])
    labels = table.index.to_numpy(dtype=np.int64)
    if len(labels) and labels[0] < OOV_ID + 1:  # same correction as Categorify's _encode
        labels = labels + OOV_ID + 1
    values = table[storage]
    keep = values.notna().to_numpy()
    return values.to_numpy()[keep].astype(np.int64), labels[keep]


class ServingTransform:
    """The fitted workflow's transform for one request of raw interaction rows.

    `ServingTransform.load(data_dir)` reads `schema.json`, checks the sha256 of the
    workflow files, loads the workflow and compiles its graph into numpy kernels.
    Call it with `{column: 1-D array}` holding `raw_inputs` (extra columns are
    ignored; [N, 1] arrays and safely castable dtypes are accepted); it returns
    `session_id` [S] int64 (order of first appearance), every list feature as
    [S, max_len] (categorical int64, continuous float32; the last <= max_len
    interactions in row order, right-padded with 0) and `lengths` [S] int64 (>= 1).
    Bad input raises `InputError` (a ValueError) naming the column, a sample value
    and what was expected. Calls share no mutable state (thread-safe).
    """

    def __init__(self, workflow: nvt.Workflow, schema: Schema | Mapping):
        self.workflow = workflow
        schema = Schema.of(schema)
        self.schema = schema.to_dict()  # schema.json's object, as before (the attributes below are typed)
        self.raw_inputs: dict[str, np.dtype] = {k: np.dtype(v) for k, v in schema.raw_inputs.items()}
        self.max_len = schema.max_len
        self.categorical: dict[str, int] = dict(schema.categorical)
        self.continuous: list[str] = list(schema.continuous)
        self.item_list: str = schema.item_feature
        missing = {*self.categorical, *self.continuous} - set(workflow.output_schema.column_names)
        if missing:
            raise IntegrityError(
                f"schema.json lists features {sorted(missing)} that the workflow does not produce "
                f"(it produces {workflow.output_schema.column_names})"
            )
        self._item_categorify: tuple[np.ndarray, np.ndarray] | None = None
        self._steps = self._compile(workflow.output_node)
        if self._item_categorify is None:
            raise UnsupportedWorkflowError("the workflow has no Categorify op for item_id")

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> ServingTransform:
        data_dir = Path(data_dir)
        schema_path = data_dir / SCHEMA_FILE
        if not schema_path.is_file():
            raise FileNotFoundError(
                f"{schema_path} not found: point ServingTransform.load at a DATA folder "
                "written by python -m training.prepare (schema.json + workflow/)"
            )
        schema = Schema.load(data_dir)
        verify_workflow_files(data_dir, schema)
        workflow = nvt.Workflow.load(str(data_dir / WORKFLOW_DIR))
        return cls(workflow, schema)

    # ---- public API ------------------------------------------------------ #
    def item_vocabulary(self) -> np.ndarray:
        """Raw item id for every encoded id (index = encoded id; -1 for special ids)."""
        values, labels = self._item_categorify
        size = max(self.categorical.get(self.item_list, 0), int(labels.max(initial=OOV_ID)) + 1)
        vocab = np.full(size, -1, dtype=np.int64)
        vocab[labels] = values
        vocab[list(SPECIAL_IDS)] = -1
        return vocab

    def __call__(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        frame = self._validate(columns)
        results: dict[int, Frame] = {}
        for step in self._steps:
            merged: Frame = {}
            for p in step.parents:
                merged.update(results[p])
            for c in step.root_cols:
                if c in frame:
                    merged[c] = frame[c]
            out = step.kernel(merged)
            results[step.key] = {c: out[c] for c in step.outputs if c in out}
        final = results[self._steps[-1].key]
        return self._assemble(final)

    # ---- validation ------------------------------------------------------ #
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
            frame[name] = _cast(name, arr, dtype)
        return frame

    # ---- output ---------------------------------------------------------- #
    def _assemble(self, final: Frame) -> dict[str, np.ndarray]:
        sessions = final[SESSION_COL]
        out = {SESSION_COL: np.asarray(sessions, dtype=np.int64)}
        lengths = None
        for name in [*self.categorical, *self.continuous]:
            col = final[name]
            dtype = np.float32 if name in self.continuous else np.int64
            out[name] = col.padded(self.max_len, dtype)
            if name == self.item_list:
                lengths = np.minimum(col.lengths, self.max_len).astype(np.int64)
        out[LENGTHS_TENSOR] = lengths
        return out

    # ---- compiling the graph --------------------------------------------- #
    def _compile(self, output_node: Node) -> list[_Step]:
        steps: list[_Step] = []
        seen: set[int] = set()
        grouping_box: dict[str, _Grouping] = {}

        def visit(node: Node) -> None:
            if id(node) in seen:
                return
            parents = node.parents_with_dependencies
            for p in parents:
                visit(p)
            produced = set()
            for p in parents:
                produced.update(p.output_schema.column_names)
            wanted = set(node.input_schema.column_names) | set(node.dependency_columns.names)
            root_cols = tuple(sorted(wanted - produced))
            selection = (
                node.input_columns.resolve(node.input_schema).names if node.input_schema is not None else []
            )
            kernel = self._kernel(node, list(selection), grouping_box)
            steps.append(
                _Step(
                    key=id(node),
                    parents=tuple(id(p) for p in parents),
                    root_cols=root_cols,
                    kernel=kernel,
                    outputs=tuple(node.output_schema.column_names),
                )
            )
            seen.add(id(node))

        visit(output_node)
        return steps

    def _kernel(self, node: Node, sel: list[str], grouping_box: dict) -> Callable[[Frame], Frame]:
        op = node.op
        if op is None or isinstance(op, (ops.AddMetadata, DagAddMetadata)):
            return _identity
        if isinstance(op, (SelectionOp, ConcatColumns, SubsetColumns)):
            return _identity  # the step keeps node.output_schema's columns
        if isinstance(op, ops.Categorify):
            encoders = {}
            for c in sel:
                values, labels = _categorify_tables(op, c)
                encoders[c] = _vocab_lookup(values, labels, OOV_ID)
                if c == ITEM_COL:
                    self._item_categorify = (values, labels)
            return _categorify_kernel(encoders)
        if isinstance(op, ItemFirstSeen):
            return _first_seen_kernel(op, sel)
        if isinstance(op, UDF):
            outputs = list(node.output_schema.column_names)
            return _udf_kernel(op, outputs)
        if isinstance(op, Rename):
            mapping = {new: old[0] for new, old in op.column_mapping(ColumnSelector(sel)).items()}
            return _rename_kernel(mapping)
        if isinstance(op, ops.Groupby):
            return _groupby_kernel(op, sel)
        if isinstance(op, ops.ListSlice):
            if not (op.start < 0 and op.end == np.iinfo(np.int64).max and not op.pad):
                raise UnsupportedWorkflowError(
                    f"ServingTransform supports ListSlice(-n) only, got start={op.start} end={op.end}"
                )
            return _list_slice_kernel(-op.start, sel)
        if isinstance(op, ops.Filter):
            if not isinstance(op.f, MinLength):
                raise UnsupportedWorkflowError(f"ServingTransform supports Filter(MinLength) only, got {op.f!r}")
            return _identity  # serving keeps short sessions (a one-click session gets a ranking)
        if isinstance(op, ops.ValueCount):
            return _identity
        raise UnsupportedWorkflowError(
            f"ServingTransform cannot run op {type(op).__name__} (node {node.label}); "
            "extend training/serving_transform.py:ServingTransform._kernel"
        )


def _cast(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
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


def _identity(frame: Frame) -> Frame:
    return frame


def _categorify_kernel(encoders: dict[str, Callable]) -> Callable[[Frame], Frame]:
    def run(frame: Frame) -> Frame:
        out = dict(frame)
        for c, enc in encoders.items():
            out[c] = enc(frame[c])
        return out

    return run


def _first_seen_kernel(op: ItemFirstSeen, sel: list[str]) -> Callable[[Frame], Frame]:
    names = {c: op._out_name(c) for c in sel}

    def run(frame: Frame) -> Frame:
        return {names[c]: op.lookup(c, frame[c]) for c in sel}

    return run


def _udf_kernel(op: UDF, outputs: list[str]) -> Callable[[Frame], Frame]:
    two_args = op._param_count == 2

    def run(frame: Frame) -> Frame:
        out = {}
        for c in outputs:
            out[c] = np.asarray(op.f(frame[c], frame) if two_args else op.f(frame[c]))
        return out

    return run


def _rename_kernel(mapping: dict[str, str]) -> Callable[[Frame], Frame]:
    def run(frame: Frame) -> Frame:
        return {new: frame[old] for new, old in mapping.items()}

    return run


def _groupby_kernel(op: ops.Groupby, sel: list[str]) -> Callable[[Frame], Frame]:
    if op.sort_cols or len(op.groupby_cols) != 1:
        raise UnsupportedWorkflowError("ServingTransform supports Groupby on one column without sort_cols")
    key_col = op.groupby_cols[0]
    list_aggs, conv_aggs = _get_agg_dicts(op.groupby_cols, op.list_aggs, op.conv_aggs, ColumnSelector(sel))
    sep = op.name_sep
    plan = []
    for col, aggs in conv_aggs.items():
        wanted = {a for a in aggs if a is not list} | set(list_aggs.get(col, ()))
        unknown = wanted - {"list", "count", "first", "last"}
        if unknown:
            raise UnsupportedWorkflowError(f"ServingTransform: unsupported Groupby aggregation {unknown} on {col}")
        plan.append((col, wanted))

    def run(frame: Frame) -> Frame:
        g = _Grouping.of(frame[key_col])
        out: Frame = {key_col: g.session_ids}
        for col, wanted in plan:
            if col not in frame:
                continue  # e.g. the window index, which serving does not get
            values = frame[col]
            if "list" in wanted:
                out[f"{col}{sep}list"] = g.lists(values)
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


def _list_slice_kernel(keep: int, sel: list[str]) -> Callable[[Frame], Frame]:
    """ListSlice(-keep): the last `keep` values of every list."""

    def run(frame: Frame) -> Frame:
        out = dict(frame)
        for c in sel:
            col = frame.get(c)
            if col is None:
                continue
            new_len = np.minimum(col.lengths, keep)
            out[c] = _Ragged(col.flat, col.starts + col.lengths - new_len, new_len)
        return out

    return run
