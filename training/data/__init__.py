"""The data stage: click log -> fitted NVTabular workflow -> per-window session splits.

    python -m training.prepare ...        the command (training/prepare.py: flags only)

Modules, in the order data flows through them:
- `ingest`: a real click log (CSV/TSV/parquet) -> normalised interactions; `IngestConfig`;
- `synthetic`: the reference example's seeded generator;
- `workflow`, `workflow_ops`: the NVTabular workflow and its custom ops (pickled with it);
- `prepare`: `PrepareConfig` + `prepare()`, the stage; the split rule; DATA/ written atomically;
- `splits`: DATA/sessions_by_day/<w>/<split>.parquet read back as padded tensors (torch);
- `serving_transform`: the fitted workflow compiled for serving (`ServingTransform`);
- `sessrec_transform`: the numpy-only module that runs the compiled workflow, here and, copied
  verbatim, in the served preprocess step (its text predates this package and names its
  neighbours `training.<module>`: they are `training.data.<module>`; editing it changes
  every exported repository, so it stays as it is until it changes for a reason);
- `grouping`: rows -> sessions in order of first appearance (re-exported for the client);
- `reference_workflow`: the Transformers4Rec notebook's ETL, the parity test's specification.

Nothing is imported here: `training.data.splits` needs torch, the workflow modules NVTabular.
The file formats are in docs/contracts.md.
"""
