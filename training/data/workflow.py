"""The NVTabular workflow: fitted once by `training.prepare`, reused at serving.

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
callers hand rows in time order (`training.data.ingest` sorts them). NVTabular's stock
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

Ids follow first appearance (issue 12): `training.prepare` hands `build_workflow`
the vocabulary of every categorical column in the order `first_seen_vocabulary`
gives (the window of the value's session, then time, then row order), so the
values known after window t are exactly the id prefix [0, known(t)) and a refit
on the log up to window t gives every value it knows the same id. schema.json
records known(t) per window and feature ("vocabulary_by_window").

This module builds and checks the workflow: `WorkflowSpec` -> `build_workflow`,
`feature_columns` of a fitted one, `workflow_sha256` / `verify_workflow_files`
(the sha256 record in schema.json), `transform_frame`. The custom ops live in
`training.data.workflow_ops`; the serving fast path in `training.data.serving_transform`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.dag.ops.rename import Rename
from merlin.schema import Tags
from nvtabular import ops

# The ops are re-exported: workflows pickled before the ops had a module of their own
# name them training.workflow.<name>, which now imports as this module (training.MOVED).
from training.data.workflow_ops import (  # noqa: F401
    SECONDS_PER_DAY,
    ItemFirstSeen,
    MemoizingExecutor,
    MinLength,
    SessionGroupby,
    item_age_days,
    use_memoizing_executor,
    use_stock_executor,
    weekday_sin,
)
from training.integrity import IntegrityError, file_sha256
from training.names import (
    AGE_COL,
    CATEGORY_COL,
    DEFAULT_MAX_LEN,
    DEFAULT_MIN_LEN,
    FIRST_REAL_ID,
    ITEM_COL,
    ITEM_COUNT,
    SCHEMA_FILE,
    SESSION_COL,
    TIME_COL,
    WEEKDAY_COL,
    WINDOW_COL,
    WORKFLOW_DIR,
    list_col,
)
from training.schema import Schema

NAME_SEP = "-"  # Groupby's name_sep: item_id -> item_id-list


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


@dataclass(frozen=True)
class Vocabulary:
    """One categorical column's values in id order (id = FIRST_REAL_ID + position) and,
    for each, the window from which it is known."""

    values: np.ndarray  # (n,) raw values, id order
    known_from: np.ndarray  # (n,) int64 window index, non-decreasing

    def known_sizes(self, windows) -> dict[int, int]:
        """{window t: ids known after window t, special ids included} (the prefix size)."""
        return {
            int(w): FIRST_REAL_ID + int(np.searchsorted(self.known_from, int(w), side="right"))
            for w in windows
        }


def session_windows(frame: pd.DataFrame) -> np.ndarray:
    """Per row, the window of its session (the window of the session's first row, as `day-first`)."""
    return frame.groupby(SESSION_COL, sort=False)[WINDOW_COL].transform("first").to_numpy(dtype=np.int64)


def first_seen_vocabulary(
    frame: pd.DataFrame, columns: tuple[str, ...], freq_threshold: int = 0
) -> dict[str, Vocabulary]:
    """Append-only vocabularies: values in order of first appearance in the log.

    Rows are ordered by (window of their session, timestamp when the log has one,
    row order); a value gets its id at its `max(freq_threshold, 1)`-th occurrence in
    that order (values seen fewer times stay OOV, as Categorify's freq_threshold),
    and is known from that row's session window on. The order of the rows of
    windows <= t does not depend on later rows, so a refit on the sessions of
    windows <= t gives the same ids to the same values (tested).
    """
    sw = session_windows(frame)
    keys = [np.arange(len(frame))]
    if TIME_COL in frame.columns:
        keys.append(frame[TIME_COL].to_numpy(dtype=np.int64))
    keys.append(sw)
    order = np.lexsort(keys)
    need = max(int(freq_threshold), 1)
    out = {}
    for col in columns:
        vals = frame[col].to_numpy()[order]
        ok = ~pd.isna(vals)
        vals, win = vals[ok].astype(np.int64), sw[order][ok]
        nth = pd.Series(vals).groupby(vals, sort=False).cumcount().to_numpy()  # 0-based occurrence number
        at = nth == need - 1
        out[col] = Vocabulary(vals[at], win[at])
    return out


def build_workflow(
    spec: WorkflowSpec, stats_dir: str | os.PathLike, vocabularies: Mapping[str, Vocabulary] | None = None
) -> nvt.Workflow:
    """The (unfitted) workflow. `stats_dir` receives Categorify's category files at fit.

    `vocabularies` (from `first_seen_vocabulary`, one per categorical column): Categorify
    encodes with them (ids in their order; the threshold is already applied) instead of
    fitting its own frequency-ordered ones."""
    if spec.max_len < 1 or spec.min_len < 1:
        raise ValueError(f"max_len and min_len must be >= 1, got {spec.max_len}, {spec.min_len}")
    # Tag the raw item column: the tags survive Categorify, the groupby and ListSlice,
    # and one Categorify node (not one per selected column) runs per transform.
    cat_inputs = [ITEM_COL] >> ops.TagAsItemID()
    if spec.has_category:
        cat_inputs = cat_inputs + [CATEGORY_COL]
    if vocabularies is None:
        categorify = ops.Categorify(freq_threshold=spec.freq_threshold, out_path=str(stats_dir))
    else:
        missing = [c for c in spec.categorical if c not in vocabularies]
        if missing:
            raise ValueError(f"build_workflow: no vocabulary for categorical column(s) {missing}")
        vocabs = {c: pd.Series(vocabularies[c].values, name=c, dtype=np.int64) for c in spec.categorical}
        categorify = ops.Categorify(out_path=str(stats_dir), vocabs=vocabs)
    features = cat_inputs >> categorify
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
            out[path.relative_to(data_dir).as_posix()] = file_sha256(path)
    return out


def verify_workflow_files(data_dir: str | os.PathLike, schema: Schema | Mapping) -> None:
    """Raise IntegrityError unless every workflow file matches schema.json (a `Schema` or its dict)."""
    data_dir = Path(data_dir)
    expected = Schema.of(schema).workflow_sha256
    if f"{WORKFLOW_DIR}/workflow.pkl" not in expected:
        raise IntegrityError(
            f"{data_dir / SCHEMA_FILE} lists no sha256 for {WORKFLOW_DIR}/workflow.pkl: "
            "refusing to unpickle an unverified workflow; re-run python -m training.prepare"
        )
    actual = workflow_sha256(data_dir)
    for rel, want in expected.items():
        got = actual.get(rel)
        if got is None:
            raise IntegrityError(
                f"workflow file {data_dir / rel} is missing (listed in {SCHEMA_FILE}); "
                "copy the whole DATA/workflow folder together with schema.json"
            )
        if got != want:
            raise IntegrityError(
                f"workflow file {data_dir / rel} has sha256 {got}, but {SCHEMA_FILE} expects {want}: "
                "the workflow was modified or belongs to another schema.json; "
                "refusing to load it (re-run python -m training.prepare)"
            )
    for rel in actual:
        if rel.endswith(".pkl") and rel not in expected:
            raise IntegrityError(f"unexpected pickle {data_dir / rel} not listed in {SCHEMA_FILE}")
