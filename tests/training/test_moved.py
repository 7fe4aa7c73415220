"""Modules moved into training/data/ (issue 16): DATA folders prepared before still load.

A fitted workflow's pickle names its op classes and functions by module path; folders
prepared before the move say `training.workflow_ops.<name>` (or `training.workflow.<name>`,
before that module existed). `training.MOVED` makes those names import as the moved
modules. Project code itself imports the new names only (checked here: an old name would
otherwise keep working unnoticed, and here, beside an editable install of another checkout,
could even load that checkout's stale file)."""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import training
from tests.conftest import REPO_ROOT
from training.data import workflow_ops
from training.names import SCHEMA_FILE, WORKFLOW_DIR

pytestmark = pytest.mark.filterwarnings("ignore:Initializing an NVTabular Dataset in CPU mode")

# what a fitted workflow pickles by reference (training/data/workflow.py builds it)
PICKLED = ["MinLength", "ItemFirstSeen", "SessionGroupby", "weekday_sin", "item_age_days"]
OLD_NAMES = ["training.workflow_ops", "training.workflow"]


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_module_names_import_as_the_moved_modules(old):
    new = training.MOVED[old]
    assert importlib.import_module(old) is importlib.import_module(new) is sys.modules[old]
    for name in PICKLED:
        # protocol 0 GLOBAL opcode: what pickle does with `<old>.<name>` in any old workflow.pkl
        assert pickle.loads(f"c{old}\n{name}\n.".encode()) is getattr(workflow_ops, name), (old, name)


@pytest.fixture(scope="module")
def real_log_data(tmp_path_factory) -> Path:
    """DATA from a small click log with timestamps: the workflow derives weekday_sin and
    age_days with LambdaOps, so its pickle names every op of PICKLED."""
    from training.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("moved")
    rs = np.random.RandomState(0)
    rows = ["sess,item,ts"]
    for s in range(80):
        t = 1_462_752_000 + int(rs.randint(0, 3 * 86_400))
        for k in range(int(rs.randint(1, 6))):
            rows.append(f"{s},{rs.randint(1, 40)},{t + 60 * k}")
    (root / "clicks.csv").write_text("\n".join(rows) + "\n")
    out = root / "data"
    prepare(
        PrepareConfig(
            out=out, path=root / "clicks.csv", session_col="sess", item_col="item", time_col="ts", quiet=True
        )
    )
    return out


def _resave_under(data: Path, out: Path, module: str) -> bytes:
    """Copy of DATA whose workflow.pkl names the ops `<module>.<name>`, as older code wrote it
    (schema.json's sha256 record updated, as that code's prepare would have written it)."""
    import nvtabular as nvt

    from training.data.workflow import workflow_sha256
    from training.schema import Schema

    shutil.copytree(data, out)
    workflow = nvt.Workflow.load(str(data / WORKFLOW_DIR))
    importlib.import_module(module)  # cloudpickle pickles by reference only what sys.modules holds
    objects = [getattr(workflow_ops, name) for name in PICKLED]
    saved = [o.__module__ for o in objects]
    try:
        for o in objects:
            o.__module__ = module
        shutil.rmtree(out / WORKFLOW_DIR)
        workflow.save(str(out / WORKFLOW_DIR))
    finally:
        for o, m in zip(objects, saved):
            o.__module__ = m
    schema = dataclasses.replace(Schema.load(out), workflow_sha256=workflow_sha256(out))
    (out / SCHEMA_FILE).write_text(schema.to_json())
    return (out / WORKFLOW_DIR / "workflow.pkl").read_bytes()


def pickled_globals(data: bytes) -> set[tuple[str, str]]:
    """(module, name) of every class or function the pickle refers to (as it is unpickled)."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return seen


@pytest.mark.parametrize("old", OLD_NAMES)
def test_a_workflow_pickled_under_an_old_name_loads_and_compiles_the_same(real_log_data, tmp_path, old):
    from training.data.serving_transform import ServingTransform

    fresh = pickled_globals((real_log_data / WORKFLOW_DIR / "workflow.pkl").read_bytes())
    assert {(m, n) for m, n in fresh if n in PICKLED} == {("training.data.workflow_ops", n) for n in PICKLED}
    pickled = pickled_globals(_resave_under(real_log_data, tmp_path / "data", old))
    assert {(m, n) for m, n in pickled if n in PICKLED} == {(old, n) for n in PICKLED}
    assert not [m for m, _ in pickled if m.startswith("training.data")]

    want, got = ServingTransform.load(real_log_data), ServingTransform.load(tmp_path / "data")
    assert got.compiled.spec["steps"] == want.compiled.spec["steps"]
    assert sorted(got.compiled.arrays) == sorted(want.compiled.arrays)
    for k, v in want.compiled.arrays.items():
        np.testing.assert_array_equal(got.compiled.arrays[k], v, err_msg=k)


# every module that left training/ for training/data/ (issue 16), by its old name
OLD_MODULES = [
    "training.ingest",
    "training.synthetic",
    "training.workflow",
    "training.workflow_ops",
    "training.serving_transform",
    "training.sessrec_transform",
    "training.grouping",
    "training.reference_workflow",
]
OLD_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(?P<from>training(?:\.\w+)*)[ \t]+import[ \t]+(?P<names>\([^)]*\)|[^\n]+)"
    r"|import[ \t]+(?P<mod>training(?:\.\w+)*))",
    re.M,
)
DATA_MODULES = {p.stem for p in (REPO_ROOT / "training" / "data").glob("*.py")}


def _old_imports(text: str) -> list[str]:
    """The moved modules `text` imports by their old names."""
    found = []
    for m in OLD_IMPORT.finditer(text):
        names = [n.split()[0] for n in (m.group("names") or "").strip("()").split(",") if n.strip()]
        if m.group("from") == "training":  # from training import workflow as wf, synthetic
            targets = [f"training.{n}" for n in names]
        else:
            targets = [m.group("from") or m.group("mod")]
        found += [t for t in targets if any(t == o or t.startswith(o + ".") for o in OLD_MODULES)]
        if m.group("from") == "training.data":  # was the split loader's module, now training.data.splits
            found += [f"training.data.{n}" for n in names if n not in DATA_MODULES]
    return found


def test_project_code_imports_the_new_names_only():
    stale = {}
    for folder in ("training", "export", "clients", "bench", "tests", "scripts"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path.name == "test_moved.py":
                continue
            found = _old_imports(path.read_text())
            if found:
                stale[str(path.relative_to(REPO_ROOT))] = found
    assert not stale, f"import the moved modules from training.data: {stale}"


def test_the_old_names_have_no_file_of_their_own():
    for old in OLD_MODULES:
        rel = Path(*old.split(".")).with_suffix(".py")
        assert not (REPO_ROOT / rel).exists(), rel
    assert not (REPO_ROOT / "training" / "data.py").exists()
