"""The reference notebook's ETL graph: Transformers4Rec getting-started 01-ETL, cell 15, stock NVTabular ops.

Kept as the specification our workflow is tested against
(tests/training/data/test_workflow.py: `training.data.workflow`'s graph gives the same sessions)
and as the comparison `python -m bench.prepare` times our data stage against.
Not part of the pipeline: nothing in training/, export/ or clients/ runs it.
"""

from __future__ import annotations

from pathlib import Path


def reference_etl_graph(out_path: Path):
    """Transformers4Rec getting-started 01-ETL cell 15 up to its Filter, with stock ops.

    Returns the filtered node (session_id, day-first, item_id-count and the four
    lists); the notebook then selects columns and adds ValueCount. Used by
    bench.prepare and by tests/training/data/test_workflow.py's parity test."""
    from merlin.schema.tags import Tags
    from nvtabular import ops

    categ = ["item_id", "category"] >> ops.Categorify(out_path=str(out_path))
    g = (categ + ["session_id", "day", "age_days", "weekday_sin"]) >> ops.Groupby(
        groupby_cols=["session_id"],
        aggs={"item_id": ["list", "count"], "category": ["list"], "day": ["first"],
              "age_days": ["list"], "weekday_sin": ["list"]},
        name_sep="-",
    )  # fmt: skip
    cat = g["category-list"] >> ops.ListSlice(-20)
    itm = g["item_id-list"] >> ops.ListSlice(-20) >> ops.TagAsItemID()
    conts = (
        g["age_days-list", "weekday_sin-list"]
        >> ops.ListSlice(-20)
        >> ops.AddMetadata(tags=[Tags.CONTINUOUS])
    )
    sel = g["item_id-count", "day-first", "session_id"] + itm + cat + conts
    return sel >> ops.Filter(f=lambda d: d["item_id-count"] >= 2)
