"""Start and stop a real tritonserver for tests: 127.0.0.1, free ports, its own temp log.

    from tests.triton_util import running_server
    with running_server(repo) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

`served_config` is the serving tests' export (the `server` fixture of conftest.py):
top-k K, at most MAX_ROWS rows and MAX_SESSIONS sessions per request. The config.pbtxt
it gives each step is export/golden/<step>/config.pbtxt.

Free ports are picked by binding port 0 and closing it, so another process can
take one before the server binds it; a start that fails with "address in use"
is retried on new ports.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.config import ExportConfig
from export.tritonserver import PROJECT_ROOT, ServerConfig, ServerError, TritonServer

# The serving tests' export options (tests/export/test_serving.py, tests/system/test_hostile.py; export/golden/)
K = 20  # --top-k
MAX_ROWS = 2000  # --max-request-rows (the bad-input tests send one more)
MAX_SESSIONS = 64  # --max-batch-sessions


def served_config(run: Path, data: Path, out: Path) -> ExportConfig:
    """The export the `server` fixture serves (and the golden configs show)."""
    return ExportConfig(run=run, data=data, out=out, top_k=K, max_request_rows=MAX_ROWS, max_batch_sessions=MAX_SESSIONS)


def start_server(repo: Path, attempts: int = 3, ready_timeout_s: float = 300.0, **settings) -> TritonServer:
    """A started TritonServer on free loopback ports; `settings`: other ServerConfig fields (e.g.
    model_control="explicit", which a server with live stateful sessions needs to stop with exit 0)."""
    last: ServerError | None = None
    for _ in range(attempts):
        server = TritonServer(
            ServerConfig(repo=Path(repo), grpc_port=0, http_port=0, metrics_port=0, ready_timeout_s=ready_timeout_s,
                         **settings)  # fmt: skip
        )
        try:
            return server.start()
        except ServerError as e:
            last = e
            if "address already in use" not in str(e).lower() and "failed to start" not in str(e).lower():
                raise
    raise ServerError(f"tritonserver did not start in {attempts} attempts") from last


@contextlib.contextmanager
def running_server(repo: Path) -> Iterator[TritonServer]:
    server = start_server(repo)
    try:
        yield server
    finally:
        server.stop()


# --- a trained run to export and serve, made once per pytest process -----------
SERVING_ROWS = 30_000  # synthetic rows: enough for >= 500 validation sessions over all windows
_ARTIFACTS: dict[Path, tuple[Path, Path]] = {}


def _run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=PROJECT_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"`python {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def trained_artifacts(root: Path) -> tuple[Path, Path]:
    """(DATA, RUN) under `root`: synthetic data (seed 0) and a 1-epoch run on its first window.

    The run has the item memory on (`--memory`, as the real-data recipe trains it), so
    every export and serving test also checks the memory's count tables end to end.
    Memoised per root, so test modules sharing pytest's base temp dir train once."""
    root = Path(root)
    if root not in _ARTIFACTS:
        data, run = root / "serving-data", root / "serving-run"
        if not (data / "schema.json").is_file():
            _run(["-m", "training.prepare", "--synthetic", "--seed", "0", "--num-rows", str(SERVING_ROWS),
                  "--out", str(data), "--quiet"])
        if not (run / "meta.json").is_file():
            _run(["-m", "training.train", "--data", str(data), "--out", str(run), "--epochs", "1",
                  "--end-window", "2", "--memory", "--no-progress"])
        _ARTIFACTS[root] = (data, run)
    return _ARTIFACTS[root]


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """A config.pbtxt as Triton's parser reads it."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
