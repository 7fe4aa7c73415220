"""Write the native Triton ensembles `session_ranker` and `session_ranker_stateful` for a training run.

    model_repository/
      session_ranker/config.pbtxt     platform "ensemble": preprocess -> model -> postprocess
      session_ranker/1/sessrec_run.json   the run's identity: run id, window, workflow sha256, options
      session_ranker/1/sessrec_files.json
      preprocess/config.pbtxt         Python backend, max_batch_size 0 (one request = its own sessions)
      preprocess/1/model.py           export/triton_models/preprocess/model.py
      preprocess/1/sessrec_transform.py   training/data/sessrec_transform.py, verbatim (numpy only)
      preprocess/1/sessrec_steps.py       export/sessrec_steps.py, verbatim (numpy only)
      preprocess/1/sessrec_integrity.py   training/integrity.py, verbatim (standard library only)
      preprocess/1/workflow.json      the fitted workflow compiled: steps, kernels, parameters
      preprocess/1/workflow_arrays/*.npy  its tables (Categorify vocabularies, first-seen times)
      preprocess/1/sessrec_files.json sha256 of every other file of the folder (written last)
      model/config.pbtxt              Python backend (embedded server) or pytorch_libtorch (NGC container);
                                      dynamic batching over sessions, warm-up
      model/1/model.pt                traced TopKRanker (torch.jit.trace; a TorchScript zip, no pickled code)
      model/1/model.py, sessrec_steps.py, sessrec_integrity.py   (Python backend only)
      model/1/sessrec_model.json      the per-request bounds of this version (table sizes), its window
      model/1/sessrec_files.json
      model/warmup/*                  warm-up tensors (raw little-endian bytes)
      postprocess/config.pbtxt        Python backend: encoded ids -> raw item ids
      postprocess/1/model.py, sessrec_steps.py, sessrec_integrity.py, item_vocabulary.npy, sessrec_files.json
      preprocess_stateful/config.pbtxt    Python backend with a sequence batcher (oldest): keeps each session
      preprocess_stateful/1/...       model.py, sessrec_sessions.py (export/sessrec_sessions.py, verbatim) and what
                                      preprocess/1/ holds (the same compiled workflow)
      session_ranker_stateful/config.pbtxt, 1/sessrec_run.json   platform "ensemble": preprocess_stateful -> model
                                      -> postprocess (the same models as session_ranker's); one session per request
      sessrec_export.json             the exporter's bookkeeping (models, options, versions); no step reads it

Each model folder stands alone: its model.py imports only the standard library,
numpy, triton_python_backend_utils (torch in the Python-backend model step) and
the files of its own version folder, and checks that folder against its own
sessrec_files.json before loading anything, so a folder copied (or downloaded
from an object store) alone still verifies. Nothing in the repository is a
pickle: the workflow pickle is read only here, after its sha256 check.

The ensemble's inputs are DATA/schema.json's `raw_inputs` (one row per
interaction, dims [-1]); its outputs are OUT_SESSION_ID [S], item_ids [S, k]
(raw) and scores [S, k]. Everything written is a function of (RUN, DATA,
options): the same inputs give a byte-identical repository.

Every step has a queue policy (`max_queue_size`, `queue_timeout_us`): beyond
it Triton answers UNAVAILABLE at once instead of letting requests pile up.
Versions (issue 12): every step keeps `latest { num_versions: 2 }` and the
ensemble pins one whole-repository version N (its own folder and each step's
`model_version`). Everything that changes between versions (vocabulary,
traced model, the model step's per-request bounds in sessrec_model.json, the
run record) lives in the version folders. `add_ensemble_version`
(`python -m export ... --window t --new-version`) stages version N+1 of every
step and of the ensemble without touching any config.pbtxt;
`export.versions.swap_to` loads the steps' N+1 and then re-pins the ensemble
(see export/README.md).

This module is the order of the work; the pieces live next door:
  export/config.py    ExportConfig: the options, their defaults and help (the CLI's flags)
  export/pbtxt.py     the config.pbtxt text of every step (golden copies: export/golden/)
  export/tracing.py   what a version serves: the run checked against DATA, traced (TopKRanker)
  export/staging.py   version folders (staged, recorded, renamed) and the manifest
  export/versions.py  switching a live server to a staged version
"""

from __future__ import annotations

import shutil
from pathlib import Path

