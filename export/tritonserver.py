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
- the venv's `bin/` first on `PATH`. The stub is an embedded CPython started
  with an isolated configuration: it ignores PYTHONPATH and PYTHONHOME (checked:
  neither shows up in the stub's sys.path) and finds its installation through
  the `python3` first on PATH (a venv's `bin/python3` + `pyvenv.cfg` gives that
  venv's site-packages), the same mechanism as Triton's EXECUTION_ENV_PATH
  (`source <env>/bin/activate`). Its sys.path starts with '' (the server's
  working directory), so the server runs in its temp directory, never in the
  project root: exported model folders import nothing of the project.
  `ServerConfig.stub_python_env` puts another venv's `bin/` first instead (e.g.
  one holding only numpy and torch, as a stock tritonserver image would).

    with TritonServer(ServerConfig(repo=Path("model_repository"), grpc_port=0)) as server:
        print(server.grpc_url)          # 127.0.0.1:<free port>

Port 0 means "pick a free loopback port". `stop()` sends SIGINT (Triton drains
in-flight requests, then exits) and escalates to SIGKILL after a timeout.

Hardening, always on:
- every endpoint binds `ServerConfig.host` (127.0.0.1 unless asked otherwise);
- the model-repository (load/unload: with explicit model control a client could
  otherwise load a model, i.e. Python code, of its choosing), shared-memory,
  logging and trace APIs answer only requests that carry the header
  `sessrec-admin-key: <admin_key>` (`--http-restricted-api`/`--grpc-restricted-protocol`);
  the key is random per server unless `ServerConfig.admin_key` sets it.

`StubWatchdog` restarts a Python-backend step whose stub process died: Triton
2.51 does not (checked: after `kill -9` of a stub every request to that step
fails with INTERNAL "Stub process '<model>_0_0' is not healthy." after a 1 s
health-check wait, forever, while /v2/health/ready still answers 200).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from training.cli import help_meta

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """The server binary is missing, failed to start or never became ready."""


ADMIN_HEADER = "sessrec-admin-key"  # header (gRPC metadata key) the restricted APIs require
ADMIN_KEY_ENV = "SESSREC_ADMIN_KEY"  # where `python -m export.serve` / `export.versions` read the key
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")


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


def server_env(base: dict[str, str] | None = None, stub_env: Path | None = None) -> dict[str, str]:
    """Environment for the server process (see the module docstring).

    `stub_env`: a venv (`bin/python3`, `pyvenv.cfg`, `lib/python3.X/site-packages`) for
    the Python-backend stubs: its `bin/` first on PATH, this project's venv removed from
    PATH, PYTHONPATH/PYTHONHOME unset; the stub then sees that venv's packages only."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
    ld = [p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    for key in (
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
    ):  # the stub ignores them; keep them from misleading
        env.pop(key, None)
    first = str(Path(stub_env) / "bin") if stub_env is not None else venv_bin
    env["PATH"] = os.pathsep.join([first, *path])
    env["PYTHONNOUSERSITE"] = "1"
    return env


def repository_post(http_url: str, path: str, headers: Mapping[str, str], timeout_s: float = 600.0) -> bytes:
    """POST `/v2/repository/<path>` (index, models/<m>/load, models/<m>/unload): the restricted
    model-repository API, so `headers` carry the admin key. Returns the answer's body; ServerError
    naming the call and the server's message otherwise."""
    url = f"http://{http_url}/v2/repository/{path}"
    req = urllib.request.Request(url, data=b"{}", method="POST", headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise ServerError(f"POST {url} failed ({e.code}): {e.read().decode(errors='replace')}") from e


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free on `host` a moment ago: all bound to 0 at once, read, closed.
    (One socket at a time can be handed the same port twice, and tritonserver refuses to start
    when its gRPC and HTTP ports are the same.)"""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            socks[-1].bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


MODEL_CONTROL_HELP = help_meta(
    "explicit: every model loaded at start, load/unload API open to the admin key; "
    "none: models fixed at start (no new versions, no stub restarts)",
    choices=("explicit", "none"),
)


@dataclass
class ServerConfig:
    """One server's settings; the fields with help text are `python -m export.serve`'s flags."""

    repo: Path = field(metadata=help_meta("model repository written by `python -m export`"))
    host: str = field(
        default="127.0.0.1", metadata=help_meta("address all endpoints bind (default: loopback only)")
    )
    grpc_port: int = field(default=8001, metadata=help_meta("gRPC port (0 = a free port)"))
    http_port: int = field(default=8000, metadata=help_meta("HTTP port (0 = a free port)"))
    metrics_port: int = field(default=8002, metadata=help_meta("Prometheus metrics port (0 = a free port)"))
    # model loading includes torch imports and warm-up
    ready_timeout_s: float = field(
        default=300.0,
        metadata=help_meta("seconds to wait for every model to load", flags=["--ready-timeout"]),
    )
    exit_timeout_s: int = field(
        default=30,
        metadata=help_meta(
            "seconds in-flight requests get on shutdown (the drain of the ensembles, then tritonserver's own "
            "wait, each at most this long)",
            flags=["--exit-timeout"],
        ),
    )
    log_verbose: int = field(default=0, metadata=help_meta("tritonserver --log-verbose level"))
    log_file: Path | None = field(
        default=None, metadata=help_meta("write the server log here (default: a temp file)")
    )
    # "none": load everything at start; "explicit": load/unload API (admin key)
    model_control: str = field(default="none", metadata=MODEL_CONTROL_HELP)
    admin_key: str | None = None  # value of the sessrec-admin-key header; None: random per start
    stub_python_env: Path | None = (
        None  # None: this venv; else a venv whose python3 the stubs use (server_env)
    )
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
        if cfg.model_control not in ("none", "explicit"):
            raise ValueError(f"model_control must be 'none' or 'explicit', got {cfg.model_control!r}")
        self.admin_key = cfg.admin_key or secrets.token_hex(16)

    @property
    def admin_headers(self) -> dict[str, str]:
        """Headers for the restricted APIs (load/unload, shared memory, logging, trace)."""
        return {ADMIN_HEADER: self.admin_key}

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
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            *(["--model-control-mode=explicit", "--load-model=*"] if cfg.model_control == "explicit" else []),
            *cfg.extra_args,
        ]

    def start(self) -> TritonServer:
        if self.proc is not None:
            raise ServerError("server already started")
        repo = Path(self.cfg.repo)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist; run `python -m export` first")
        host, cfg = self.cfg.host, self.cfg
        given = {cfg.grpc_port, cfg.http_port, cfg.metrics_port} - {None, 0}
        picked = iter(p for p in free_ports(6, host) if p not in given)
        self.grpc_port = cfg.grpc_port or next(picked)
        self.http_port = cfg.http_port or next(picked)
        self.metrics_port = cfg.metrics_port or next(picked)
        ports = {"grpc_port": self.grpc_port, "http_port": self.http_port, "metrics_port": self.metrics_port}
        if len(set(ports.values())) < 3:
            raise ServerError(f"ports {ports}: expected three different ports (tritonserver listens on each)")
        self._tmp = tempfile.TemporaryDirectory(prefix="tritonserver-")
        backend_dir = prepare_backend_dir(Path(self._tmp.name) / "backends")
        self.log_path = Path(self.cfg.log_file) if self.cfg.log_file else Path(self._tmp.name) / "server.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            self.command(backend_dir),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=server_env(stub_env=self.cfg.stub_python_env),
            cwd=self._tmp.name,  # not the project root: nothing of it is importable from the cwd
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

    def repository_index(self) -> list[dict]:
        """POST /v2/repository/index: one entry per model (version) with its "name" and "state"."""
        return json.loads(repository_post(self.http_url, "index", self.admin_headers, timeout_s=5.0))

    def ready_models(self) -> list[str]:
        """Names of the models the server reports READY."""
        return sorted(m["name"] for m in self.repository_index() if m.get("state") == "READY")

    def load_model(self, name: str) -> None:
        """Load (or reload after a change on disk) a model: explicit model control only. Blocks until done."""
        repository_post(self.http_url, f"models/{name}/load", self.admin_headers)

    def unload_model(self, name: str) -> None:
        repository_post(self.http_url, f"models/{name}/unload", self.admin_headers)

    def restart_model(self, name: str) -> None:
        """Unload and load `name` again: new stub processes for a Python-backend model.

        Triton unloads the ensembles that use `name` with it and loads them again
        when `name` is back; models that were READY before and are not after the
        load are loaded explicitly. The model is unavailable meanwhile (NOT_FOUND)."""
        before = set(self.ready_models())
        self.unload_model(name)
        deadline = time.monotonic() + 60
        while name in self.ready_models() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.load_model(name)
        for other in sorted(before - set(self.ready_models())):
            self.load_model(other)

    # --- processes -------------------------------------------------------------
    def processes(self) -> list[ProcInfo]:
        """tritonserver and every process below it (the Python-backend stubs)."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)

    def stub_processes(self) -> list[ProcInfo]:
        """The Python-backend stubs (children of tritonserver), live or zombie."""
        if self.proc is None:
            return []
        return [p for p in process_tree(self.proc.pid) if p.ppid == self.proc.pid]

    def rss_bytes(self) -> int:
        """Resident memory of tritonserver plus its stub processes (each process's VmRSS, summed)."""
        return sum(p.rss_bytes for p in self.processes())

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until /v2/health/ready (strict readiness: every model is ready)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def model_config(self, name: str) -> dict:
        """GET /v2/models/<name>/config (the config Triton serves, as JSON)."""
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{name}/config", timeout=5.0) as r:
            return json.load(r)

    def ensembles(self) -> list[str]:
        """READY models whose config says platform "ensemble"."""
        return [name for name in self.ready_models() if self.model_config(name).get("platform") == "ensemble"]

    def sequence_models(self) -> list[str]:
        """READY models with a sequence batcher (the stateful step)."""
        return [name for name in self.ready_models() if "sequence_batching" in self.model_config(name)]

    def model_states(self) -> dict[str, str]:
        """model -> state from the repository index (READY, UNLOADING, UNAVAILABLE, ...)."""
        return {m["name"]: m.get("state", "") for m in self.repository_index()}

    def drain(self, timeout_s: float) -> bool:
        """Let in-flight ensemble requests finish before shutdown (explicit model control).

        tritonserver 2.51's own shutdown (SIGINT) stops every scheduler at once,
        so an ensemble request in flight fails at its next step with UNAVAILABLE
        "Server is stopping, scheduler for model has stopped accepting new
        inference requests" (checked: 8 of 8 in-flight requests failed). Unloading
        the ensembles first keeps their steps serving: Triton finishes the
        in-flight requests and answers new ones NOT_FOUND ("... has no available
        versions"). Then the models with a sequence batcher (preprocess_stateful) are unloaded
        too: tritonserver counts every live sequence (a stateful session not ended yet) as an
        in-flight inference, so its shutdown would wait --exit-timeout-secs for sessions that may
        never end and exit 1 (checked on 2.51); an unload drops them at once (their clients resend
        to the next server, see clients/sessions.py). Returns True when every ensemble and
        sequence model was gone within timeout_s."""
        if self.cfg.model_control != "explicit" or self.proc is None or self.proc.poll() is not None:
            return False
        deadline = time.monotonic() + timeout_s
        for kind in (self.ensembles, self.sequence_models):
            names = kind()
            for name in names:
                self.unload_model(name)
            while True:
                states = self.model_states()
                if all(states.get(n) not in ("READY", "UNLOADING", "LOADING") for n in names):
                    break
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
        return True

    def stop(self, timeout_s: float | None = None, keep_log: bool = False, drain: bool = True) -> int | None:
        """Drain (explicit model control, see `drain`), SIGINT, wait, then SIGKILL the process group.

        Returns the exit code. Triton waits up to `exit_timeout_s` for in-flight
        requests and model unloads. A temp log is copied out before its folder
        goes away when the server failed (exit code not 0) or `keep_log`;
        `log_path` then points at the copy. `timeout_s` (default: exit_timeout_s + 30)
        bounds the wait after SIGINT."""
        if timeout_s is None:
            timeout_s = self.cfg.exit_timeout_s + 30.0
        code = None
        if self.proc is not None:
            if drain and self.proc.poll() is None:
                try:
                    self.drain(self.cfg.exit_timeout_s)
                except (OSError, ServerError, ValueError) as e:  # urllib errors are OSErrors
                    print(f"tritonserver: drain failed ({e}); stopping anyway", file=sys.stderr, flush=True)
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


# --- /proc helpers ------------------------------------------------------------------
@dataclass
class ProcInfo:
    pid: int
    ppid: int
    state: str  # R, S, Z (zombie: exited, not reaped), ...
    rss_bytes: int
    cmdline: list[str]

    @property
    def model(self) -> str | None:
        """For a Python-backend stub: the model whose `<model>/<version>/model.py` it runs."""
        for arg in self.cmdline:
            if arg.endswith("/model.py"):
                parts = Path(arg).parts
                return parts[-3] if len(parts) >= 3 else None
        return None

    @property
    def version(self) -> int | None:
        """For a Python-backend stub: the version folder it runs (two are loaded during a swap)."""
        for arg in self.cmdline:
            if arg.endswith("/model.py"):
                parts = Path(arg).parts
                return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        return None


def _proc_info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
    rest = stat[stat.rindex(")") + 2 :].split()
    rss = int(statm[1]) * os.sysconf("SC_PAGE_SIZE") if len(statm) > 1 else 0
    return ProcInfo(pid, int(rest[1]), rest[0], rss, [c.decode(errors="replace") for c in cmdline if c])


def process_tree(root: int) -> list[ProcInfo]:
    """`root` and its descendants (Linux /proc); [] when root is gone."""
    infos = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_info(int(entry))
            if info is not None:
                infos.append(info)
    children: dict[int, list[ProcInfo]] = {}
    for info in infos:
        children.setdefault(info.ppid, []).append(info)
    top = next((i for i in infos if i.pid == root), None)
    if top is None:
        return []
    out, todo = [], [top]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p.pid, []))
    return out


