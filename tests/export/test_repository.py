"""export/repository.py and export/staging.py: the repository writer (and `python -m export`'s flags), its version
folders and config.pbtxt (golden files), no server. The traced module is tests/export/test_inference.py, the step
functions tests/export/test_sessrec_steps.py."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.floor import FLOOR_ENSEMBLE, write_floor_repository
from export.inference import (
    feature_order,
)
from export.pbtxt import Layout, ensemble_configs, ensemble_version, pin_ensemble, step_configs
from export.repository import ExportConfig, add_ensemble_version, export_repository
from export.staging import MANIFEST, RUN_RECORD, SHIPPED, STEP_MODULES
from tests.triton_util import PROJECT_ROOT, parse_config, served_config
from tests.triton_util import K as SERVED_K
from training.integrity import FOLDER_RECORD, verify_folder
from training.names import (
    ENSEMBLE_NAME,
    LENGTHS_TENSOR,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    TORCH_MODEL,
)
from training.schema import Schema

K = 10


# --- repository ------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(artifacts, tmp_path_factory):
    data, run = artifacts
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    return export_repository(ExportConfig(run=run, data=data, out=out, top_k=K))


def test_repository_layout(repo):
    """Per-folder records (was: one root manifest listing every file's sha256): each version folder
    lists the sha256 of every other file it holds, and verifies on its own."""
    for rel in [
        f"{ENSEMBLE_NAME}/config.pbtxt",
        f"{ENSEMBLE_NAME}/1/{RUN_RECORD}",
        f"{PREPROCESS_MODEL}/1/model.py",
        f"{PREPROCESS_MODEL}/1/sessrec_transform.py",
        f"{PREPROCESS_MODEL}/1/workflow.json",
        f"{TORCH_MODEL}/1/model.pt",
        f"{TORCH_MODEL}/1/model.py",
        f"{POSTPROCESS_MODEL}/1/item_vocabulary.npy",
        MANIFEST,
    ]:
        assert (repo / rel).is_file(), rel
    assert not list(repo.rglob("*.pkl")) and not (repo / PREPROCESS_MODEL / "1" / "workflow").exists()
    for model in (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL):
        folder = repo / model / "1"
        record = json.loads((folder / FOLDER_RECORD).read_text())
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != FOLDER_RECORD)
        assert sorted(record["files_sha256"]) == files, model
        for rel, sha in record["files_sha256"].items():
            assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == sha, rel
        verify_folder(folder)
    run = json.loads((repo / ENSEMBLE_NAME / "1" / RUN_RECORD).read_text())
    spec = json.loads((repo / PREPROCESS_MODEL / "1" / "workflow.json").read_text())
    assert run["workflow_sha256"] == spec["workflow_sha256"] and run["run"]["run"] and run["version"] == 1


def test_shipped_modules_are_verbatim_copies(repo):
    """One source: every sessrec_*.py in a version folder is byte-identical to its file in the project."""
    for step, names in STEP_MODULES.items():
        for name in names:
            assert (repo / step / "1" / name).read_bytes() == SHIPPED[name].read_bytes(), (step, name)


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("backend", ["python", "libtorch"])
def test_repository_python_files_import_only_what_a_stock_image_has(artifacts, repo, tmp_path, backend):
    """Every .py in an exported repository parses as Python 3.10 (the 24.0x stub) and imports only the
    standard library, numpy, triton_python_backend_utils, torch (model step) and its own folder's modules."""
    if backend == "libtorch":
        data, run = artifacts
        repo = export_repository(ExportConfig(run=run, data=data, out=tmp_path / "repo", top_k=K, torch_backend="libtorch"))
    pys = sorted(repo.rglob("*.py"))
    assert pys
    for path in pys:
        tree = ast.parse(path.read_text(), str(path), feature_version=(3, 10))
        own = {p.stem for p in path.parent.glob("*.py")}
        allowed = set(sys.stdlib_module_names) | {"numpy", "triton_python_backend_utils"} | own
        if path.parts[-3] == TORCH_MODEL:
            allowed.add("torch")
        bad = _imports(tree) - allowed
        assert not bad, f"{path.relative_to(repo)} imports {sorted(bad)}"


def test_repository_holds_no_pickle(repo):
    """No .pkl, no file that pickle would load; .npy files load with allow_pickle=False; model.pt is a
    TorchScript zip (code as TorchScript source + tensors), not a pickled nn.Module."""
    import pickle
    import zipfile

    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        assert path.suffix not in (".pkl", ".pickle", ".npz"), path
        data = path.read_bytes()
        try:
            pickle.loads(data)  # noqa: S301  safe here: the test wrote these files itself
        except Exception:  # noqa: BLE001  anything that is not a whole pickle
            pass
        else:
            pytest.fail(f"{path} unpickles")
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        if path.name == "model.pt":
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            assert any(n.endswith("/code/__torch__.py") or "/code/" in n for n in names), names[:10]


def test_ensemble_config_is_consistent(repo, schema):
    ens = parse_config(repo / ENSEMBLE_NAME / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in ens.input] == [(n, [-1]) for n in schema["raw_inputs"]]
    assert [o.name for o in ens.output] == [OUT_SESSION_ID, OUT_ITEM_IDS, OUT_SCORES]
    assert OUT_SESSION_ID not in schema["raw_inputs"], "an ensemble output named like an input never returns"
    assert [list(o.dims) for o in ens.output] == [[-1], [-1, K], [-1, K]]
    # every step input is an ensemble input or produced by an earlier step, and maps a real tensor
    available = {i.name for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        cfg = parse_config(repo / step.model_name / "config.pbtxt")
        assert set(step.input_map) == {i.name for i in cfg.input}, step.model_name
        assert set(step.output_map) <= {o.name for o in cfg.output}, step.model_name
        assert set(step.input_map.values()) <= available, step.model_name
        available |= set(step.output_map.values())
    assert {o.name for o in ens.output} <= available


def test_model_step_config(repo, schema):
    cfg = parse_config(repo / TORCH_MODEL / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 64
    assert [i.name for i in cfg.input] == [*feature_order(schema), LENGTHS_TENSOR]
    lengths = cfg.input[-1]
    assert list(lengths.dims) == [1] and list(lengths.reshape.shape) == []
    assert cfg.HasField("dynamic_batching")
    assert [w.batch_size for w in cfg.model_warmup] == [1, 64]
    for w in cfg.model_warmup:
        for name, inp in w.inputs.items():
            assert (repo / TORCH_MODEL / "warmup" / inp.input_data_file).is_file(), name
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert json.loads(params["input_order"]) == [*feature_order(schema), LENGTHS_TENSOR]


def test_libtorch_variant(artifacts, schema, tmp_path):
    data, run = artifacts
    out = export_repository(ExportConfig(run=run, data=data, out=tmp_path / "repo", top_k=K, torch_backend="libtorch"))
    cfg = parse_config(out / TORCH_MODEL / "config.pbtxt")
    assert cfg.platform == "pytorch_libtorch" and cfg.default_model_filename == "model.pt"
    assert not (out / TORCH_MODEL / "1" / "model.py").exists()
    names = [*feature_order(schema), LENGTHS_TENSOR]
    assert [i.name for i in cfg.input] == [f"{n}__{i}" for i, n in enumerate(names)]
    assert [o.name for o in cfg.output] == ["scores__0", "encoded_item_ids__1"]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert {p: v.string_value for p, v in cfg.parameters.items()} == {"INFERENCE_MODE": "true"}
    ens = parse_config(out / ENSEMBLE_NAME / "config.pbtxt")
    step = next(s for s in ens.ensemble_scheduling.step if s.model_name == TORCH_MODEL)
    assert dict(step.input_map) == {f"{n}__{i}": n for i, n in enumerate(names)}
    # libtorch binds `<name>__<i>` to the i-th positional argument of the traced forward
    traced = torch.jit.load(str(out / TORCH_MODEL / "1" / "model.pt"))
    assert len(traced.forward.schema.arguments) == 1 + len(names)  # self + features + lengths


def test_export_is_deterministic(artifacts, tmp_path):
    """Two exports in fresh processes write byte-identical repositories."""
    data, run = artifacts
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        proc = subprocess.run(
            [sys.executable, "-m", "export", "--run", str(run), "--data", str(data), "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(outs[0]), files(outs[1])
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_export_replaces_its_own_output_and_keeps_the_readme(artifacts, tmp_path):
    data, run = artifacts
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "README.md").write_text("kept\n")
    cfg = ExportConfig(run=run, data=data, out=out, top_k=K)
    export_repository(cfg)
    export_repository(cfg)
    assert (out / "README.md").read_text() == "kept\n"
    (out / "someone_elses_model").mkdir()
    with pytest.raises(FileExistsError, match="someone_elses_model"):
        export_repository(cfg)


def test_new_version_writes_self_verifying_folders_and_nothing_else(artifacts, tmp_path):
    """--new-version (whole ensemble, issue 12): version 2 of every step and of the ensemble, each
    folder with its own sessrec_files.json (the model's naming its run) holding the same files as
    version 1; no config.pbtxt and no other file changes (the ensemble still pins 1), the root
    bookkeeping lists version 2."""
    data, run = artifacts
    out = export_repository(ExportConfig(run=run, data=data, out=tmp_path / "repo", top_k=K))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert add_ensemble_version(ExportConfig(run=run, data=data, out=out)) == 2
    record = verify_folder(out / TORCH_MODEL / "2")
    assert record["run"]["run"] == run.name and record["torch"] == torch.__version__
    for model in (ENSEMBLE_NAME, PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL):
        verify_folder(out / model / "2")
        files = [sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
                 for d in (out / model / "1", out / model / "2")]  # fmt: skip
        assert files[0] == files[1], model
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST and "/2/" not in str(p)}
    assert after == before
    assert set(json.loads((out / MANIFEST).read_text())["versions"]) == {"1", "2"}


def test_configs_pin_versions_and_keep_two(repo):
    """Steps keep two versions (latest 2) and carry nothing that changes per version; the ensemble
    pins its own version and every step's; pin_ensemble re-pins exactly those."""
    for step in (PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL):
        cfg = parse_config(repo / step / "config.pbtxt")
        assert cfg.version_policy.latest.num_versions == 2, step
        assert all(p not in cfg.parameters for p in ("cardinalities", "window")), step
    text = (repo / ENSEMBLE_NAME / "config.pbtxt").read_text()
    ens = parse_config(repo / ENSEMBLE_NAME / "config.pbtxt")
    assert list(ens.version_policy.specific.versions) == [1] and ensemble_version(text) == 1
    assert [s.model_version for s in ens.ensemble_scheduling.step] == [1, 1, 1]
    moved = pin_ensemble(text, 7)
    assert ensemble_version(moved) == 7 and moved.count("model_version: 7") == 3
    assert pin_ensemble(moved, 1) == text
    params = json.loads((repo / TORCH_MODEL / "1" / "sessrec_model.json").read_text())
    assert set(params["cardinalities"]) == {f for f in json.loads((repo / PREPROCESS_MODEL / "1" / "workflow.json").read_text())["categorical"]}


GOLDEN = PROJECT_ROOT / "export" / "golden"
UPDATE_GOLDEN = "SESSREC_UPDATE_GOLDEN"  # =1: rewrite export/golden/ from the code (then review the diff)


def golden_texts(schema: Schema) -> dict[str, str]:
    """{model: config.pbtxt} of the serving tests' export (tests/triton_util.served_config), version 1."""
    cfg = served_config(Path("RUN"), Path("DATA"), Path("REPO"))
    layout = Layout.from_schema(schema, cfg.top_k)
    return {**ensemble_configs(layout, cfg, 1), **step_configs(layout, cfg)}


def test_configs_equal_the_golden_files(tiny_synthetic_data):
    """export/golden/<model>/config.pbtxt is what the serving tests' repository serves (synthetic DATA,
    --top-k 20 --max-request-rows 2000 --max-batch-sessions 64): the text a reader sees is the text written.
    tests/export/test_serving.py checks the served repository's files against the same golden files."""
    texts = golden_texts(Schema.load(tiny_synthetic_data))
    assert sorted(texts) == sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
    for model, text in texts.items():
        path = GOLDEN / model / "config.pbtxt"
        if os.environ.get(UPDATE_GOLDEN) == "1":
            path.write_text(text)
        assert text == path.read_text(), (
            f"export/pbtxt.py writes another {model}/config.pbtxt than {path}: if the change is meant, "
            f"rewrite the golden files with {UPDATE_GOLDEN}=1 pytest tests/export/test_repository.py -k golden"
        )
    text_format.Parse(texts[TORCH_MODEL], model_config_pb2.ModelConfig())  # and Triton's parser reads them
    assert f"dims: [ {SERVED_K} ]" in texts[TORCH_MODEL]


def test_floor_repository_configs(tmp_path, schema):
    out = write_floor_repository(tmp_path / "floor", schema["raw_inputs"])
    ens = parse_config(out / FLOOR_ENSEMBLE / "config.pbtxt")
    assert [i.name for i in ens.input] == list(schema["raw_inputs"])
    assert len(ens.ensemble_scheduling.step) == 2


# --- command lines (flags derived from the config dataclasses; same flags, same meaning) ------------
def test_export_flags_keep_their_meaning(tmp_path):
    from export.__main__ import parse_args

    base = ["--run", "R", "--data", "D"]
    assert parse_args(base) == parse_args([*base, "--out", "model_repository"])
    plain = parse_args(base)
    assert (plain.run, plain.data, plain.out, plain.new_version) == (Path("R"), Path("D"), Path("model_repository"), False)
    assert plain.options() == ExportConfig(run=Path("R"), data=Path("D")).options()
    flags = {"--top-k": ("top_k", "7", 7), "--torch-backend": ("torch_backend", "libtorch", "libtorch"),
             "--instance-kind": ("instance_kind", "gpu", "gpu"), "--max-batch-sessions": ("max_batch_sessions", "8", 8),
             "--max-request-rows": ("max_request_rows", "9", 9), "--max-queue-delay-us": ("max_queue_delay_us", "10", 10),
             "--torch-threads": ("torch_threads", "2", 2), "--model-instances": ("model_instances", "3", 3),
             "--preprocess-instances": ("preprocess_instances", "4", 4), "--max-queue-size": ("max_queue_size", "0", 0),
             "--queue-timeout-us": ("queue_timeout_us", "5", 5), "--window": ("window", "2", 2),
             "--out": ("out", "X", Path("X"))}  # fmt: skip
    for flag, (name, text, value) in flags.items():
        assert getattr(parse_args([*base, flag, text]), name) == value, flag
    assert parse_args([*base, "--new-version"]).new_version is True
    config = tmp_path / "export.json"
    config.write_text(json.dumps({"run": "from-file", "data": "D", "top_k": 5, "window": 1}))
    cfg = parse_args(["--config", str(config), "--top-k", "9"])
    assert (cfg.run, cfg.top_k, cfg.window) == (Path("from-file"), 9, 1)  # the file, then the flags
    with pytest.raises(SystemExit) as e:
        parse_args([*base, "--torch-backend", "onnx"])
    assert e.value.code == 2
