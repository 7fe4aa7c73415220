"""The NVTabular workflow (fitted once by `training.prepare`, reused at serving)
and `ServingTransform`, its fast path for small requests.

Graph (column names from `training.names`)::

    [item_id, category] >> Categorify(freq_threshold)    0 pad, 1 null, 2 OOV, real ids from 3
    continuous columns  >> AddMetadata(CONTINUOUS)
        synthetic / --continuous-cols: raw float32 columns (age_days, weekday_sin, ...)
        real logs without them, derived from `timestamp` by ops (serving does the same):
          timestamp >> LambdaOp(weekday_sin) >> Rename("weekday_sin")
          item_id >> ItemFirstSeen(timestamp) >> LambdaOp(item_age_days) >> Rename("age_days")
    all of the above + [session_id, day]
        >> SessionGroupby(session_id): item_id-list, item_id-count, category-list,
                                       <cont>-list, day-first   (lists keep ROW order)
        >> ListSlice(-max_len) on the lists            keeps the LAST max_len interactions
        >> Filter(MinLength(item_id-count >= min_len))

Row order: the groupby keeps the order in which rows arrive (pandas' groupby keeps
row order inside a group; `SessionGroupby` does the same with a stable argsort), so
callers hand rows in time order (`training.ingest` sorts them). NVTabular's stock
`Groupby` without `sort_cols` keeps that order as well (tested); `SessionGroupby`
only replaces its CPU implementation (pandas `agg(list)` calls Python once per
group: ~20 s for 100k rows here) with a vectorised one giving the same frame.

Deviations from the reference ETL, and why:
- `ItemFirstSeen` instead of `JoinGroupby(cont_cols=[timestamp], stats=["min"])`:
  in NVTabular 23.8 that fit fails (KeyError) unless "count" is also requested,
  and then transform fails on any item unseen at fit time (NaN count cast to int).
- Tags are added before the groupby (they propagate to the list columns), so the
  groupby output is selected twice instead of four times: NVTabular's executor
  re-runs the whole graph above a node for every child that selects from it.
  `training.prepare` also transforms with `MemoizingExecutor` (each node once per
  call); the saved workflow keeps NVTabular's own executor.
- `SessionGroupby` drops the categorical tags and properties that stock Groupby
  copies from `item_id` onto the plain integer `item_id-count`.
Test `test_workflow.py::test_matches_the_reference_etl` checks that the output equals
the reference notebook's stock-op workflow, column by column.

`ServingTransform` runs the same fitted graph on numpy arrays for one request
(~10 rows in well under a millisecond, where `Workflow.transform` takes 30-100 ms):
it walks the workflow's nodes and reads each op's fitted state (Categorify's
category files, ItemFirstSeen's table, the LambdaOp functions, ListSlice's length);
there is no second copy of the vocabulary. It keeps sessions of length 1 (the
Filter is for training data only) and right-pads lists to [S, max_len].
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.dag import ColumnSelector, DataFormats, Node
from merlin.dag.executors import LocalExecutor
from merlin.dag.ops.add_metadata import AddMetadata as DagAddMetadata
from merlin.dag.ops.concat_columns import ConcatColumns
from merlin.dag.ops.rename import Rename
from merlin.dag.ops.selection import SelectionOp
from merlin.dag.ops.stat_operator import StatOperator
from merlin.dag.ops.subset_columns import SubsetColumns
from merlin.dag.ops.udf import UDF
from merlin.schema import Tags
from nvtabular import ops
from nvtabular.ops.groupby import _get_agg_dicts

from training.names import (
    AGE_COL,
    CATEGORY_COL,
    DEFAULT_MAX_LEN,
    DEFAULT_MIN_LEN,
    ITEM_COL,
    ITEM_COUNT,
    ITEM_LIST,
    LENGTHS_TENSOR,
    OOV_ID,
    SCHEMA_FILE,
    SESSION_COL,
    SPECIAL_IDS,
    TIME_COL,
    WEEKDAY_COL,
    WINDOW_COL,
    WORKFLOW_DIR,
    list_col,
)

SECONDS_PER_DAY = 86_400
NAME_SEP = "-"  # Groupby's name_sep: item_id -> item_id-list
FIRST_SEEN_COL = f"{ITEM_COL}_{TIME_COL}_min"  # the name JoinGroupby(min) would give


class InputError(ValueError):
    """A serving request the workflow cannot transform (names column, value, expectation)."""


class WorkflowIntegrityError(RuntimeError):
    """The workflow files do not match the sha256 recorded in schema.json."""


class UnsupportedWorkflowError(RuntimeError):
    """The workflow uses an op that `ServingTransform` cannot run."""


# --------------------------------------------------------------------------- #
# Functions used by ops. Module-level so that the pickled workflow refers to them
# by name; written for numpy arrays and pandas Series alike (serving passes arrays).
# --------------------------------------------------------------------------- #
def _like(template, values: np.ndarray):
    if isinstance(template, pd.Series):
        return pd.Series(values, index=template.index, name=template.name)
    return values


def weekday_sin(timestamp):
    """sin(2*pi*weekday/7) of epoch seconds (UTC), weekday 0 = Monday -> float32."""
    days = np.floor_divide(np.asarray(timestamp, dtype=np.int64), SECONDS_PER_DAY)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday (weekday 3)
    return _like(timestamp, np.sin(2.0 * np.pi * weekday / 7.0).astype(np.float32))


def item_age_days(first_seen, frame):
    """Days from the item's first appearance in the fitted data to this interaction
    (float32, >= 0); 0 for items unseen at fit time (first_seen is NaN)."""
    ts = np.asarray(frame[TIME_COL], dtype=np.float64)
    first = np.asarray(first_seen, dtype=np.float64)
    age = (ts - first) / SECONDS_PER_DAY
    age = np.where(np.isnan(age), 0.0, np.maximum(age, 0.0)).astype(np.float32)
    return _like(first_seen, age)


class MinLength:
    """Filter predicate `frame[column] >= min_len` (a picklable callable)."""

    def __init__(self, column: str, min_len: int):
        self.column = column
        self.min_len = int(min_len)

    def __call__(self, frame):
        return frame[self.column] >= self.min_len

    def __repr__(self) -> str:
        return f"MinLength({self.column!r}, {self.min_len})"


# --------------------------------------------------------------------------- #
# Custom ops
# --------------------------------------------------------------------------- #
class ItemFirstSeen(StatOperator):
    """Per item, the smallest `time_col` seen at fit time; NaN for unseen items.

    Output column `<item>_<time>_min` (float64), as JoinGroupby(stats=["min"]) names it.
    The fitted table (sorted ids, first-seen times) is pickled with the workflow.
    """

    def __init__(self, time_col: str = TIME_COL):
        super().__init__()
        self.time_col = time_col
        self.tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def fit(self, col_selector: ColumnSelector, ddf):
        return {c: ddf[[c, self.time_col]].groupby(c)[self.time_col].min() for c in col_selector.names}

    def fit_finalize(self, dask_stats):
        for col, series in dask_stats.items():
            series = series.sort_index()
            self.tables[col] = (
                series.index.to_numpy(dtype=np.int64),
                series.to_numpy(dtype=np.float64),
            )

    def clear(self):
        self.tables = {}

    def lookup(self, col: str, values: np.ndarray) -> np.ndarray:
        ids, first = self.tables[col]
        values = np.asarray(values, dtype=np.int64)
        pos = np.searchsorted(ids, values)
        pos_c = np.minimum(pos, max(len(ids) - 1, 0))
        found = (pos < len(ids)) & (ids[pos_c] == values) if len(ids) else np.zeros(len(values), bool)
        return np.where(found, first[pos_c] if len(ids) else np.nan, np.nan)

    def transform(self, col_selector: ColumnSelector, df):
        out = {self._out_name(c): self.lookup(c, df[c].to_numpy()) for c in col_selector.names}
        return pd.DataFrame(out, index=df.index)

    def _out_name(self, col: str) -> str:
        return f"{col}_{self.time_col}_min"

    def column_mapping(self, col_selector):
        return {self._out_name(c): [c] for c in col_selector.names}

    @property
    def dependencies(self):
        return [self.time_col]

    def compute_selector(self, input_schema, selector, parents_selector, dependencies_selector):
        self._validate_matching_cols(input_schema, parents_selector, "computing input selector")
        return parents_selector

    @property
    def output_dtype(self):
        return np.float64

    def _compute_tags(self, col_schema, input_schema):
        return col_schema  # a plain number, not a categorical id

    def _compute_properties(self, col_schema, input_schema):
        return col_schema


class SessionGroupby(ops.Groupby):
    """`ops.Groupby` with a vectorised pandas path for list/count/first/last.

    Same output as the stock op (rows sorted by key, lists in row order, count
    int32); anything else (cudf, sort_cols, other aggregations, null keys) goes to
    the stock implementation.
    """

    _FAST_CONV = {list, "list", "count"}

    def transform(self, col_selector: ColumnSelector, df):
        if not isinstance(df, pd.DataFrame) or self.sort_cols or not len(df) or len(self.groupby_cols) != 1:
            return super().transform(col_selector, df)
        list_aggs, conv_aggs = _get_agg_dicts(self.groupby_cols, self.list_aggs, self.conv_aggs, col_selector)
        if any(set(aggs) - self._FAST_CONV for aggs in conv_aggs.values()):
            return super().transform(col_selector, df)
        key = df[self.groupby_cols[0]]
        if key.isna().any():
            return super().transform(col_selector, df)

        key = key.to_numpy()
        order = np.argsort(key, kind="stable")  # stable: rows keep their order inside a group
        skey = key[order]
        starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
        ends = np.r_[starts[1:], len(skey)]
        sep = self.name_sep
        out: dict[str, Any] = {self.groupby_cols[0]: skey[starts]}
        for col, aggs in conv_aggs.items():
            series = df[col]
            values = series.to_numpy()[order]
            wanted = set(aggs) | set(list_aggs.get(col, ()))
            if "count" in wanted:
                notnull = series.notna().to_numpy()[order].astype(np.int64)
                out[f"{col}{sep}count"] = np.add.reduceat(notnull, starts).astype(np.int32)
            if "list" in list_aggs.get(col, ()):
                lists = np.empty(len(starts), dtype=object)
                for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
                    lists[i] = values[a:b]  # views; np.split is 10x slower here
                out[f"{col}{sep}list"] = lists
            if "first" in wanted:
                out[f"{col}{sep}first"] = values[starts]
            if "last" in wanted:
                out[f"{col}{sep}last"] = values[ends - 1]
        return pd.DataFrame(out)

    def _agg_of(self, col_name: str) -> str | None:
        for agg in ("count", "nunique", "first", "last", "list", "mean", "sum"):
            if col_name.endswith(f"{self.name_sep}{agg}"):
                return agg
        return None

    # A count is a plain integer: do not copy item_id's tags/properties (categorical,
    # item id, Categorify's domain) onto item_id-count as the stock op does.
    def _compute_tags(self, col_schema, input_schema):
        if self._agg_of(col_schema.name) in ("count", "nunique"):
            return col_schema
        return super()._compute_tags(col_schema, input_schema)

    def _compute_properties(self, col_schema, input_schema):
        if self._agg_of(col_schema.name) in ("count", "nunique"):
            return col_schema
        return super()._compute_properties(col_schema, input_schema)


class MemoizingExecutor(LocalExecutor):
    """LocalExecutor that runs each node once per `transform` call.

    The stock executor re-runs a node's whole upstream graph for every child that
    selects from it (the groupby output feeds the list slice and the scalar columns).
    Results are the same because every op here returns new frames instead of
    mutating its input. The memo is per thread and per call (partitions run in
    parallel threads under Dask).
    """

    _local = threading.local()

    def transform(self, transformable, graph, *args, **kwargs):
        outer = getattr(self._local, "memo", None)
        self._local.memo = {}
        try:
            return super().transform(transformable, graph, *args, **kwargs)
        finally:
            self._local.memo = outer

    def _execute_node(self, node, transformable, capture_dtypes=False, strict=False):
        memo = getattr(self._local, "memo", None)
        if memo is None:
            return super()._execute_node(node, transformable, capture_dtypes, strict)
        key = id(node)
        if key not in memo:
            memo[key] = super()._execute_node(node, transformable, capture_dtypes, strict)
        return memo[key]


def use_memoizing_executor(workflow: nvt.Workflow) -> None:
    """Fit/transform `workflow` with MemoizingExecutor (the pandas path and each Dask partition)."""
    executor = MemoizingExecutor()
    executor.target_format = DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME  # as DaskExecutor sets it
    workflow.executor._executor = executor


def use_stock_executor(workflow: nvt.Workflow) -> None:
    """Back to NVTabular's executor (call before `Workflow.save`)."""
    executor = LocalExecutor()
    executor.target_format = DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME
    workflow.executor._executor = executor