class StubWatchdog:
    """Restart Python-backend steps whose stub process died (explicit model control only).

    Every `interval_s` it lists tritonserver's stub processes. A stub that
    Triton stops itself (unload, a new version) is reaped and disappears; one
    that crashed or was killed stays a zombie, because Triton 2.51 neither
    waits for it nor starts a new one. For each new zombie the watchdog calls
    `TritonServer.restart_model` (unload + load) for the model the stub ran.
    `events` records (time, model, what happened)."""

    def __init__(self, server: TritonServer, interval_s: float = 1.0, log=None):
        if server.cfg.model_control != "explicit":
            raise ValueError("StubWatchdog needs a server with model_control='explicit' (it reloads models)")
        self.server = server
        self.interval_s = interval_s
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.events: list[tuple[float, str, str]] = []
        self._models: dict[int, str] = {}  # pid -> model, remembered while the stub was alive
        self._handled: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """One round: returns the models restarted."""
        restarted = []
        for p in self.server.stub_processes():
            if p.state != "Z" and p.model:
                self._models[p.pid] = p.model
            elif p.state == "Z" and p.pid not in self._handled:
                self._handled.add(p.pid)
                model = self._models.get(p.pid)
                if model is None:
                    continue  # died before we ever saw it alive: nothing to map it to
                self.log(f"watchdog: the stub of model '{model}' (pid {p.pid}) died; restarting '{model}'")
                t0 = time.monotonic()
                try:
                    self.server.restart_model(model)
                except (ServerError, OSError) as e:
                    self.events.append((time.time(), model, f"restart failed: {e}"))
                    self.log(f"watchdog: restarting '{model}' failed: {e}")
                    continue
                self.events.append((time.time(), model, f"restarted in {time.monotonic() - t0:.1f} s"))
                self.log(f"watchdog: '{model}' is back after {time.monotonic() - t0:.1f} s")
                restarted.append(model)
        return restarted

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.server.proc is None or self.server.proc.poll() is not None:
                return
            try:
                self.check()
            except (OSError, urllib.error.URLError) as e:  # the server is going away; the owner notices
                self.log(f"watchdog: {e}")

    def start(self) -> StubWatchdog:
        self.check()  # remember the stubs alive now
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
