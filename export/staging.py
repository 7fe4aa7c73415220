"""Version folders and the exporter's manifest: writing whole-repository version N to disk.

    record = write_version(out, 3, served, layout, cfg, schema)   # preprocess/3, model/3, postprocess/3, session_ranker/3
    write_manifest(out, manifest)                                 # out/sessrec_export.json (atomic)

Every version folder is written completely under a temporary, non-numeric name
(`.<v>.tmp`, which Triton ignores), closed with its own sessrec_files.json (sha256 of every
other file, `training.integrity.write_folder_record`) and then renamed into place: steps
first, the ensemble's folder last. What goes into each folder:

    preprocess/<v>/    model.py + sessrec_integrity.py, sessrec_steps.py, sessrec_transform.py (verbatim),
                       workflow.json + workflow_arrays/*.npy (the compiled workflow, known prefix)
    model/<v>/         model.pt (traced TopKRanker), sessrec_model.json (per-request bounds, window),
                       model.py + sessrec_integrity.py, sessrec_steps.py (Python backend only)
    postprocess/<v>/   model.py + sessrec_integrity.py, sessrec_steps.py, item_vocabulary.npy
    preprocess_stateful/<v>/  model.py + sessrec_integrity.py, sessrec_steps.py, sessrec_transform.py,
                       sessrec_sessions.py (verbatim), workflow.json + workflow_arrays/*.npy (as preprocess/<v>/)
    session_ranker/<v>/, session_ranker_stateful/<v>/  sessrec_run.json (version, window, items_known,
                       options, the run's record)

The shipped `sessrec_*.py` are byte-identical copies of their one source in the project (`SHIPPED`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from export.config import ExportConfig
from export.pbtxt import TRACED_FILE, Layout, model_io_names, stateful_inputs
from export.tracing import Served
from training.integrity import atomic_write, model_level_sha256, write_folder_record
from training.names import (
    ENSEMBLE_NAME,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_CLICKS,
    OUT_SESSION_ID,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    STATEFUL_ENSEMBLE_NAME,
    STATEFUL_PREPROCESS_MODEL,
    TORCH_MODEL,
)
from training.schema import Schema

MANIFEST = "sessrec_export.json"  # the exporter's bookkeeping at the repository root (no step reads it)
RUN_RECORD = "sessrec_run.json"  # session_ranker/<version>/: the run's identity
MODEL_PARAMS = "sessrec_model.json"  # model/<version>/: what the model step checks that changes per version
VOCAB_FILE = "item_vocabulary.npy"  # postprocess/<version>/: raw item id per encoded id

TEMPLATES = Path(__file__).resolve().parent / "triton_models"
_ROOT = Path(__file__).resolve().parent.parent
# Modules copied verbatim into the version folders (file name there -> the one source in the project).
SHIPPED = {
    "sessrec_integrity.py": _ROOT / "training" / "integrity.py",
    "sessrec_steps.py": _ROOT / "export" / "sessrec_steps.py",
    "sessrec_transform.py": _ROOT / "training" / "data" / "sessrec_transform.py",
    "sessrec_sessions.py": _ROOT / "export" / "sessrec_sessions.py",
}
STEP_MODULES = {  # what each Python-backend step's folder carries besides model.py
    PREPROCESS_MODEL: ("sessrec_integrity.py", "sessrec_steps.py", "sessrec_transform.py"),
    TORCH_MODEL: ("sessrec_integrity.py", "sessrec_steps.py"),
    POSTPROCESS_MODEL: ("sessrec_integrity.py", "sessrec_steps.py"),
    STATEFUL_PREPROCESS_MODEL: ("sessrec_integrity.py", "sessrec_steps.py", "sessrec_transform.py", "sessrec_sessions.py"),
}
ENSEMBLES = (ENSEMBLE_NAME, STATEFUL_ENSEMBLE_NAME)
STEPS = (PREPROCESS_MODEL, STATEFUL_PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL)  # the order a swap loads them
MODELS = (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL, STATEFUL_PREPROCESS_MODEL, STATEFUL_ENSEMBLE_NAME)


def write_file(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def write_step_code(version_dir: Path, step: str) -> None:
    """model.py of `step` and the modules it imports, copied verbatim from their one source."""
    write_file(version_dir / "model.py", (TEMPLATES / step / "model.py").read_text())
    for name in STEP_MODULES[step]:
        write_file(version_dir / name, SHIPPED[name].read_text())


@contextmanager
def staged(folder: Path, record: dict | None = None, step: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of version folder `folder` (not numeric: Triton ignores it); when
    the block is done, write its sessrec_files.json (with `record`'s fields) and rename it into place.

    A step's record also lists its model folder's config.pbtxt and warm-up files (written before
    its versions, the same for all of them), which the step checks before it loads anything. An
    ensemble's (`step=False`) does not: its config.pbtxt is re-pinned at every version switch, and
    no code of the ensemble runs to check it (Triton validates it against the steps)."""
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    write_folder_record(tmp, record, model_level_sha256(folder.parent) if step else None)
    tmp.rename(folder)


