"""Custom NVTabular ops and executors of the sessrec workflow (built in `training.data.workflow`).

- `weekday_sin`, `item_age_days`: LambdaOp functions deriving continuous features
  from `timestamp` (numpy arrays and pandas Series alike). Their math lives in
  `training.data.sessrec_transform` (the module the served preprocess step runs); these
  wrappers are what pickled workflows refer to by name.
- `MinLength`: the Filter predicate `item_id-count >= min_len`.
- `ItemFirstSeen`: per item, the first timestamp seen at fit time (replaces
  JoinGroupby(min), see `training.data.workflow`'s docstring for why).
- `SessionGroupby`: `ops.Groupby` with a vectorised pandas path.
- `MemoizingExecutor` (+ `use_memoizing_executor` / `use_stock_executor`): each
  node once per transform call.

Everything here is pickled with a fitted workflow by reference
(`training.data.workflow_ops.<name>`). Workflows pickled earlier name the same objects
`training.workflow_ops.<name>` (before issue 16) or `training.workflow.<name>` (before
this module existed): `training.MOVED` imports those names as this module and as
`training.data.workflow` (which re-exports these names), so old DATA folders still load.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.dag import ColumnSelector, DataFormats
from merlin.dag.executors import LocalExecutor
from merlin.dag.ops.stat_operator import StatOperator
from nvtabular import ops
from nvtabular.ops.groupby import _get_agg_dicts

from training.data import sessrec_transform
from training.data.sessrec_transform import SECONDS_PER_DAY  # noqa: F401  (re-exported by training.data.workflow)
from training.names import TIME_COL


# --------------------------------------------------------------------------- #
# Functions used by ops. Module-level so that the pickled workflow refers to them
# by name; written for numpy arrays and pandas Series alike (serving passes arrays).
# --------------------------------------------------------------------------- #
def _like(template, values: np.ndarray):
    if isinstance(template, pd.Series):
        return pd.Series(values, index=template.index, name=template.name)
    return values


def weekday_sin(timestamp):
    """sin(2*pi*weekday/7) of epoch seconds (UTC), weekday 0 = Monday -> float32.

    The math is `training.data.sessrec_transform.weekday_sin` (the code the served
    preprocess step runs); this wrapper keeps pandas Series as Series."""
    return _like(timestamp, sessrec_transform.weekday_sin(np.asarray(timestamp)))


def item_age_days(first_seen, frame):
    """Days from the item's first appearance in the fitted data to this interaction
    (float32, >= 0); 0 for items unseen at fit time (first_seen is NaN).
    The math is `training.data.sessrec_transform.item_age_days`."""
    return _like(
        first_seen, sessrec_transform.item_age_days(np.asarray(first_seen), np.asarray(frame[TIME_COL]))
    )


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
        return sessrec_transform.first_seen_lookup(ids, first, values)

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
    executor.target_format = (
        DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME
    )  # as DaskExecutor sets it
    workflow.executor._executor = executor


def use_stock_executor(workflow: nvt.Workflow) -> None:
    """Back to NVTabular's executor (call before `Workflow.save`)."""
    executor = LocalExecutor()
    executor.target_format = DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME
    workflow.executor._executor = executor