def transform_frame(workflow: nvt.Workflow, frame: pd.DataFrame) -> pd.DataFrame:
    """`workflow.transform(frame)` for a pandas frame, each node run once."""
    if not workflow.graph.output_schema:
        raise ValueError("the workflow is not fitted")
    return MemoizingExecutor().transform(frame, workflow.output_node, workflow.output_dtypes)


# --------------------------------------------------------------------------- #
# Building the workflow
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class WorkflowSpec:
    """What the workflow is built from; `training.prepare` fills it from the data."""

    has_category: bool = True
    continuous: tuple[str, ...] = ()  # raw continuous columns given by the data
    derive_from_timestamp: bool = False  # add weekday_sin/age_days ops on `timestamp`
    max_len: int = DEFAULT_MAX_LEN
    min_len: int = DEFAULT_MIN_LEN
    freq_threshold: int = 0

    @property
    def categorical(self) -> tuple[str, ...]:
        return (ITEM_COL, CATEGORY_COL) if self.has_category else (ITEM_COL,)

    @property
    def continuous_features(self) -> tuple[str, ...]:
        """Names of the continuous features before grouping."""
        if self.continuous:
            return self.continuous
        return (AGE_COL, WEEKDAY_COL) if self.derive_from_timestamp else ()

    def raw_inputs(self) -> dict[str, str]:
        """Raw columns (numpy dtype names) the workflow needs at serving time, in order."""
        cols = {SESSION_COL: "int64", ITEM_COL: "int64"}
        if self.has_category:
            cols[CATEGORY_COL] = "int64"
        for c in self.continuous:
            cols[c] = "float32"
        if not self.continuous and self.derive_from_timestamp:
            cols[TIME_COL] = "int64"
        return cols

    def input_columns(self) -> list[str]:
        """Columns the workflow reads at fit time: raw inputs plus the window index."""
        return [*self.raw_inputs(), WINDOW_COL]


