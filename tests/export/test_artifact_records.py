"""What an exported repository records about itself (issue 18, "Also fix"):

- each step's sessrec_files.json covers its model folder's config.pbtxt and warm-up files too, so a
  changed `max_request_sessions` or a changed warm-up byte is refused like a changed model.pt;
- every step's model.py verifies its folder before it imports anything of it but the checker
  (sessrec_integrity): the model step used to import sessrec_steps first;
- model.pt carries no TorchScript debug records, hence none of the export machine's paths.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from export.staging import MODELS
from training.integrity import FOLDER_RECORD, MODEL_FILES, IntegrityError, verify_folder
from training.names import ENSEMBLE_NAME, POSTPROCESS_MODEL, PREPROCESS_MODEL, TORCH_MODEL

STEPS = [m for m in MODELS if m != ENSEMBLE_NAME and not m.startswith(ENSEMBLE_NAME)]


@pytest.fixture(scope="module")
def repo(exported_repo) -> Path:
    return exported_repo  # read-only: the tamper tests copy folders first


def _copy(repo: Path, step: str, tmp_path: Path) -> Path:
    copy = tmp_path / "alone" / step
    shutil.copytree(repo / step, copy)
    verify_folder(copy / "1")  # untouched: passes
    return copy


def test_step_records_list_config_and_warmup(repo):
    for step in STEPS:
        import json

        record = json.loads((repo / step / "1" / FOLDER_RECORD).read_text())
        listed = set(record[MODEL_FILES])
        on_disk = {p.relative_to(repo / step).as_posix() for p in (repo / step).rglob("*")
                   if p.is_file() and not p.relative_to(repo / step).parts[0].isdigit()}  # fmt: skip
        assert listed == on_disk and "config.pbtxt" in listed, (step, listed)
    assert any(k.startswith("warmup/") for k in json.loads((repo / TORCH_MODEL / "1" / FOLDER_RECORD).read_text())[MODEL_FILES])


@pytest.mark.parametrize(
    "step,tamper,message",
    [
        (PREPROCESS_MODEL, lambda d: (d / "config.pbtxt").write_text(
            (d / "config.pbtxt").read_text().replace('"max_request_sessions" value { string_value: "64"',
                                                     '"max_request_sessions" value { string_value: "65"')),
         "config.pbtxt has sha256"),
        (TORCH_MODEL, lambda d: next((d / "warmup").iterdir()).write_bytes(
            b"\x01" + next((d / "warmup").iterdir()).read_bytes()[1:]), ".bin has sha256"),
        (TORCH_MODEL, lambda d: (d / "warmup" / "extra.bin").write_bytes(b"\0" * 8), "is not listed"),
        (POSTPROCESS_MODEL, lambda d: (d / "config.pbtxt").unlink(), "config.pbtxt is missing"),
    ],
    ids=["max-request-sessions", "warmup-byte", "extra-warmup-file", "config-missing"],
)  # fmt: skip
def test_a_changed_config_or_warmup_is_refused(repo, tmp_path, step, tamper, message):
    copy = _copy(repo, step, tmp_path)
    before = (copy / "config.pbtxt").read_text() if (copy / "config.pbtxt").exists() else None
    tamper(copy)
    if step == PREPROCESS_MODEL:
        assert (copy / "config.pbtxt").read_text() != before, "the tamper did not change max_request_sessions"
    with pytest.raises(IntegrityError, match=re.escape(message)):
        verify_folder(copy / "1")


def test_other_versions_and_staged_folders_are_not_model_files(repo, tmp_path):
    """Version folders (numeric) and staged ones (`.N.tmp`) are not the model folder's own files."""
    copy = _copy(repo, PREPROCESS_MODEL, tmp_path)
    shutil.copytree(copy / "1", copy / "2")
    (copy / ".3.tmp").mkdir()
    (copy / ".3.tmp" / "half.json").write_text("{}")
    verify_folder(copy / "1")


def _module_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def test_every_step_verifies_its_folder_before_importing_from_it(repo):
    """At module level a step's model.py imports only the standard library, numpy, torch,
    triton_python_backend_utils and sessrec_integrity (the checker); in initialize, verify_folder comes
    before any other import of a sessrec_ module and before anything is read."""
    for path in sorted(repo.glob("*/1/model.py")):
        tree = ast.parse(path.read_text())
        own = _module_level_imports(tree) & {p.stem for p in path.parent.glob("sessrec_*.py")}
        assert own <= {"sessrec_integrity"}, f"{path.relative_to(repo)} imports {sorted(own)} before verifying"
        init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "initialize")
        calls = [n for n in ast.walk(init) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "verify_folder"]
        imports = [n for n in ast.walk(init) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sessrec_")]
        assert calls, path
        assert all(i.lineno > calls[0].lineno for i in imports), path


def test_model_pt_names_no_path_of_the_export_machine(repo):
    """No `.debug_pkl` record (the traced graph's source ranges) and no byte of the checkout's or the
    interpreter's absolute paths anywhere in model.pt; the archive still loads and ranks."""
    import torch

    from tests.triton_util import PROJECT_ROOT

    path = repo / TORCH_MODEL / "1" / "model.pt"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert names and not [n for n in names if n.endswith(".debug_pkl")]
    blob = path.read_bytes()
    for root in {str(PROJECT_ROOT), sys.prefix, sys.base_prefix, str(Path(torch.__file__).parent)}:
        assert root.encode() not in blob, root
    assert torch.jit.load(str(path)) is not None
