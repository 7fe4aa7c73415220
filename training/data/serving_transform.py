"""`ServingTransform`: the fitted NVTabular workflow compiled for serving (the compile side).

    t = ServingTransform.load(DATA)       # sha256 check, unpickle, compile
    t(columns) -> {session_id [S], <feature> [S, L], lengths [S]}   (runs training.data.sessrec_transform)
    t.compiled.save(folder)               # workflow.json + workflow_arrays/*.npy (what export ships)

`compile_workflow` walks the fitted workflow's graph in the order `Workflow.transform`
runs it and reads each op's fitted state: Categorify's category files, ItemFirstSeen's
table, which UDF a LambdaOp calls, ListSlice's length, Groupby's aggregations. It
emits a `training.data.sessrec_transform.Transform`: a JSON-able spec (ordered steps,
kernel kind + parameters, raw_inputs, max_len, features, special ids from
`training.names`) and named numpy arrays. That module (numpy + standard library
only) is what applies it, here and, copied verbatim, in the served preprocess
step: there is no second copy of the vocabulary nor of the code. It keeps
sessions of length 1 (the Filter is for training data only) and right-pads lists
to [S, max_len].

Parity with `Workflow.transform` is tested in tests/training/data/test_workflow.py and
tests/training/data/test_preprocess_properties.py; the contract is in docs/contracts.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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

from training.data import sessrec_transform
from training.data.sessrec_transform import InputError, Transform  # noqa: F401  (InputError: re-exported)
from training.data.workflow import verify_workflow_files
from training.data.workflow_ops import ItemFirstSeen, MinLength, item_age_days, weekday_sin
from training.integrity import IntegrityError
from training.names import (
    FIRST_REAL_ID,
    ITEM_COL,
    LENGTHS_TENSOR,
    NULL_ID,
    OOV_ID,
    PAD_ID,
    SCHEMA_FILE,
    SESSION_COL,
    TIME_COL,
    WORKFLOW_DIR,
    list_col,
)
from training.schema import Schema


class UnsupportedWorkflowError(RuntimeError):
    """The workflow uses an op that `compile_workflow` cannot express."""


# LambdaOp functions the compiled transform knows, by the name sessrec_transform.UDFS gives them.
_UDF_NAMES = {weekday_sin: "weekday_sin", item_age_days: "item_age_days"}


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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def compile_workflow(
    workflow: nvt.Workflow,
    schema: Schema | Mapping,
    workflow_sha256: Mapping | None = None,
    window: int | None = None,
) -> Transform:
    """The fitted workflow as a `sessrec_transform.Transform` (spec + arrays); see the module docstring.

    window t: the vocabulary served after window t (`known_prefix` with schema.known_sizes(t));
    None: the whole fitted vocabulary."""
    schema = Schema.of(schema)
    if window is not None:
        return known_prefix(
            compile_workflow(workflow, schema, workflow_sha256), schema.known_sizes(window), window
        )
    missing = {*schema.categorical, *schema.continuous} - set(workflow.output_schema.column_names)
    if missing:
        raise IntegrityError(
            f"schema.json lists features {sorted(missing)} that the workflow does not produce "
            f"(it produces {workflow.output_schema.column_names})"
        )
    arrays: dict[str, np.ndarray] = {}
    steps: list[dict] = []
    index: dict[int, int] = {}  # id(node) -> step index
    item_table: dict | None = None

    def kernel(node: Node, sel: list[str], i: int) -> tuple[str, dict]:
        nonlocal item_table
        op = node.op
        if op is None or isinstance(op, (ops.AddMetadata, DagAddMetadata)):
            return "identity", {}
        if isinstance(op, (SelectionOp, ConcatColumns, SubsetColumns)):
            return "identity", {}  # the step keeps node.output_schema's columns
        if isinstance(op, ops.Categorify):
            tables = {}
            for c in sel:
                values, labels = _categorify_tables(op, c)
                order = np.argsort(values, kind="stable")
                names = {
                    "values": f"s{i}.categorify.{_safe(c)}.values",
                    "labels": f"s{i}.categorify.{_safe(c)}.labels",
                }
                arrays[names["values"]] = np.ascontiguousarray(values[order], dtype=np.int64)
                arrays[names["labels"]] = np.ascontiguousarray(labels[order], dtype=np.int64)
                tables[c] = names
                if c == ITEM_COL:
                    item_table = names
            return "categorify", {"tables": tables}
        if isinstance(op, ItemFirstSeen):
            tables = {}
            for c in sel:
                ids, first = op.tables[c]
                names = {"output": op._out_name(c), "ids": f"s{i}.first_seen.{_safe(c)}.ids",
                         "first": f"s{i}.first_seen.{_safe(c)}.first"}  # fmt: skip
                arrays[names["ids"]] = np.ascontiguousarray(ids, dtype=np.int64)
                arrays[names["first"]] = np.ascontiguousarray(first, dtype=np.float64)
                tables[c] = names
            return "first_seen", {"tables": tables}
        if isinstance(op, UDF):
            name = _UDF_NAMES.get(op.f)
            if name is None:
                raise UnsupportedWorkflowError(
                    f"LambdaOp {getattr(op.f, '__qualname__', op.f)!r} (node {node.label}) has no numpy kernel: "
                    f"add it to training/data/sessrec_transform.py UDFS (known: {sorted(_UDF_NAMES.values())})"
                )
            if (op._param_count == 2) != (name in sessrec_transform.TWO_ARG_UDFS):
                raise UnsupportedWorkflowError(
                    f"LambdaOp {name}: unexpected parameter count {op._param_count}"
                )
            params = {"function": name, "outputs": list(node.output_schema.column_names)}
            if name in sessrec_transform.TWO_ARG_UDFS:
                params["time_col"] = TIME_COL  # the column training.data.workflow_ops.item_age_days reads
            return "udf", params
        if isinstance(op, Rename):
            mapping = {new: old[0] for new, old in op.column_mapping(ColumnSelector(sel)).items()}
            return "rename", {"mapping": mapping}
        if isinstance(op, ops.Groupby):
            if op.sort_cols or len(op.groupby_cols) != 1:
                raise UnsupportedWorkflowError(
                    "ServingTransform supports Groupby on one column without sort_cols"
                )
            list_aggs, conv_aggs = _get_agg_dicts(
                op.groupby_cols, op.list_aggs, op.conv_aggs, ColumnSelector(sel)
            )
            plan = []
            for col, aggs in conv_aggs.items():
                wanted = {a for a in aggs if a is not list} | set(list_aggs.get(col, ()))
                unknown = wanted - {"list", "count", "first", "last"}
                if unknown:
                    raise UnsupportedWorkflowError(
                        f"ServingTransform: unsupported Groupby aggregation {unknown} on {col}"
                    )
                plan.append([col, sorted(wanted)])
            return "groupby", {"key": op.groupby_cols[0], "sep": op.name_sep, "plan": plan}
        if isinstance(op, ops.ListSlice):
            if not (op.start < 0 and op.end == np.iinfo(np.int64).max and not op.pad):
                raise UnsupportedWorkflowError(
                    f"ServingTransform supports ListSlice(-n) only, got start={op.start} end={op.end}"
                )
            return "list_slice", {"keep": int(-op.start), "columns": list(sel)}
        if isinstance(op, ops.Filter):
            if not isinstance(op.f, MinLength):
                raise UnsupportedWorkflowError(
                    f"ServingTransform supports Filter(MinLength) only, got {op.f!r}"
                )
            return "identity", {}  # serving keeps short sessions (a one-click session gets a ranking)
        if isinstance(op, ops.ValueCount):
            return "identity", {}
        raise UnsupportedWorkflowError(
            f"ServingTransform cannot run op {type(op).__name__} (node {node.label}); "
            "extend training/data/serving_transform.py:compile_workflow and training/data/sessrec_transform.py:KERNELS"
        )

    def visit(node: Node) -> None:
        if id(node) in index:
            return
        parents = node.parents_with_dependencies
        for p in parents:
            visit(p)
        produced = set()
        for p in parents:
            produced.update(p.output_schema.column_names)
        wanted = set(node.input_schema.column_names) | set(node.dependency_columns.names)
        selection = (
            node.input_columns.resolve(node.input_schema).names if node.input_schema is not None else []
        )
        i = len(steps)
        kind, params = kernel(node, list(selection), i)
        steps.append({
            "kernel": kind,
            "params": params,
            "parents": [index[id(p)] for p in parents],
            "root_cols": sorted(wanted - produced),
            "outputs": list(node.output_schema.column_names),
            "label": str(node.label),
        })  # fmt: skip
        index[id(node)] = i

    visit(workflow.output_node)
    if item_table is None:
        raise UnsupportedWorkflowError("the workflow has no Categorify op for item_id")
    spec = {
        "format": sessrec_transform.FORMAT,
        "raw_inputs": dict(schema.raw_inputs),
        "max_len": schema.max_len,
        "categorical": dict(schema.categorical),
        "continuous": list(schema.continuous),
        "item_list": schema.item_feature,
        "session_col": SESSION_COL,
        "lengths": LENGTHS_TENSOR,
        "special_ids": {"pad": PAD_ID, "null": NULL_ID, "oov": OOV_ID, "first_real": FIRST_REAL_ID},
        "item_table": item_table,
        "steps": steps,
        "workflow_sha256": dict(workflow_sha256 if workflow_sha256 is not None else schema.workflow_sha256),
    }
    return Transform(spec, arrays)


def known_prefix(compiled: Transform, sizes: Mapping[str, int], window: int | None = None) -> Transform:
    """`compiled` restricted to the ids known after a window (issue 12: ids follow first appearance).

    sizes: categorical list feature -> known ids (special ids included; schema.known_sizes(t)).
    - Categorify: a raw value whose label is >= the known size of its feature (`list_col(column)`)
      is dropped from the value/label table, so it encodes as OOV, as `training.evaluate.known_inputs`
      makes it offline. Columns without a size keep their table.
    - first-seen tables (item age): the raw items dropped above are dropped here too, so they get
      age 0 like any item the workflow never saw (`known_inputs` zeroes their age offline). Raw ids
      outside the Categorify vocabulary (under a frequency threshold: OOV at every window) keep
      their entry, as in the prepared sessions the offline metrics read.
    - spec "categorical" holds the known sizes, so `item_vocabulary()` has sizes[item] entries.
    - spec "window" records t (None: the whole vocabulary).
    Nothing else changes (steps, kernels and the other arrays are the same)."""
    spec = dict(compiled.spec)
    arrays = dict(compiled.arrays)
    steps = [dict(s) for s in spec["steps"]]
    dropped: dict[str, np.ndarray] = {}  # raw column -> raw values no longer known
    for step in steps:
        if step["kernel"] != "categorify":
            continue
        for col, names in step["params"]["tables"].items():
            n = sizes.get(list_col(col))
            if n is None:
                continue
            values, labels = arrays[names["values"]], arrays[names["labels"]]
            keep = labels < n
            arrays[names["values"]] = np.ascontiguousarray(values[keep])
            arrays[names["labels"]] = np.ascontiguousarray(labels[keep])
            dropped[col] = np.sort(values[~keep])
    for step in steps:
        if step["kernel"] != "first_seen":
            continue
        for col, names in step["params"]["tables"].items():
            if col not in dropped:
                continue
            ids = arrays[names["ids"]]
            keep = ~np.isin(ids, dropped[col])
            arrays[names["ids"]] = np.ascontiguousarray(ids[keep])
            arrays[names["first"]] = np.ascontiguousarray(arrays[names["first"]][keep])
    cards = {k: int(sizes.get(k, v)) for k, v in spec["categorical"].items()}
    return Transform(dict(spec, steps=steps, categorical=cards, window=window), arrays)


class ServingTransform:
    """The fitted workflow's transform for one request of raw interaction rows.

    `ServingTransform.load(data_dir)` reads `schema.json`, checks the sha256 of the
    workflow files, loads the workflow and compiles it (`compile_workflow`); calls
    run `training.data.sessrec_transform.Transform`, the code the served preprocess step
    runs. Call it with `{column: 1-D array}` holding `raw_inputs` (extra columns are
    ignored; [N, 1] arrays and safely castable dtypes are accepted); it returns
    `session_id` [S] int64 (order of first appearance), every list feature as
    [S, max_len] (categorical int64, continuous float32; the last <= max_len
    interactions in row order, right-padded with 0) and `lengths` [S] int64 (>= 1).
    Bad input raises `InputError` (a ValueError) naming the column, a sample value
    and what was expected. Calls share no mutable state (thread-safe).
    """

    def __init__(self, workflow: nvt.Workflow, schema: Schema | Mapping, window: int | None = None):
        self.workflow = workflow
        schema = Schema.of(schema)
        self.schema = schema.to_dict()  # schema.json's object, as before (the attributes below are typed)
        # window t: only the vocabulary known after t (`known_prefix`); None: all of it
        self.compiled: Transform = compile_workflow(workflow, schema, window=window)
        self.raw_inputs: dict[str, np.dtype] = self.compiled.raw_inputs
        self.max_len = self.compiled.max_len
        self.categorical: dict[str, int] = self.compiled.categorical
        self.continuous: list[str] = self.compiled.continuous
        self.item_list: str = self.compiled.item_list

    @classmethod
    def load(cls, data_dir: str | os.PathLike, window: int | None = None) -> ServingTransform:
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
        return cls(workflow, schema, window)

    # ---- public API ------------------------------------------------------ #
    def item_vocabulary(self) -> np.ndarray:
        """Raw item id for every encoded id (index = encoded id; -1 for special ids)."""
        return self.compiled.item_vocabulary()

    def __call__(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self.compiled(columns)