from export.config import ExportConfig, ExportError
from export.pbtxt import Layout, ensemble_configs, step_configs, warmup_data
from export.staging import (
    ENSEMBLES,
    MANIFEST,
    MODELS,
    read_manifest,
    version_entry,
    versions,
    write_file,
    write_manifest,
    write_version,
)
from export.tracing import serve_state
from training.names import ENSEMBLE_NAME, TORCH_MODEL
from training.schema import Schema

__all__ = ["ExportConfig", "ExportError", "add_ensemble_version", "export_repository"]


def _clear_out(out: Path) -> None:
    """Remove a previous export from `out`; refuse to touch model directories it did not write."""
    if not out.exists():
        return
    previous = (read_manifest(out) or {}).get("models", [])
    foreign = sorted(
        p.name for p in out.iterdir() if p.is_dir() and p.name not in previous and p.name not in MODELS
    )
    if foreign:
        raise FileExistsError(
            f"{out} holds model directories this export did not write: {foreign}; "
            "choose an empty --out or remove them (Triton would serve them alongside the ensemble)"
        )
    for name in sorted({*previous, *MODELS}):
        if (out / name).exists():
            shutil.rmtree(out / name)
    (out / MANIFEST).unlink(missing_ok=True)


def export_repository(cfg: ExportConfig) -> Path:
    """Write the repository (see the module docstring) with version 1 of every model; returns cfg.out."""
    cfg.check()
    data, out = Path(cfg.data), Path(cfg.out)
    schema = Schema.load(data)
    layout = Layout.from_schema(schema, cfg.top_k)
    served = serve_state(cfg, schema)

    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    for step, text in step_configs(layout, cfg).items():
        write_file(out / step / "config.pbtxt", text)
    for name, blob in warmup_data(layout, cfg).items():
        write_file(out / TORCH_MODEL / "warmup" / name, blob)
    record = write_version(out, 1, served, layout, cfg, schema)
    for name, text in ensemble_configs(layout, cfg, 1).items():
        write_file(out / name / "config.pbtxt", text)
    manifest = {
        "models": list(MODELS),
        "ensemble": ENSEMBLE_NAME,
        "ensembles": list(ENSEMBLES),
        "inputs": layout.raw_inputs,
        "options": cfg.options(),
        "workflow_sha256": schema.workflow_sha256,
        "versions": {"1": version_entry(record)},
    }
    write_manifest(out, manifest)
    return out


def add_ensemble_version(cfg: ExportConfig) -> int:
    """Stage cfg.run (after cfg.window) as whole-repository version N+1 in the existing cfg.out; returns N+1.

    Writes preprocess/<N+1> (the vocabulary known after the window), model/<N+1> (its trace and
    sessrec_model.json), postprocess/<N+1> (item_vocabulary.npy) and session_ranker/<N+1>
    (sessrec_run.json), each complete with its sessrec_files.json before it is renamed into
    place, and updates the manifest. No config.pbtxt and no other file changes: the
    ensemble keeps pinning N, so a (re)starting server keeps serving N until
    `export.versions.swap_to` switches it (see export/README.md). Export options come from the
    manifest; the run must be trained on the same workflow."""
    out, data = Path(cfg.out), Path(cfg.data)
    manifest = read_manifest(out)
    if manifest is None or TORCH_MODEL not in manifest.get("models", []) or "versions" not in manifest:
        raise FileNotFoundError(f"{out} holds no repository written by `python -m export`: export it first")
    schema = Schema.load(data)
    if schema.workflow_sha256 != manifest.get("workflow_sha256"):
        raise ValueError(
            f"{data} is not the DATA the repository {out} was exported from (workflow_sha256 differs): "
            "a new version must keep the preprocess step's features"
        )
    known = ExportConfig.option_names()
    options = {k: v for k, v in manifest["options"].items() if k in known}
    full = ExportConfig(run=Path(cfg.run), data=data, out=out, window=cfg.window, **options)
    full.check()
    layout = Layout.from_schema(schema, full.top_k)
    for name, text in step_configs(layout, full).items():
        if not (out / name / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{out / name / 'config.pbtxt'} is missing: the repository was exported by an earlier version of "
                "`python -m export` (before the stateful ensemble); re-export it"
            )
        if (out / name / "config.pbtxt").read_text() != text:
            raise ValueError(
                f"{out / name / 'config.pbtxt'} differs from what these options write: the repository was "
                "edited or exported by another version of `python -m export`; re-export it"
            )
    served = serve_state(full, schema)
    version = max(max(versions(out, n) or [0]) for n in MODELS) + 1
    record = write_version(out, version, served, layout, full, schema)
    manifest["versions"][str(version)] = version_entry(record)
    write_manifest(out, manifest)
    return version