def build_workflow(spec: WorkflowSpec, stats_dir: str | os.PathLike) -> nvt.Workflow:
    """The (unfitted) workflow. `stats_dir` receives Categorify's category files at fit."""
    if spec.max_len < 1 or spec.min_len < 1:
        raise ValueError(f"max_len and min_len must be >= 1, got {spec.max_len}, {spec.min_len}")
    # Tag the raw item column: the tags survive Categorify, the groupby and ListSlice,
    # and one Categorify node (not one per selected column) runs per transform.
    cat_inputs = [ITEM_COL] >> ops.TagAsItemID()
    if spec.has_category:
        cat_inputs = cat_inputs + [CATEGORY_COL]
    features = cat_inputs >> ops.Categorify(freq_threshold=spec.freq_threshold, out_path=str(stats_dir))
    conts = None
    if spec.continuous:
        conts = list(spec.continuous)
    elif spec.derive_from_timestamp:
        weekday = [TIME_COL] >> ops.LambdaOp(weekday_sin, dtype=np.float32) >> Rename(name=WEEKDAY_COL)
        age = (
            [ITEM_COL]
            >> ItemFirstSeen(TIME_COL)
            >> ops.LambdaOp(item_age_days, dependency=[TIME_COL], dtype=np.float32)
            >> Rename(name=AGE_COL)
        )
        conts = age + weekday
    if conts is not None:
        features = features + (conts >> ops.AddMetadata(tags=[Tags.CONTINUOUS]))

    aggs: dict[str, list[str]] = {ITEM_COL: ["list", "count"], WINDOW_COL: ["first"]}
    if spec.has_category:
        aggs[CATEGORY_COL] = ["list"]
    for c in spec.continuous_features:
        aggs[c] = ["list"]
    grouped = (features + [SESSION_COL, WINDOW_COL]) >> SessionGroupby(
        groupby_cols=[SESSION_COL], aggs=aggs, name_sep=NAME_SEP
    )
    lists = [list_col(c) for c in (*spec.categorical, *spec.continuous_features)]
    sliced = grouped[lists] >> ops.ListSlice(-spec.max_len)
    scalars = grouped[SESSION_COL, f"{WINDOW_COL}{NAME_SEP}first", ITEM_COUNT]
    return nvt.Workflow((scalars + sliced) >> ops.Filter(f=MinLength(ITEM_COUNT, spec.min_len)))


