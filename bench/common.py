"""What the benchmarks share: the project root and the artifacts a serving benchmark needs.

`ensure_artifacts` gives (DATA, RUN): the given ones when they exist, else a
synthetic DATA (`python -m training.prepare --synthetic --seed 0`) and a
1-epoch RUN on windows 1..2 (`python -m training.train`) made under a work
folder, once (a second call finds them there). bench.serving and bench.soak use it.

Requests built from real sessions and the bounded load generator are client
code (clients.load); the floor ensemble is export.floor.write_floor_repository
(tests serve it too); the reference notebook's ETL graph is
training.data.reference_workflow (the parity test's specification).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from export.tritonserver import PROJECT_ROOT
from training.names import SCHEMA_FILE

__all__ = ["PROJECT_ROOT", "ensure_artifacts"]


def ensure_artifacts(data: Path, run: Path, work: Path) -> tuple[Path, Path]:
    """(DATA, RUN): `data` and `run` when they hold a prepared DATA and a trained RUN, else ones made in `work`."""
    data, run, work = Path(data), Path(run), Path(work)
    if not (data / SCHEMA_FILE).is_file():
        wanted, data = data, work / "data"
        if not (data / SCHEMA_FILE).is_file():
            print(f"no DATA at {wanted}: preparing synthetic data in {data}", flush=True)
            subprocess.run([sys.executable, "-m", "training.prepare", "--synthetic", "--seed", "0", "--out",
                            str(data), "--quiet"], check=True, cwd=PROJECT_ROOT)  # fmt: skip
    if not (run / "meta.json").is_file():
        wanted, run = run, work / "run"
        if not (run / "meta.json").is_file():
            print(f"no RUN at {wanted}: training 1 epoch into {run}", flush=True)
            subprocess.run([sys.executable, "-m", "training.train", "--data", str(data), "--out", str(run),
                            "--epochs", "1", "--end-window", "3", "--no-progress"], check=True, cwd=PROJECT_ROOT)  # fmt: skip
    return data, run
