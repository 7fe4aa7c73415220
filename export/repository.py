"""Write the native Triton ensemble `session_ranker` for a training run.

    model_repository/
      session_ranker/config.pbtxt     platform "ensemble": preprocess -> model -> postprocess
      session_ranker/1/sessrec_run.json   the run's identity: run id, window, workflow sha256, options
      session_ranker/1/sessrec_files.json
      preprocess/config.pbtxt         Python backend, max_batch_size 0 (one request = its own sessions)
      preprocess/1/model.py           export/triton_models/preprocess/model.py
      preprocess/1/sessrec_transform.py   training/sessrec_transform.py, verbatim (numpy only)
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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.integrity import write_folder_record
from training.names import (
    ENSEMBLE_NAME,
    FIRST_REAL_ID,
    ITEM_COL,
    ITEM_LIST,
    LENGTHS_TENSOR,
    OUT_ENCODED_IDS,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    SCHEMA_FILE,
    SESSION_COL,
    TORCH_MODEL,
    WORKFLOW_DIR,
)
from training.schema import Schema

MANIFEST = "sessrec_export.json"  # the exporter's bookkeeping at the repository root (no step reads it)
RUN_RECORD = "sessrec_run.json"  # session_ranker/<version>/: the run's identity


class ExportError(RuntimeError):
    """The requested export cannot be made here (e.g. a GPU model step traced without CUDA)."""


TEMPLATES = Path(__file__).resolve().parent / "triton_models"
_ROOT = Path(__file__).resolve().parent.parent
# Modules copied verbatim into the version folders (file name there -> the one source in the project).
SHIPPED = {
    "sessrec_integrity.py": _ROOT / "training" / "integrity.py",
    "sessrec_steps.py": _ROOT / "export" / "sessrec_steps.py",
    "sessrec_transform.py": _ROOT / "training" / "data" / "sessrec_transform.py",
}
STEP_MODULES = {  # what each Python-backend step's folder carries besides model.py
    PREPROCESS_MODEL: ("sessrec_integrity.py", "sessrec_steps.py", "sessrec_transform.py"),
    TORCH_MODEL: ("sessrec_integrity.py", "sessrec_steps.py"),
    POSTPROCESS_MODEL: ("sessrec_integrity.py", "sessrec_steps.py"),
}
MODELS = (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL)
TRACED_FILE = "model.pt"
VOCAB_FILE = "item_vocabulary.npy"

TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int16": "TYPE_INT16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bool": "TYPE_BOOL",
}


@dataclass
class ExportConfig:
    run: Path  # training run directory (model.pt state_dict + meta.json)
    data: Path  # prepared data directory (workflow/, schema.json)
    out: Path  # model repository to write
    top_k: int = 20  # items per session; fixed in the traced model
    torch_backend: str = "python"  # "python": embedded server; "libtorch": NGC tritonserver container
    instance_kind: str = "cpu"  # model step instance kind: "cpu" or "gpu"
    max_batch_sessions: int = 64  # model step max_batch_size; also the most sessions one request may hold
    max_request_rows: int = 65536  # the most interaction rows one request may hold
    max_queue_delay_us: int = 0  # dynamic batching delay on the model step (0: batch what is queued)
    torch_threads: int = 0  # intra-op threads of the Python-backend model step (0: half the cores, <= 4)
    model_instances: int = 1  # instances of the model step
    preprocess_instances: int = 1  # instances of the preprocess step
    # Queue policy of every step (Triton's default_queue_policy, timeout_action REJECT).
    # A request that finds `max_queue_size` requests already queued at a step, or waits
    # there longer than `queue_timeout_us`, is answered UNAVAILABLE at once. Defaults:
    # 64 queued requests (8x the concurrency the benchmarks use) and 5 s (far above the
    # p99 of a 64-session request at concurrency 8 here, ~0.2 s). 0 disables either.
    max_queue_size: int = 64
    queue_timeout_us: int = 5_000_000
    # Serve the state after window t (issue 12): the model of RUN/windows/<t>/ (train with
    # --keep-windows; or RUN itself when its last window is t) and only the vocabulary known
    # after t (training.serving_transform.known_prefix). None: RUN and the whole vocabulary.
    window: int | None = None

    def check(self) -> None:
        if self.torch_backend not in ("python", "libtorch"):
            raise ValueError(f"torch_backend must be 'python' or 'libtorch', got {self.torch_backend!r}")
        if self.instance_kind not in ("cpu", "gpu"):
            raise ValueError(f"instance_kind must be 'cpu' or 'gpu', got {self.instance_kind!r}")
        for name in ("top_k", "max_batch_sessions", "max_request_rows", "model_instances", "preprocess_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_delay_us", "torch_threads", "max_queue_size", "queue_timeout_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# --- config.pbtxt text --------------------------------------------------------
def _q(s: str) -> str:
    return json.dumps(s)  # a protobuf text-format string literal for the names used here


def _dims(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims, reshape=None) -> str:
    extra = f" reshape: {{ shape: {_dims(reshape)} }}" if reshape is not None else ""
    return f"  {{ name: {_q(name)} data_type: {dtype} dims: {_dims(dims)}{extra} }}"


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _params(params: dict[str, str]) -> str:
    return "".join(
        f"parameters {{ key: {_q(k)} value {{ string_value: {_q(v)} }} }}\n" for k, v in params.items()
    )


def _queue_policy(cfg: ExportConfig) -> str:
    """Triton's ModelQueuePolicy text for cfg's limits ("" when both are off)."""
    if not cfg.max_queue_size and not cfg.queue_timeout_us:
        return ""
    return (
        f"default_queue_policy {{ max_queue_size: {cfg.max_queue_size} timeout_action: REJECT "
        f"default_timeout_microseconds: {cfg.queue_timeout_us} }}"
    )


def _dynamic_batching(cfg: ExportConfig, delay_us: int | None = None) -> str:
    """The dynamic_batching block of a step. Steps with max_batch_size 0 (preprocess,
    postprocess) get one only for the queue policy: Triton still hands their
    execute() requests that it answers one by one."""
    parts = [] if delay_us is None else [f"max_queue_delay_microseconds: {delay_us}"]
    if _queue_policy(cfg):
        parts.append(_queue_policy(cfg))
    if not parts:
        return ""
    return "dynamic_batching { " + " ".join(parts) + " }\n"


def _header(what: str) -> str:
    return f"# Generated by `python -m export` ({what}). Do not edit: re-export instead.\n"


def triton_dtype(numpy_dtype: str) -> str:
    try:
        return TRITON_DTYPES[str(np.dtype(numpy_dtype))]
    except KeyError as e:
        raise ValueError(
            f"raw input dtype {numpy_dtype!r} has no Triton tensor type here (supported: {sorted(TRITON_DTYPES)})"
        ) from e


@dataclass(frozen=True)
class Layout:
    """Names, dtypes and shapes shared by the four configs."""

    raw_inputs: dict[str, str]  # raw column -> numpy dtype (schema.json order)
    features: list[str]  # model inputs, positional order
    feature_dtypes: dict[str, str]  # feature -> TYPE_*
    max_len: int
    k: int
    item_dtype: str  # TYPE_* of raw item ids
    cardinalities: dict[str, int]  # categorical feature -> number of encoded ids

    @classmethod
    def from_schema(cls, schema: Schema | Mapping, k: int) -> Layout:
        schema = Schema.of(schema)
        raw = dict(schema.raw_inputs)
        for col in (SESSION_COL, ITEM_COL):
            if col not in raw:
                raise ValueError(f"schema.json raw_inputs has no '{col}' column: {sorted(raw)}")
        if OUT_SESSION_ID in raw:
            raise ValueError(f"raw input '{OUT_SESSION_ID}' collides with the ensemble output of that name")
        dtypes = {f: "TYPE_INT64" for f in schema.categorical}
        dtypes.update({f: "TYPE_FP32" for f in schema.continuous})
        cards = dict(schema.categorical)
        return cls(raw, schema.features, dtypes, schema.max_len, k, triton_dtype(raw[ITEM_COL]), cards)


# Steps keep two versions loaded: the served one (N) and the one being switched to (N+1), or N-1
# for a rollback. The ensemble pins each step's version (`ensemble_config`), so a request never
# mixes two versions' steps; everything that changes per version lives in the version folders.
STEP_VERSION_POLICY = "version_policy: { latest: { num_versions: 2 } }\n"


def preprocess_config(layout: Layout, cfg: ExportConfig) -> str:
    L = layout.max_len
    inputs = [_tensor(n, triton_dtype(dt), [-1]) for n, dt in layout.raw_inputs.items()]
    outputs = [_tensor(OUT_SESSION_ID, "TYPE_INT64", [-1])]
    outputs += [_tensor(f, layout.feature_dtypes[f], [-1, L]) for f in layout.features]
    outputs += [_tensor(LENGTHS_TENSOR, "TYPE_INT64", [-1, 1])]
    return (
        _header("preprocess step")
        + f'name: {_q(PREPROCESS_MODEL)}\nbackend: "python"\nmax_batch_size: 0\n'
        + STEP_VERSION_POLICY
        + _io("input", inputs)
        + _io("output", outputs)
        + _dynamic_batching(cfg)
        + f"instance_group [ {{ count: {cfg.preprocess_instances} kind: KIND_CPU }} ]\n"
        + _params(
            {
                "feature_names": json.dumps(layout.features),
                "session_output": OUT_SESSION_ID,
                "max_request_rows": str(cfg.max_request_rows),
                "max_request_sessions": str(cfg.max_batch_sessions),
            }
        )
    )


def libtorch_names(layout: Layout) -> tuple[list[str], list[str]]:
    """pytorch_libtorch binds tensors by position with the `<name>__<index>` convention."""
    ins = [f"{n}__{i}" for i, n in enumerate([*layout.features, LENGTHS_TENSOR])]
    outs = [f"{OUT_SCORES}__0", f"{OUT_ENCODED_IDS}__1"]
    return ins, outs


def model_io_names(layout: Layout, backend: str) -> tuple[list[str], list[str]]:
    """(input names in forward order, output names [scores, encoded ids]) of the model step."""
    if backend == "libtorch":
        return libtorch_names(layout)
    return [*layout.features, LENGTHS_TENSOR], [OUT_SCORES, OUT_ENCODED_IDS]


def model_config(layout: Layout, cfg: ExportConfig) -> str:
    ins, outs = model_io_names(layout, cfg.torch_backend)
    dtypes = [layout.feature_dtypes[f] for f in layout.features]
    inputs = [_tensor(n, dt, [layout.max_len]) for n, dt in zip(ins[:-1], dtypes)]
    inputs += [_tensor(ins[-1], "TYPE_INT64", [1], reshape=[])]  # [S, 1] in the ensemble, [S] in forward
    outputs = [_tensor(outs[0], "TYPE_FP32", [layout.k]), _tensor(outs[1], "TYPE_INT64", [layout.k])]
    # a GPU trace holds cuda:0 constants (see _trace): pin the instances to GPU 0
    kind = "KIND_GPU gpus: [ 0 ]" if cfg.instance_kind == "gpu" else "KIND_CPU"
    if cfg.torch_backend == "libtorch":
        head = f'name: {_q(TORCH_MODEL)}\nplatform: "pytorch_libtorch"\ndefault_model_filename: {_q(TRACED_FILE)}\n'
        params = {"INFERENCE_MODE": "true"}
    else:
        head = f'name: {_q(TORCH_MODEL)}\nbackend: "python"\n'
        # the cardinalities change with the vocabulary: they are in <version>/sessrec_model.json
        params = {
            "input_order": json.dumps(ins),
            "torch_threads": str(cfg.torch_threads),
            "max_len": str(layout.max_len),
        }
    warmup = []
    for batch in sorted({1, cfg.max_batch_sessions}):
        entries = []
        for name, dt in zip(ins, [*dtypes, "TYPE_INT64"]):
            dims = [1] if name == ins[-1] else [layout.max_len]
            entries.append(
                f"    inputs {{ key: {_q(name)} value {{ data_type: {dt} dims: {_dims(dims)} "
                f"input_data_file: {_q(_warmup_file(name))} }} }}"
            )
        warmup.append(f'  {{ name: "batch {batch}" batch_size: {batch} count: 3\n' + "\n".join(entries) + "\n  }")
    return (
        _header(f"model step, {cfg.torch_backend} backend")
        + head
        + f"max_batch_size: {cfg.max_batch_sessions}\n"
        + STEP_VERSION_POLICY
        + _io("input", inputs)
        + _io("output", outputs)
        + _dynamic_batching(cfg, cfg.max_queue_delay_us)
        + f"instance_group [ {{ count: {cfg.model_instances} kind: {kind} }} ]\n"
        + _params(params)
        + "model_warmup [\n"
        + ",\n".join(warmup)
        + "\n]\n"
    )


def _warmup_file(name: str) -> str:
    return name.replace("-", "_") + ".bin"


def warmup_data(layout: Layout, cfg: ExportConfig) -> dict[str, bytes]:
    """One warm-up sample per model input: a full-length session of the first real item."""
    ins, _ = model_io_names(layout, cfg.torch_backend)
    out = {}
    for name, feat in zip(ins[:-1], layout.features):
        if layout.feature_dtypes[feat] == "TYPE_INT64":
            arr = np.full(layout.max_len, FIRST_REAL_ID, dtype="<i8")
        else:
            arr = np.zeros(layout.max_len, dtype="<f4")
        out[_warmup_file(name)] = arr.tobytes()
    out[_warmup_file(ins[-1])] = np.array([layout.max_len], dtype="<i8").tobytes()
    return out


def postprocess_config(layout: Layout, cfg: ExportConfig) -> str:
    return (
        _header("postprocess step")
        + f'name: {_q(POSTPROCESS_MODEL)}\nbackend: "python"\nmax_batch_size: 0\n'
        + STEP_VERSION_POLICY
        + _io("input", [_tensor(OUT_ENCODED_IDS, "TYPE_INT64", [-1, layout.k])])
        + _io("output", [_tensor(OUT_ITEM_IDS, layout.item_dtype, [-1, layout.k])])
        + _dynamic_batching(cfg)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _params({"first_real_id": str(FIRST_REAL_ID)})
    )


def _step(model: str, input_map: dict[str, str], output_map: dict[str, str], version: int = -1) -> str:
    """input_map/output_map: composing model's tensor name -> ensemble tensor name; version: the pinned
    step version (-1, the latest READY one, only for the single-version floor benchmark)."""
    lines = [f"    {{ model_name: {_q(model)} model_version: {int(version)}"]
    lines += [f"      input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in input_map.items()]
    lines += [f"      output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in output_map.items()]
    return "\n".join(lines) + " }"


def ensemble_config(layout: Layout, cfg: ExportConfig, version: int = 1) -> str:
    """The ensemble serving whole-repository version `version`: its own version folder only
    (`specific`) and every step pinned to that version (never -1: with -1 a request could mix
    preprocess N+1 with model N while the steps load one by one). `pin_ensemble` re-pins it."""
    k = layout.k
    inputs = [_tensor(n, triton_dtype(dt), [-1]) for n, dt in layout.raw_inputs.items()]
    outputs = [
        _tensor(OUT_SESSION_ID, "TYPE_INT64", [-1]),
        _tensor(OUT_ITEM_IDS, layout.item_dtype, [-1, k]),
        _tensor(OUT_SCORES, "TYPE_FP32", [-1, k]),
    ]
    model_ins, model_outs = model_io_names(layout, cfg.torch_backend)
    tensors = [*layout.features, LENGTHS_TENSOR]
    steps = [
        _step(
            PREPROCESS_MODEL,
            {n: n for n in layout.raw_inputs},
            {n: n for n in [OUT_SESSION_ID, *tensors]},
            version,
        ),
        _step(
            TORCH_MODEL,
            dict(zip(model_ins, tensors)),
            {model_outs[0]: OUT_SCORES, model_outs[1]: OUT_ENCODED_IDS},
            version,
        ),
        _step(POSTPROCESS_MODEL, {OUT_ENCODED_IDS: OUT_ENCODED_IDS}, {OUT_ITEM_IDS: OUT_ITEM_IDS}, version),
    ]
    return (
        _header("ensemble")
        + f'name: {_q(ENSEMBLE_NAME)}\nplatform: "ensemble"\n'
        + "# 0: requests carry any number of interaction rows; the model step batches over sessions\n"
        + "max_batch_size: 0\n"
        + f"version_policy: {{ specific: {{ versions: [ {int(version)} ] }} }}\n"
        + _io("input", inputs)
        + _io("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


_PINS = (
    (re.compile(r"(model_version: )-?\d+"), r"\g<1>{v}"),
    (re.compile(r"(version_policy: \{ specific: \{ versions: \[ )\d+( \] \} \})"), r"\g<1>{v}\g<2>"),
)


def pin_ensemble(text: str, version: int) -> str:
    """The ensemble config.pbtxt `text` (written by `ensemble_config`) pinned to `version`."""
    for pattern, repl in _PINS:
        text, n = pattern.subn(repl.format(v=int(version)), text)
        if not n:
            raise ValueError(f"ensemble config has no {pattern.pattern!r}: re-export the repository")
    return text


def ensemble_version(text: str) -> int:
    """The version the ensemble config.pbtxt `text` pins."""
    m = _PINS[1][0].search(text)
    if m is None:
        raise ValueError("ensemble config pins no version: re-export the repository")
    return int(re.search(r"\d+", m.group(0)).group(0))


# --- writing ------------------------------------------------------------------
def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _write_step_code(version_dir: Path, step: str) -> None:
    """model.py of `step` and the modules it imports, copied verbatim from their one source."""
    _write(version_dir / "model.py", (TEMPLATES / step / "model.py").read_text())
    for name in STEP_MODULES[step]:
        _write(version_dir / name, SHIPPED[name].read_text())


def _clear_out(out: Path) -> None:
    """Remove a previous export from `out`; refuse to touch model directories it did not write."""
    if not out.exists():
        return
    previous = []
    if (out / MANIFEST).is_file():
        previous = json.loads((out / MANIFEST).read_text()).get("models", [])
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


def check_same_workflow(run: Path, data: Path, schema: Schema) -> None:
    """RUN/meta.json's workflow_sha256 (recorded at training time) must equal DATA/schema.json's.

    Checked before anything of DATA is unpickled: a workflow.pkl replaced together
    with its hashes in schema.json is refused here, not loaded."""
    from training.checkpoint import read_meta

    want, got = schema.workflow_sha256, read_meta(run).get("workflow_sha256")
    if not want or not got:
        raise ValueError(f"{run}/meta.json or {data}/{SCHEMA_FILE} records no workflow_sha256: re-run training")
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


def _serve_state(cfg: ExportConfig, schema: Schema) -> Served:
    from training.data.serving_transform import ServingTransform

    run = window_run(Path(cfg.run), cfg.window)
    check_same_workflow(run, Path(cfg.data), schema)  # before the workflow pickle is loaded
    # checks the workflow files' sha256 against schema.json, then unpickles; window t: known prefix only
    transform = ServingTransform.load(cfg.data, window=cfg.window).compiled
    vocab = np.asarray(transform.item_vocabulary(), dtype=np.int64)
    traced, cards = _trace(run, Path(cfg.data), schema, cfg)
    if cfg.window is not None and len(vocab) > cards[schema.item_feature]:
        raise ValueError(
            f"{run}: the model's item table has {cards[schema.item_feature]} rows but {len(vocab)} items are "
            f"known after window {cfg.window}: the checkpoint is not the state after window {cfg.window}"
        )
    return Served(run, cfg.window, transform, vocab, traced, cards)


def _trace(run: Path, data: Path, schema: Schema, cfg: ExportConfig):
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


MODEL_PARAMS = "sessrec_model.json"  # model/<version>/: what the model step checks that changes per version


def _staged(folder: Path) -> Path:
    """A temporary sibling of a version folder (not numeric: Triton ignores it until the rename)."""
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _write_version(out: Path, version: int, served: Served, layout: Layout, cfg: ExportConfig,
                   schema: Schema) -> dict:
    """preprocess/<v>, model/<v>, postprocess/<v>, session_ranker/<v>, each written completely
    under a temporary name with its own sessrec_files.json, then renamed into place (steps first,
    the ensemble's folder last). Returns the version's run record."""
    from export.inference import save_traced

    v = str(version)
    for name in MODELS:
        if (out / name / v).exists():
            raise FileExistsError(f"{out / name / v} exists already: a version is written once")
    run_rec = _run_record(served.run)
    # preprocess: the compiled workflow (JSON + .npy), no pickle
    tmp = _staged(out / PREPROCESS_MODEL / v)
    _write_step_code(tmp, PREPROCESS_MODEL)
    served.transform.save(tmp)
    write_folder_record(tmp)
    tmp.rename(out / PREPROCESS_MODEL / v)
    # model
    tmp = _staged(out / TORCH_MODEL / v)
    save_traced(served.traced, tmp / TRACED_FILE)
    if cfg.torch_backend == "python":
        _write_step_code(tmp, TORCH_MODEL)
    ins, _ = model_io_names(layout, cfg.torch_backend)
    cards = {n: served.cardinalities[f] for n, f in zip(ins, layout.features) if f in served.cardinalities}
    params = {"cardinalities": cards, "window": served.window}
    _write(tmp / MODEL_PARAMS, json.dumps(params, indent=2, sort_keys=True) + "\n")
    write_folder_record(tmp, _model_record(served.run))
    tmp.rename(out / TORCH_MODEL / v)
    # postprocess
    tmp = _staged(out / POSTPROCESS_MODEL / v)
    _write_step_code(tmp, POSTPROCESS_MODEL)
    np.save(tmp / VOCAB_FILE, served.vocab, allow_pickle=False)
    write_folder_record(tmp)
    tmp.rename(out / POSTPROCESS_MODEL / v)
    # ensemble: the version's identity
    options = {k: val for k, val in asdict(cfg).items() if k not in ("run", "data", "out", "window")}
    record = {
        "ensemble": ENSEMBLE_NAME,
        "version": version,
        "window": served.window,
        "items_known": int(len(served.vocab)),
        "inputs": layout.raw_inputs,
        "outputs": {OUT_SESSION_ID: "[S]", OUT_ITEM_IDS: f"[S, {cfg.top_k}]", OUT_SCORES: f"[S, {cfg.top_k}]"},
        "options": options,
        "workflow_sha256": schema.workflow_sha256,
        "run": run_rec,
    }
    tmp = _staged(out / ENSEMBLE_NAME / v)
    _write(tmp / RUN_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_folder_record(tmp)
    tmp.rename(out / ENSEMBLE_NAME / v)
    return record


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)


def export_repository(cfg: ExportConfig) -> Path:
    """Write the repository (see the module docstring) with version 1 of every model; returns cfg.out."""
    cfg.check()
    data, out = Path(cfg.data), Path(cfg.out)
    schema = Schema.load(data)
    layout = Layout.from_schema(schema, cfg.top_k)
    served = _serve_state(cfg, schema)

    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / PREPROCESS_MODEL / "config.pbtxt", preprocess_config(layout, cfg))
    _write(out / TORCH_MODEL / "config.pbtxt", model_config(layout, cfg))
    for name, blob in warmup_data(layout, cfg).items():
        _write(out / TORCH_MODEL / "warmup" / name, blob)
    _write(out / POSTPROCESS_MODEL / "config.pbtxt", postprocess_config(layout, cfg))
    record = _write_version(out, 1, served, layout, cfg, schema)
    _write(out / ENSEMBLE_NAME / "config.pbtxt", ensemble_config(layout, cfg, 1))
    options = {k: v for k, v in asdict(cfg).items() if k not in ("run", "data", "out", "window")}
    manifest = {
        "models": list(MODELS),
        "ensemble": ENSEMBLE_NAME,
        "inputs": layout.raw_inputs,
        "options": options,
        "workflow_sha256": schema.workflow_sha256,
        "versions": {"1": {k: record[k] for k in ("window", "items_known", "run")}},
    }
    _write_manifest(out, manifest)
    return out


def _model_record(run: Path) -> dict:
    """Extra fields of a model version's sessrec_files.json: its run, and the torch that wrote model.pt
    (libtorch/torch older than that may not read the TorchScript archive)."""
    import torch

    return {"run": _run_record(run), "torch": torch.__version__}


def _run_record(run: Path) -> dict:
    """What the repository keeps about the run behind a version (its metrics at training time)."""
    meta = json.loads((Path(run) / "meta.json").read_text())
    windows = meta.get("metrics", {}).get("windows") or [{}]
    run = Path(run)
    name = f"{run.parent.parent.name}/{run.parent.name}/{run.name}" if run.parent.name == "windows" else run.name
    return {"run": name, "window": meta.get("window"), "metrics": windows[-1]}


def versions(out: Path, name: str = TORCH_MODEL) -> list[int]:
    """Numeric version directories of model `name`, ascending."""
    folder = Path(out) / name
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


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
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if manifest is None or TORCH_MODEL not in manifest.get("models", []) or "versions" not in manifest:
        raise FileNotFoundError(f"{out} holds no repository written by `python -m export`: export it first")
    schema = Schema.load(data)
    if schema.workflow_sha256 != manifest.get("workflow_sha256"):
        raise ValueError(
            f"{data} is not the DATA the repository {out} was exported from (workflow_sha256 differs): "
            "a new version must keep the preprocess step's features"
        )
    known = {f.name for f in ExportConfig.__dataclass_fields__.values()} - {"run", "data", "out", "window"}
    options = {k: v for k, v in manifest["options"].items() if k in known}
    full = ExportConfig(run=Path(cfg.run), data=data, out=out, window=cfg.window, **options)
    full.check()
    layout = Layout.from_schema(schema, full.top_k)
    expected = {
        PREPROCESS_MODEL: preprocess_config(layout, full),
        TORCH_MODEL: model_config(layout, full),
        POSTPROCESS_MODEL: postprocess_config(layout, full),
    }
    for name, text in expected.items():
        if (out / name / "config.pbtxt").read_text() != text:
            raise ValueError(
                f"{out / name / 'config.pbtxt'} differs from what these options write: the repository was "
                "edited or exported by another version of `python -m export`; re-export it"
            )
    served = _serve_state(full, schema)
    version = max(max(versions(out, n) or [0]) for n in MODELS) + 1
    record = _write_version(out, version, served, layout, full, schema)
    manifest["versions"][str(version)] = {k: record[k] for k in ("window", "items_known", "run")}
    _write_manifest(out, manifest)
    return version