def feature_columns(workflow: nvt.Workflow) -> tuple[dict[str, int], list[str]]:
    """({categorical list feature: cardinality}, [continuous list features]) of a fitted workflow."""
    categorical, continuous = {}, []
    for col in workflow.output_schema:
        if Tags.LIST not in col.tags:
            continue
        if Tags.CATEGORICAL in col.tags:
            domain = col.properties.get("domain") or {}
            categorical[col.name] = int(domain["max"]) + 1
        elif Tags.CONTINUOUS in col.tags:
            continuous.append(col.name)
    return categorical, continuous


def workflow_sha256(data_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under DATA/workflow, keyed by path relative to DATA."""
    data_dir = Path(data_dir)
    out = {}
    for path in sorted((data_dir / WORKFLOW_DIR).rglob("*")):
        if path.is_file():
            out[path.relative_to(data_dir).as_posix()] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_workflow_files(data_dir: str | os.PathLike, schema: Mapping) -> None:
    """Raise WorkflowIntegrityError unless every workflow file matches schema.json."""
    data_dir = Path(data_dir)
    expected = schema.get("workflow_sha256") or {}
    if f"{WORKFLOW_DIR}/workflow.pkl" not in expected:
        raise WorkflowIntegrityError(
            f"{data_dir / SCHEMA_FILE} lists no sha256 for {WORKFLOW_DIR}/workflow.pkl: "
            "refusing to unpickle an unverified workflow; re-run python -m training.prepare"
        )
    actual = workflow_sha256(data_dir)
    for rel, want in expected.items():
        got = actual.get(rel)
        if got is None:
            raise WorkflowIntegrityError(
                f"workflow file {data_dir / rel} is missing (listed in {SCHEMA_FILE}); "
                "copy the whole DATA/workflow folder together with schema.json"
            )
        if got != want:
            raise WorkflowIntegrityError(
                f"workflow file {data_dir / rel} has sha256 {got}, but {SCHEMA_FILE} expects {want}: "
                "the workflow was modified or belongs to another schema.json; "
                "refusing to load it (re-run python -m training.prepare)"
            )
    for rel in actual:
        if rel.endswith(".pkl") and rel not in expected:
            raise WorkflowIntegrityError(f"unexpected pickle {data_dir / rel} not listed in {SCHEMA_FILE}")


# --------------------------------------------------------------------------- #
# Serving fast path
# --------------------------------------------------------------------------- #
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
        uniq, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
        by_first = np.argsort(first_idx, kind="stable")
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[by_first] = np.arange(len(uniq))
        session = rank[inverse]
        order = np.argsort(session, kind="stable")
        counts = np.bincount(session, minlength=len(uniq))
        return cls(uniq[by_first], order, np.cumsum(counts) - counts, counts)

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

    def __init__(self, workflow: nvt.Workflow, schema: Mapping):
        self.workflow = workflow
        self.schema = dict(schema)
        self.raw_inputs: dict[str, np.dtype] = {k: np.dtype(v) for k, v in schema["raw_inputs"].items()}
        self.max_len = int(schema["max_sequence_length"])
        self.categorical: dict[str, int] = dict(schema["categorical"])
        self.continuous: list[str] = list(schema["continuous"])
        self.item_list: str = schema.get("item_list", ITEM_LIST)
        missing = {*self.categorical, *self.continuous} - set(workflow.output_schema.column_names)
        if missing:
            raise WorkflowIntegrityError(
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
        try:
            schema = json.loads(schema_path.read_text())
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{schema_path} not found: point ServingTransform.load at a DATA folder "
                "written by python -m training.prepare (schema.json + workflow/)"
            ) from e
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
            "extend training/workflow.py:ServingTransform._kernel"
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


__all__ = [
    "InputError",
    "ItemFirstSeen",
    "MemoizingExecutor",
    "MinLength",
    "ServingTransform",
    "SessionGroupby",
    "UnsupportedWorkflowError",
    "WorkflowIntegrityError",
    "WorkflowSpec",
    "build_workflow",
    "feature_columns",
    "transform_frame",
    "item_age_days",
    "verify_workflow_files",
    "weekday_sin",
    "workflow_sha256",
]