def write_version(
    out: Path, version: int, served: Served, layout: Layout, cfg: ExportConfig, schema: Schema
) -> dict:
    """preprocess/<v>, model/<v>, postprocess/<v>, session_ranker/<v> (see the module docstring).
    Returns the version's run record (session_ranker/<v>/sessrec_run.json)."""
    from export.inference import save_traced

    v = str(version)
    for name in MODELS:
        if (out / name / v).exists():
            raise FileExistsError(f"{out / name / v} exists already: a version is written once")
    with staged(out / PREPROCESS_MODEL / v) as tmp:  # the compiled workflow (JSON + .npy), no pickle
        write_step_code(tmp, PREPROCESS_MODEL)
        served.transform.save(tmp)
    with staged(out / TORCH_MODEL / v, model_record(served.run)) as tmp:
        save_traced(served.traced, tmp / TRACED_FILE)
        if cfg.torch_backend == "python":
            write_step_code(tmp, TORCH_MODEL)
        ins, _ = model_io_names(layout, cfg.torch_backend)
        cards = {
            n: served.cardinalities[f] for n, f in zip(ins, layout.features) if f in served.cardinalities
        }
        params = {"cardinalities": cards, "window": served.window}
        write_file(tmp / MODEL_PARAMS, json.dumps(params, indent=2, sort_keys=True) + "\n")
    with staged(out / POSTPROCESS_MODEL / v) as tmp:
        write_step_code(tmp, POSTPROCESS_MODEL)
        np.save(tmp / VOCAB_FILE, served.vocab, allow_pickle=False)
    with staged(out / STATEFUL_PREPROCESS_MODEL / v) as tmp:  # the same compiled workflow, its own copy
        write_step_code(tmp, STATEFUL_PREPROCESS_MODEL)
        served.transform.save(tmp)
    record = {  # the ensemble's folder: the version's identity
        "ensemble": ENSEMBLE_NAME,
        "version": version,
        "window": served.window,
        "items_known": int(len(served.vocab)),
        "inputs": layout.raw_inputs,
        "outputs": {
            OUT_SESSION_ID: "[S]",
            OUT_ITEM_IDS: f"[S, {cfg.top_k}]",
            OUT_SCORES: f"[S, {cfg.top_k}]",
        },
        "options": cfg.options(stateful=False),
        "workflow_sha256": schema.workflow_sha256,
        "run": run_record(served.run),
    }
    stateful = dict(  # the same version, served one session at a time (correlation id = session)
        record,
        ensemble=STATEFUL_ENSEMBLE_NAME,
        inputs={n: layout.raw_inputs[n] for n in stateful_inputs(layout)},
        outputs={OUT_ITEM_IDS: f"[1, {cfg.top_k}]", OUT_SCORES: f"[1, {cfg.top_k}]", OUT_SESSION_CLICKS: "[1]"},
        options=cfg.options(),
    )
    for name, rec in ((ENSEMBLE_NAME, record), (STATEFUL_ENSEMBLE_NAME, stateful)):
        with staged(out / name / v, step=False) as tmp:
            write_file(tmp / RUN_RECORD, json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return record


def version_entry(record: dict) -> dict:
    """What the manifest's "versions" keeps of a version's run record."""
    return {k: record[k] for k in ("window", "items_known", "run")}


def read_manifest(out: Path) -> dict | None:
    """The repository's sessrec_export.json, or None when there is none."""
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(Path(out) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def model_record(run: Path) -> dict:
    """Extra fields of a model version's sessrec_files.json: its run, and the torch that wrote model.pt
    (libtorch/torch older than that may not read the TorchScript archive)."""
    import torch

    return {"run": run_record(run), "torch": torch.__version__}


def run_record(run: Path) -> dict:
    """What the repository keeps about the run behind a version (its metrics at training time)."""
    meta = json.loads((Path(run) / "meta.json").read_text())
    windows = meta.get("metrics", {}).get("windows") or [{}]
    run = Path(run)
    name = (
        f"{run.parent.parent.name}/{run.parent.name}/{run.name}" if run.parent.name == "windows" else run.name
    )
    return {"run": name, "window": meta.get("window"), "metrics": windows[-1]}


def versions(out: Path, name: str = TORCH_MODEL) -> list[int]:
    """Numeric version directories of model `name`, ascending."""
    folder = Path(out) / name
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        if folder.is_dir()
        else []
    )
