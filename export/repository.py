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
`add_model_version` (`python -m export ... --new-version`) adds another run as
version N+1 of the model step next to the served one; with explicit model
control the server loads it without downtime (see export/README.md).
"""

from __future__ import annotations

import json
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
    "sessrec_transform.py": _ROOT / "training" / "sessrec_transform.py",
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


def preprocess_config(layout: Layout, cfg: ExportConfig) -> str:
    L = layout.max_len
    inputs = [_tensor(n, triton_dtype(dt), [-1]) for n, dt in layout.raw_inputs.items()]
    outputs = [_tensor(OUT_SESSION_ID, "TYPE_INT64", [-1])]
    outputs += [_tensor(f, layout.feature_dtypes[f], [-1, L]) for f in layout.features]
    outputs += [_tensor(LENGTHS_TENSOR, "TYPE_INT64", [-1, 1])]
    return (
        _header("preprocess step")
        + f'name: {_q(PREPROCESS_MODEL)}\nbackend: "python"\nmax_batch_size: 0\n'
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
        cards = {n: int(layout.cardinalities[f]) for n, f in zip(ins, layout.features) if f in layout.cardinalities}
        params = {
            "input_order": json.dumps(ins),
            "torch_threads": str(cfg.torch_threads),
            "cardinalities": json.dumps(cards),
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
        + _io("input", [_tensor(OUT_ENCODED_IDS, "TYPE_INT64", [-1, layout.k])])
        + _io("output", [_tensor(OUT_ITEM_IDS, layout.item_dtype, [-1, layout.k])])
        + _dynamic_batching(cfg)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _params({"first_real_id": str(FIRST_REAL_ID)})
    )


def _step(model: str, input_map: dict[str, str], output_map: dict[str, str]) -> str:
    """input_map/output_map: composing model's tensor name -> ensemble tensor name."""
    lines = [f"    {{ model_name: {_q(model)} model_version: -1"]
    lines += [f"      input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in input_map.items()]
    lines += [f"      output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in output_map.items()]
    return "\n".join(lines) + " }"


def ensemble_config(layout: Layout, cfg: ExportConfig) -> str:
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
        ),
        _step(
            TORCH_MODEL,
            dict(zip(model_ins, tensors)),
            {model_outs[0]: OUT_SCORES, model_outs[1]: OUT_ENCODED_IDS},
        ),
        _step(POSTPROCESS_MODEL, {OUT_ENCODED_IDS: OUT_ENCODED_IDS}, {OUT_ITEM_IDS: OUT_ITEM_IDS}),
    ]
    return (
        _header("ensemble")
        + f'name: {_q(ENSEMBLE_NAME)}\nplatform: "ensemble"\n'
        + "# 0: requests carry any number of interaction rows; the model step batches over sessions\n"
        + "max_batch_size: 0\n"
        + _io("input", inputs)
        + _io("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


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


def _trace(run: Path, data: Path, schema: Schema, cfg: ExportConfig):
    """Load the run, wrap it in TopKRanker (k fixed), trace it on the serving device; returns the traced module.

    A trace records devices of tensors created inside forward as constants
    (the model's `torch.arange(..., device=x.device)`, XLNet's position
    encoding), so a GPU repository must be traced on a GPU: `--instance-kind
    gpu` needs CUDA at export time (run the export inside the NGC PyTorch
    container or any CUDA build of torch)."""
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
    n_items = schema.categorical[ITEM_LIST]
    # the guard (ids out of range -> OOV, lengths clamped) is part of the trace: see TopKRanker
    ranker = TopKRanker(model.to(device), schema.features, cfg.top_k, n_items, schema.categorical, schema.max_len)
    torch.manual_seed(0)
    traced = trace_ranker(ranker, tuple(t.to(device) for t in example_inputs(schema, batch=8)))
    other = {d for d in baked_devices(traced) if torch.device(d).type != device.type}
    if other:
        raise RuntimeError(f"the traced model holds device constants {sorted(other)} but serves on {device}")
    return traced


def export_repository(cfg: ExportConfig) -> Path:
    """Write the repository (see the module docstring); returns cfg.out."""
    from export.inference import save_traced
    from training.serving_transform import ServingTransform

    cfg.check()
    run, data, out = Path(cfg.run), Path(cfg.data), Path(cfg.out)
    schema = Schema.load(data)
    layout = Layout.from_schema(schema, cfg.top_k)
    check_same_workflow(run, data, schema)  # before the workflow pickle is loaded
    transform = ServingTransform.load(data)  # checks the workflow files' sha256 against schema.json, then unpickles
    vocab = np.asarray(transform.item_vocabulary(), dtype=np.int64)
    traced = _trace(run, data, schema, cfg)

    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    # preprocess: the compiled workflow (JSON + .npy), no pickle
    pre = out / PREPROCESS_MODEL
    _write(pre / "config.pbtxt", preprocess_config(layout, cfg))
    _write_step_code(pre / "1", PREPROCESS_MODEL)
    transform.compiled.save(pre / "1")
    # model
    mdl = out / TORCH_MODEL
    _write(mdl / "config.pbtxt", model_config(layout, cfg))
    (mdl / "1").mkdir(parents=True, exist_ok=True)
    save_traced(traced, mdl / "1" / TRACED_FILE)
    if cfg.torch_backend == "python":
        _write_step_code(mdl / "1", TORCH_MODEL)
    for name, blob in warmup_data(layout, cfg).items():
        _write(mdl / "warmup" / name, blob)
    # postprocess
    post = out / POSTPROCESS_MODEL
    _write(post / "config.pbtxt", postprocess_config(layout, cfg))
    _write_step_code(post / "1", POSTPROCESS_MODEL)
    np.save(post / "1" / VOCAB_FILE, vocab, allow_pickle=False)
    # ensemble: the run's identity lives in its own folder
    ens = out / ENSEMBLE_NAME
    _write(ens / "config.pbtxt", ensemble_config(layout, cfg))
    options = {k: v for k, v in asdict(cfg).items() if k not in ("run", "data", "out")}
    run_record = {
        "ensemble": ENSEMBLE_NAME,
        "inputs": layout.raw_inputs,
        "outputs": {OUT_SESSION_ID: "[S]", OUT_ITEM_IDS: f"[S, {cfg.top_k}]", OUT_SCORES: f"[S, {cfg.top_k}]"},
        "options": options,
        "workflow_sha256": schema.workflow_sha256,
        "model_versions": {"1": _run_record(run)},
    }
    _write(ens / "1" / RUN_RECORD, json.dumps(run_record, indent=2, sort_keys=True) + "\n")
    # per-folder records, written last in each folder
    for name in MODELS:
        write_folder_record(out / name / "1", _model_record(run) if name == TORCH_MODEL else None)
    manifest = {"models": list(MODELS), **run_record}
    _write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _model_record(run: Path) -> dict:
    """Extra fields of a model version's sessrec_files.json: its run, and the torch that wrote model.pt
    (libtorch/torch older than that may not read the TorchScript archive)."""
    import torch

    return {"run": _run_record(run), "torch": torch.__version__}


def _run_record(run: Path) -> dict:
    """What the repository keeps about the run behind a model version (its metrics at training time)."""
    meta = json.loads((Path(run) / "meta.json").read_text())
    windows = meta.get("metrics", {}).get("windows") or [{}]
    return {"run": Path(run).name, "window": meta.get("window"), "metrics": windows[-1]}


def model_versions(out: Path) -> list[int]:
    """Numeric version directories of the model step, ascending."""
    return sorted(int(p.name) for p in (Path(out) / TORCH_MODEL).iterdir() if p.is_dir() and p.name.isdigit())


def add_model_version(cfg: ExportConfig) -> int:
    """Add cfg.run as the next version of the model step in the existing repository cfg.out; returns it.

    Only `model/<N>/` is written (the traced model and, for the Python backend,
    model.py) and the manifest updated; every other file stays as it is, so a
    server in explicit model-control mode swaps versions with one load call and
    no downtime (the model config keeps the default version policy, latest 1:
    Triton loads N, warms it up, and unloads N-1 only after that; in-flight
    requests finish on N-1). The export options come from the manifest; the
    run must be trained on the same workflow and give the same model inputs."""
    from export.inference import save_traced

    out, data, run = Path(cfg.out), Path(cfg.data), Path(cfg.run)
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if manifest is None or TORCH_MODEL not in manifest.get("models", []):
        raise FileNotFoundError(f"{out} holds no repository written by `python -m export`: export it first")
    schema = Schema.load(data)
    if schema.workflow_sha256 != manifest.get("workflow_sha256"):
        raise ValueError(
            f"{data} is not the DATA the repository {out} was exported from (workflow_sha256 differs): "
            "a new version must keep the preprocess step's features"
        )
    known = {f.name for f in ExportConfig.__dataclass_fields__.values()} - {"run", "data", "out"}
    options = {k: v for k, v in manifest["options"].items() if k in known}
    full = ExportConfig(run=run, data=data, out=out, **options)
    full.check()
    layout = Layout.from_schema(schema, full.top_k)
    expected_config = model_config(layout, full)
    if (out / TORCH_MODEL / "config.pbtxt").read_text() != expected_config:
        raise ValueError(
            f"{out / TORCH_MODEL / 'config.pbtxt'} differs from what these options write: "
            "the repository was edited or exported by another version of `python -m export`; re-export it"
        )
    from training.workflow import verify_workflow_files

    verify_workflow_files(data, schema)
    traced = _trace(run, data, schema, full)
    version = (model_versions(out) or [0])[-1] + 1
    vdir = out / TORCH_MODEL / str(version)
    tmp = out / TORCH_MODEL / f".{version}.tmp"  # not numeric: Triton ignores it until the rename
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_traced(traced, tmp / TRACED_FILE)
    if full.torch_backend == "python":
        _write_step_code(tmp, TORCH_MODEL)
    write_folder_record(tmp, _model_record(run))  # the new version verifies on its own, before the directory appears
    manifest.setdefault("model_versions", {})[str(version)] = _run_record(run)
    _write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.rename(vdir)
    return version
