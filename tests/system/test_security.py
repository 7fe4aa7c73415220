"""What the exporter and the server load, and what they refuse.

- Nothing in training/, export/, clients/ unpickles except the NVTabular workflow
  (Workflow.load, after its files' sha256 were checked): torch.load only with
  weights_only=True, np.load only with allow_pickle=False, no pickle/joblib/yaml/eval.
- `python -m export` refuses a DATA whose workflow files were modified, a RUN
  trained on another workflow, and a model.pt that would unpickle code.
- Nothing in an exported repository is a pickle (tests/export/test_repository.py scans it);
  the workflow pickle is read only by `python -m export`, after its sha256 check.
- A file changed after export makes its step refuse to load, with a message
  naming the file: each version folder checks itself against its own
  sessrec_files.json (one tritonserver start for three tampered preprocess
  folders; the same check of every step's files without a server; a folder
  copied alone still verifies).
- Defaults bind 127.0.0.1 and restrict the admin APIs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from export.__main__ import main as export_main
from export.repository import ExportConfig, add_ensemble_version
from export.tritonserver import ServerConfig, ServerError, TritonServer
from tests.triton_util import PROJECT_ROOT
from training.integrity import FOLDER_RECORD, IntegrityError, verify_folder
from training.names import (
    ENSEMBLE_NAME,
    POSTPROCESS_MODEL,
    PREPROCESS_MODEL,
    SCHEMA_FILE,
    TORCH_MODEL,
    WORKFLOW_DIR,
)


@pytest.fixture(scope="module")
def repo(exported_repo):
    return exported_repo  # the default export, shared (read-only: the tamper tests copy folders first)


# --- static: what can unpickle ---------------------------------------------------------------------
SOURCES = sorted(p for d in ("training", "export", "clients", "bench") for p in (PROJECT_ROOT / d).rglob("*.py"))


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PROJECT_ROOT)) for p in SOURCES])
def test_no_code_executing_loads(path):
    text = path.read_text()
    for mod in ("pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "yaml"):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if mod in names and not (mod == "pickle" and path.name == "__main__.py"):  # exception type only
                    pytest.fail(f"{path}: imports {mod}")
    for call, func in _calls(path):
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if func in ("eval", "exec"):
            pytest.fail(f"{path}:{call.lineno}: {func}()")
        if func.endswith("torch.load"):
            assert kwargs.get("weights_only") == "True", f"{path}:{call.lineno}: torch.load without weights_only=True"
        if func in ("np.load", "numpy.load"):
            assert kwargs.get("allow_pickle") in (None, "False"), f"{path}:{call.lineno}: np.load(allow_pickle=True)"
        if func.endswith("read_pickle"):
            pytest.fail(f"{path}:{call.lineno}: {func}")
        if func.endswith("Workflow.load"):
            assert path.name == "serving_transform.py", f"{path}:{call.lineno}: Workflow.load outside ServingTransform.load"


def test_workflow_is_unpickled_only_after_its_sha256_check():
    source = (PROJECT_ROOT / "training" / "data" / "serving_transform.py").read_text()
    body = source[source.index("    def load(cls, data_dir"):]
    body = body[: body.index("\n    # ----")]
    assert body.index("verify_workflow_files(") < body.index("nvt.Workflow.load(")


def test_pyarrow_is_not_the_one_that_unpickles_extension_types():
    """pyarrow < 14.0.1 unpickles PyExtensionType metadata of a parquet/IPC file (CVE-2023-47248)."""
    import pyarrow

    version = tuple(int(x) for x in re.findall(r"\d+", pyarrow.__version__)[:3])
    assert version >= (14, 0, 1), f"pyarrow {pyarrow.__version__} executes code from crafted parquet files"


# --- the exporter refuses -------------------------------------------------------------------------
def _copy_data(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst, ignore=shutil.ignore_patterns("sessions_by_day", "interactions.parquet"))
    return dst


def test_export_refuses_a_tampered_workflow(artifacts, tmp_path, capsys):
    data, run = artifacts
    bad = _copy_data(data, tmp_path / "data")
    with open(bad / WORKFLOW_DIR / "workflow.pkl", "ab") as f:
        f.write(b"\x00")
    out = tmp_path / "repo"
    code = export_main(["--run", str(run), "--data", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: "), err
    assert "workflow.pkl" in err and "sha256" in err and "refusing" in err, err
    assert not out.exists()


def _evil_pickle(marker: Path) -> bytes:
    """Hostile input, written as bytes (nothing is persisted with pickle): pickle protocol 0 that
    calls os.system("touch marker") when loaded (GLOBAL os.system, a one-string tuple, REDUCE)."""
    return ("cos\nsystem\n(S" + repr(f"touch {marker}") + "\ntR.").encode()


def test_export_refuses_a_run_trained_on_another_workflow(artifacts, tmp_path, capsys):
    """DATA whose workflow.pkl was replaced (here by a pickle that runs code) and whose schema.json was
    re-hashed to match: the run's training-time workflow_sha256 disagrees, and nothing is unpickled."""
    from training.data.workflow import workflow_sha256

    data, run = artifacts
    other = _copy_data(data, tmp_path / "data")
    marker = tmp_path / "pwned"
    (other / WORKFLOW_DIR / "workflow.pkl").write_bytes(_evil_pickle(marker))
    schema = json.loads((other / SCHEMA_FILE).read_text())
    schema["workflow_sha256"] = workflow_sha256(other)
    (other / SCHEMA_FILE).write_text(json.dumps(schema))
    code = export_main(["--run", str(run), "--data", str(other), "--out", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert code == 2 and "another workflow" in err and "meta.json" in err, err
    assert not marker.exists(), "the workflow pickle was loaded"


def test_export_loads_model_pt_with_weights_only(artifacts, tmp_path, capsys):
    """A model.pt that would run code when unpickled (sha256 in meta.json updated to match) is refused,
    and the code does not run."""
    import pickle

    import torch

    data, run = artifacts
    bad_run = tmp_path / "run"
    shutil.copytree(run, bad_run)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": Evil()}, bad_run / "model.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    meta = json.loads((bad_run / "meta.json").read_text())
    if "files" in meta:
        meta["files"]["model.pt"] = hashlib.sha256((bad_run / "model.pt").read_bytes()).hexdigest()
    (bad_run / "meta.json").write_text(json.dumps(meta))
    code = export_main(["--run", str(bad_run), "--data", str(data), "--out", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err, err
    assert "Weights only load failed" in err or "weights_only" in err, err
    assert not marker.exists(), "unpickling model.pt ran code"


def test_new_version_refuses_other_data(artifacts, repo, tmp_path):
    data, run = artifacts
    other = _copy_data(data, tmp_path / "data")
    schema = json.loads((other / SCHEMA_FILE).read_text())
    schema["workflow_sha256"] = {**schema["workflow_sha256"], f"{WORKFLOW_DIR}/metadata.json": "0" * 64}
    (other / SCHEMA_FILE).write_text(json.dumps(schema))
    with pytest.raises(ValueError, match="not the DATA the repository"):
        add_ensemble_version(ExportConfig(run=run, data=other, out=repo))


# --- the server refuses ------------------------------------------------------------------------------
def _clone_step(repo: Path, out: Path, step: str, name: str) -> Path:
    """Copy the model folder `step` of `repo` to `out/<name>` (config name changed): it carries its own record."""
    shutil.copytree(repo / step, out / name)
    cfg = (out / name / "config.pbtxt").read_text()
    (out / name / "config.pbtxt").write_text(cfg.replace(f'name: "{step}"', f'name: "{name}"'))
    return out / name


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\x00")


def _first_array(version_dir: Path) -> Path:
    return sorted((version_dir / "workflow_arrays").glob("*categorify*values.npy"))[0]


@pytest.mark.triton
def test_tampered_repository_files_refuse_to_load(repo, tmp_path):
    """Three preprocess folders changed after export; tritonserver (exit-on-error) does not start, and each
    folder's load failure says why, naming the file, before anything of it is loaded:
    - pre_array: a vocabulary array no longer matches the folder's sessrec_files.json;
    - pre_code: the shipped transform module was edited;
    - pre_pickle: someone dropped a pickle into the folder (unlisted: refused; nothing would load it anyway).
    (Before per-folder records, the repository's root manifest held every hash and a re-hashed workflow
    pickle was caught by the run's workflow_sha256; there is no pickle to load now.)"""
    out = tmp_path / "tampered"
    out.mkdir()
    step = _clone_step(repo, out, PREPROCESS_MODEL, "pre_array")
    _append(_first_array(step / "1"))
    step = _clone_step(repo, out, PREPROCESS_MODEL, "pre_code")
    with open(step / "1" / "sessrec_transform.py", "a") as f:
        f.write("\nimport os  # injected\n")
    step = _clone_step(repo, out, PREPROCESS_MODEL, "pre_pickle")
    (step / "1" / "workflow.pkl").write_bytes(b"\x80\x04N.")
    expect = {
        "pre_array": [".values.npy has sha256", "refusing to load it"],
        "pre_code": ["sessrec_transform.py has sha256", "refusing to load it"],
        "pre_pickle": ["workflow.pkl is not listed in sessrec_files.json", "refusing to load"],
    }
    server = TritonServer(ServerConfig(repo=out, grpc_port=0, http_port=0, metrics_port=0))
    with pytest.raises(ServerError):
        server.start()
    log = server.log_path.read_text(errors="replace")
    for name, texts in expect.items():
        lines = [line for line in log.splitlines() if f"failed to load '{name}'" in line]
        assert lines, f"{name}: no load failure in the log:\n{log[-4000:]}"
        for text in texts:
            assert any(text in line and "IntegrityError" in line for line in lines), (name, text, lines)


@pytest.mark.parametrize(
    "step, tamper, message",
    [
        (PREPROCESS_MODEL, lambda d: _append(_first_array(d)), "values.npy has sha256"),
        (PREPROCESS_MODEL, lambda d: (d / "workflow_arrays" / "extra.pkl").write_bytes(b"\x80\x04N."), "is not listed"),
        (PREPROCESS_MODEL, lambda d: (d / "workflow.json").unlink(), "workflow.json is missing"),
        (PREPROCESS_MODEL, lambda d: _append(d / "sessrec_transform.py"), "sessrec_transform.py has sha256"),
        (TORCH_MODEL, lambda d: _append(d / "model.pt"), "model.pt has sha256"),
        (TORCH_MODEL, lambda d: (d / "model.py").write_text("import os\n"), "model.py has sha256"),
        (TORCH_MODEL, lambda d: _append(d / "sessrec_steps.py"), "sessrec_steps.py has sha256"),
        (POSTPROCESS_MODEL, lambda d: _append(d / "item_vocabulary.npy"), "item_vocabulary.npy has sha256"),
        (POSTPROCESS_MODEL, lambda d: _append(d / "sessrec_integrity.py"), "sessrec_integrity.py has sha256"),
        (ENSEMBLE_NAME, lambda d: _append(d / "sessrec_run.json"), "sessrec_run.json has sha256"),
    ],
    ids=["vocabulary-array", "extra-pickle", "spec-missing", "transform-code", "model-pt", "model-py",
         "steps-code", "vocabulary", "integrity-code", "run-record"],
)  # fmt: skip
def test_every_step_checks_its_files_before_loading(repo, tmp_path, step, tamper, message):
    """What each step's initialize() runs first (sessrec_integrity.verify_folder), on a tampered copy of the
    model folder alone (was: against the repository's root manifest; now each folder carries its record)."""
    copy = tmp_path / "alone" / step
    shutil.copytree(repo / step, copy)  # the model folder copied alone
    verify_folder(copy / "1")  # untouched: passes
    tamper(copy / "1")
    with pytest.raises(IntegrityError, match=re.escape(message)):
        verify_folder(copy / "1")


def test_a_folder_without_its_record_is_refused(repo, tmp_path):
    copy = tmp_path / TORCH_MODEL
    shutil.copytree(repo / TORCH_MODEL, copy)
    (copy / "1" / FOLDER_RECORD).unlink()
    with pytest.raises(IntegrityError, match="sessrec_files.json not found"):
        verify_folder(copy / "1")


def test_defaults_bind_loopback_and_restrict_admin_apis(tmp_path):
    from export.serve import parse_args

    cfg = ServerConfig(repo=tmp_path)
    assert cfg.host == "127.0.0.1"
    assert parse_args(["--repo", "x"]).host == "127.0.0.1"
    cmd = TritonServer(cfg).command(tmp_path)
    for flag in ("--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in cmd
    restricted = [a for a in cmd if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2
    for arg in restricted:
        apis = arg.split("=", 1)[1].split(":", 1)[0].split(",")
        assert {"model-repository", "shared-memory", "logging", "trace"} <= set(apis), arg
