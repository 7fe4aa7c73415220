"""Run the Triton Inference Server binary bundled in the `nvidia-pytriton` wheel.

No Docker: the wheel carries tritonserver 2.51.0 with the Python backend only.
This module prepares what that binary needs and owns the process:

- a private backend directory `<tmp>/python/` holding the wheel's
  `libtriton_python.so`, `triton_python_backend_utils.py` and the Python-backend
  stub built for the running interpreter (the wheel ships stubs for 3.8..3.13
  in `python_backend_stubs/3.X/`; the backend looks for the stub next to
  `libtriton_python.so`), so the installed wheel is never modified;
- `LD_LIBRARY_PATH` = the interpreter's LIBDIR first (the stub links
  `libpython3.11.so.1.0`; a system copy of another patch release fails with
  `undefined symbol: _PyModule_Add`) + the wheel's `nvidia_pytriton.libs`;
- `PYTHONPATH` = this venv's site-packages + the project root, and the venv's
  `bin/` first on `PATH`, so the stub imports torch, numpy and `training`.

    with TritonServer(ServerConfig(repo=Path("model_repository"), grpc_port=0)) as server:
        print(server.grpc_url)          # 127.0.0.1:<free port>

Port 0 means "pick a free loopback port". `stop()` sends SIGINT (Triton drains
in-flight requests, then exits) and escalates to SIGKILL after a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """The server binary is missing, failed to start or never became ready."""


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError as e:
        raise ServerError(
            "nvidia-pytriton is not installed; it carries the tritonserver binary "
            "(pip install nvidia-pytriton==0.7.0, see constraints.txt)"
        ) from e
    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    """Path of the wheel's `tritonserver` executable."""
    path = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise ServerError(f"tritonserver binary not found at {path}; reinstall nvidia-pytriton==0.7.0")
    return path


def prepare_backend_dir(dest: Path) -> Path:
    """Write `dest/python/` = the wheel's Python backend + the stub for this interpreter.

    Returns `dest` (what `--backend-directory` takes)."""
    server_dir = _pytriton_dir() / "tritonserver"
    src = server_dir / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(
            f"no Python-backend stub for Python {version} in {stub.parent.parent} "
            f"(available: {sorted(p.name for p in stub.parent.parent.iterdir())})"
        )
    py_dir = dest / "python"
    py_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(src / name, py_dir / name)
    shutil.copy2(stub, py_dir / "triton_python_backend_stub")
    return dest


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server process (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
    ld = [p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    site_packages = sysconfig.get_paths()["purelib"]
    py_path = [site_packages, str(PROJECT_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in py_path if p)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerConfig:
    repo: Path  # model repository (config.pbtxt per model)
    host: str = "127.0.0.1"  # address every endpoint binds; loopback unless asked otherwise
    grpc_port: int = 8001  # 0 = a free port
    http_port: int = 8000  # 0 = a free port
    metrics_port: int = 8002  # 0 = a free port
    ready_timeout_s: float = 300.0  # model loading includes torch imports and warm-up
    exit_timeout_s: int = 10  # how long Triton waits for in-flight requests on shutdown
    log_verbose: int = 0
    log_file: Path | None = None  # None: server output goes to a temp file (see `log_path`)
    extra_args: list[str] = field(default_factory=list)


class TritonServer:
    """One tritonserver process: `start()` (waits until every model is ready), `stop()`."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None
        self.log_path: Path | None = None
        self.grpc_port = cfg.grpc_port
        self.http_port = cfg.http_port
        self.metrics_port = cfg.metrics_port

    # --- endpoints ---------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self.metrics_port}/metrics"

    # --- lifecycle -----------------------------------------------------------
    def command(self, backend_dir: Path) -> list[str]:
        cfg = self.cfg
        return [
            str(tritonserver_binary()),
            f"--model-repository={Path(cfg.repo).resolve()}",
            f"--backend-directory={backend_dir}",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={cfg.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--log-verbose={cfg.log_verbose}",
            *cfg.extra_args,
        ]

    def start(self) -> TritonServer:
        if self.proc is not None:
            raise ServerError("server already started")
        repo = Path(self.cfg.repo)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist; run `python -m export` first")
        host = self.cfg.host
        self.grpc_port = self.cfg.grpc_port or free_port(host)
        self.http_port = self.cfg.http_port or free_port(host)
        self.metrics_port = self.cfg.metrics_port or free_port(host)
        self._tmp = tempfile.TemporaryDirectory(prefix="tritonserver-")
        backend_dir = prepare_backend_dir(Path(self._tmp.name) / "backends")
        self.log_path = Path(self.cfg.log_file) if self.cfg.log_file else Path(self._tmp.name) / "server.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            self.command(backend_dir),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=server_env(),
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we forward it once
        )
        try:
            self.wait_ready(self.cfg.ready_timeout_s)
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def log_tail(self, n_chars: int = 6000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n_chars:].decode(errors="replace")

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def ready_models(self) -> list[str]:
        """Names of the models the server reports READY (POST /v2/repository/index)."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5.0) as r:
            index = json.load(r)
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until /v2/health/ready (strict readiness: every model is ready)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0, keep_log: bool = False) -> int | None:
        """SIGINT, wait, then SIGKILL the process group. Returns the exit code.

        A temp log is copied out before its folder goes away when the server
        failed (exit code not 0) or `keep_log`; `log_path` then points at the copy."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            code = self.proc.returncode
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            failed = keep_log or code not in (0, None)
            if failed and self.cfg.log_file is None and self.log_path is not None and self.log_path.exists():
                kept = Path(tempfile.gettempdir()) / f"tritonserver-{os.getpid()}-{self.grpc_port}.log"
                shutil.copy2(self.log_path, kept)
                self.log_path = kept
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
