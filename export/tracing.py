"""What one whole-repository version serves, built from RUN and DATA, and the TorchScript trace.

    served = serve_state(cfg, Schema.load(cfg.data))   # Served: run, window, transform, vocab, traced, cardinalities
    traced, cards = trace_run(run, data, schema, cfg)  # TopKRanker(k = cfg.top_k) traced on the serving device

Order of the checks: the checkpoint of the window (`window_run`), its workflow_sha256
against DATA's (`check_same_workflow`, before DATA's workflow pickle is loaded), then
DATA's workflow (sha256-checked by ServingTransform.load) compiled and truncated to the
window, then RUN's model.pt (`torch.load(weights_only=True)` in load_run), traced.
The traced module itself (TopKRanker, trace_ranker, save_traced) is export/inference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.config import ExportConfig, ExportError
from training.names import ITEM_LIST, SCHEMA_FILE, WORKFLOW_DIR
from training.schema import Schema


def check_same_workflow(run: Path, data: Path, schema: Schema) -> None:
    """RUN/meta.json's workflow_sha256 (recorded at training time) must equal DATA/schema.json's.

    Checked before anything of DATA is unpickled: a workflow.pkl replaced together
    with its hashes in schema.json is refused here, not loaded."""
    from training.checkpoint import read_meta

    want, got = schema.workflow_sha256, read_meta(run).get("workflow_sha256")
    if not want or not got:
        raise ValueError(
            f"{run}/meta.json or {data}/{SCHEMA_FILE} records no workflow_sha256: re-run training"
        )
    if want != got:
        raise ValueError(
            f"{run} was trained on another workflow than {data}/{WORKFLOW_DIR} (workflow_sha256 in "
            f"{data}/{SCHEMA_FILE} differs from {run}/meta.json): export with the DATA the run was trained on"
        )


def window_run(run: Path, window: int | None) -> Path:
    """The checkpoint folder holding the state after `window`: RUN/windows/<t>/ (`--keep-windows`),
    or RUN itself when its last finished window is t (or window is None)."""
    from training.checkpoint import META_FILE, WINDOWS_DIR, read_meta

    run = Path(run)
    if window is None:
        return run
    snap = run / WINDOWS_DIR / str(window)
    if (snap / META_FILE).is_file():
        return snap
    if (run / META_FILE).is_file() and read_meta(run).get("window") == window:
        return run
    raise FileNotFoundError(
        f"{run} holds no model after window {window} ({snap} is missing): train with --keep-windows "
        "(python -m training.train ... --keep-windows) to keep every window's state"
    )


@dataclass
class Served:
    """What one whole-repository version serves: the state after a window, its vocabulary."""

    run: Path  # the checkpoint folder (RUN or RUN/windows/<t>)
    window: int | None
    transform: object  # sessrec_transform.Transform: the compiled workflow, truncated to the window
    vocab: np.ndarray  # postprocess's item_vocabulary.npy (index = encoded id)
    traced: object  # the traced TopKRanker
    cardinalities: dict[str, int]  # categorical feature -> rows of the model's table (the guard's bound)


def serve_state(cfg: ExportConfig, schema: Schema) -> Served:
    """The run after cfg.window (checked against DATA's workflow first), traced, and the compiled
    workflow and item vocabulary known after that window."""
    from training.data.serving_transform import ServingTransform

    run = window_run(Path(cfg.run), cfg.window)
    check_same_workflow(run, Path(cfg.data), schema)  # before the workflow pickle is loaded
    # checks the workflow files' sha256 against schema.json, then unpickles; window t: known prefix only
    transform = ServingTransform.load(cfg.data, window=cfg.window).compiled
    vocab = np.asarray(transform.item_vocabulary(), dtype=np.int64)
    traced, cards = trace_run(run, Path(cfg.data), schema, cfg)
    if cfg.window is not None and len(vocab) > cards[schema.item_feature]:
        raise ValueError(
            f"{run}: the model's item table has {cards[schema.item_feature]} rows but {len(vocab)} items are "
            f"known after window {cfg.window}: the checkpoint is not the state after window {cfg.window}"
        )
    return Served(run, cfg.window, transform, vocab, traced, cards)


def trace_run(run: Path, data: Path, schema: Schema, cfg: ExportConfig):
    """Load the run, wrap it in TopKRanker (k fixed), trace it on the serving device;
    returns (the traced module, the model's table sizes {categorical feature: rows}).

    With cfg.window the guard's cardinalities are the model's own table sizes (they grow window
    by window, see training/trainer.py), which the truncated preprocess never exceeds; without
    it, the whole vocabulary's (SessionModel.unknown_to_oov maps ids beyond its tables to OOV).

    A trace records devices of tensors created inside forward as constants
    (the model's `torch.arange(..., device=x.device)`, XLNet's position
    encoding), so a GPU repository must be traced on a GPU: `--instance-kind
    gpu` needs CUDA at export time (run the export inside the NGC PyTorch
    container or any CUDA build of torch)."""
    import dataclasses

    import torch

    from export.inference import (
        TopKRanker,
        baked_devices,
        example_inputs,
        trace_ranker,
    )
    from training.checkpoint import load_run

    device = torch.device("cuda", 0) if cfg.instance_kind == "gpu" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(
            "--instance-kind gpu: tracing bakes the device into the TorchScript graph, so the model must be "
            "traced on a GPU, and this torch has no CUDA. Export on a CUDA machine (e.g. inside "
            "nvcr.io/nvidia/pytorch), or use --instance-kind cpu"
        )
    check_same_workflow(run, data, schema)
    model, _meta = load_run(run)
    mem = model.item_memory
    if mem is not None and mem.scorer is not None and not float(mem.scorer.on):
        # a candidate scorer that does not serve (on = 0: the scores are the combiner's) would still compute
        # its inputs in the trace; without it the model ranks the same candidates by the same scores
        mem.scorer = None
    if cfg.window is None:  # the whole vocabulary: ids the tables do not hold yet are OOV inside the model
        cards = dict(schema.categorical)
    else:  # the vocabulary known after the window: the model's own tables
        cards = {f: int(model.cfg.categorical.get(f, n)) for f, n in schema.categorical.items()}
    at = dataclasses.replace(schema, categorical=cards)  # example inputs within the served vocabulary
    # the guard (ids out of range -> OOV, lengths clamped) is part of the trace: see TopKRanker
    ranker = TopKRanker(model.to(device), schema.features, cfg.top_k, cards[ITEM_LIST], cards, schema.max_len)
    torch.manual_seed(0)
    traced = trace_ranker(ranker, tuple(t.to(device) for t in example_inputs(at, batch=8)))
    other = {d for d in baked_devices(traced) if torch.device(d).type != device.type}
    if other:
        raise RuntimeError(f"the traced model holds device constants {sorted(other)} but serves on {device}")
    return traced, cards
