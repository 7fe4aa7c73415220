"""Shared session-scoped fixtures.

- `repo_root`: the repository root (Path).
- `diginetica_dir`: `<repo>/../shared/data/diginetica`; the test is skipped (with a
  reason) when the extracts are absent.
- `tiny_synthetic_data`: DATA folder prepared from 3,000 synthetic interactions
  (seed 0, ~580 sessions over days 1..9); about a second to build.
- `diginetica_data`: DATA folder prepared from diginetica-views-7days.tsv (skipped
  when absent); a few seconds to build.
- `diginetica_run`: a 1-epoch `real`-recipe RUN on it (windows 2..3).

- `exported_repo`: `artifacts` exported with the default options, once (read-only).
- `artifacts`: (DATA, RUN) of a 30,000-row synthetic log and a 1-epoch run, made once
  per pytest process (tests/triton_util.trained_artifacts); `schema` and
  `interactions` are its schema.json and interactions.parquet. Used by the serving,
  export, reliability and security tests.
- `server`: a tritonserver (127.0.0.1, free ports) serving `artifacts` exported with the
  serving tests' options (tests/triton_util.served_config), one per test module that asks
  for it; stopping it must exit 0. Used by tests/export/test_serving.py and tests/system/test_hostile.py.

Treat the DATA folders as read-only (copy them before modifying anything).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGINETICA_DIR = REPO_ROOT.parent / "shared" / "data" / "diginetica"
DIGINETICA_TSV = "diginetica-views-7days.tsv"
DIGINETICA_CSV = "diginetica-raw-sample.csv"
TINY_ROWS = 3_000

# Flags that read each DIGINETICA extract unchanged.
DIGINETICA_TSV_FLAGS = [
    "--session-col", "sessionId", "--item-col", "itemId", "--time-col", "Time",
    "--order-col", "timeframe", "--time-unit", "s",
]  # fmt: skip
DIGINETICA_CSV_FLAGS = [
    "--sep",
    ";",
    "--time-col",
    "eventdate",
    "--time-unit",
    "date",
    "--order-col",
    "timeframe",
]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def diginetica_dir() -> Path:
    if not (DIGINETICA_DIR / DIGINETICA_TSV).is_file() or not (DIGINETICA_DIR / DIGINETICA_CSV).is_file():
        pytest.skip(
            f"DIGINETICA extracts not found in {DIGINETICA_DIR} (../shared/data/diginetica is absent)"
        )
    return DIGINETICA_DIR


@pytest.fixture(scope="session")
def tiny_synthetic_data(tmp_path_factory) -> Path:
    from training.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("tiny_synthetic") / "data"
    prepare(PrepareConfig(out=out, synthetic=True, seed=0, num_rows=TINY_ROWS, quiet=True))
    return out


@pytest.fixture(scope="session")
def diginetica_data(tmp_path_factory, diginetica_dir) -> Path:
    from training.data.prepare import prepare
    from training.prepare import config_from_args

    out = tmp_path_factory.mktemp("diginetica") / "data"
    prepare(
        config_from_args(
            ["--input", str(diginetica_dir / DIGINETICA_TSV), *DIGINETICA_TSV_FLAGS, "--out", str(out)]
        )
    )
    return out


@pytest.fixture(scope="session")
def diginetica_run(tmp_path_factory, diginetica_data) -> Path:
    """RUN of the `real` recipe (masked LM, item memory with the two-hop fill) on `diginetica_data`, windows 2..3, 1 epoch
    (window 1's training split is empty under the growing-vocabulary protocol: nothing is known after
    it). Made once per pytest process (test_standalone, test_stateful_parity)."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("diginetica_run") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--data", str(diginetica_data), "--out", str(run), "--recipe", "real",
         "--start-window", "2", "--end-window", "3", "--epochs", "1", "--no-progress"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> tuple[Path, Path]:
    from tests.triton_util import trained_artifacts

    return trained_artifacts(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def exported_repo(artifacts, tmp_path_factory) -> Path:
    """`artifacts` exported with the default options (top-k 20), once per pytest process: read it, or
    copy a folder before changing it (test_security, test_artifact_records)."""
    from export.repository import ExportConfig, export_repository

    data, run = artifacts
    return export_repository(
        ExportConfig(run=run, data=data, out=tmp_path_factory.mktemp("exported") / "model_repository")
    )


@pytest.fixture(scope="session")
def schema(artifacts) -> dict:
    import json

    return json.loads((artifacts[0] / "schema.json").read_text())


@pytest.fixture(scope="session")
def interactions(artifacts):
    import pandas as pd

    from training.names import INTERACTIONS_FILE

    return pd.read_parquet(artifacts[0] / INTERACTIONS_FILE)


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    from export.repository import export_repository
    from tests.triton_util import served_config, start_server

    data, run = artifacts
    repo = export_repository(served_config(run, data, tmp_path_factory.mktemp("served") / "model_repository"))
    srv = start_server(repo)
    yield srv
    assert srv.stop() == 0, srv.log_tail()
