"""Serve a model repository on the tritonserver binary of the nvidia-pytriton wheel.

    python -m export.serve --repo model_repository
    python -m export.serve --repo model_repository --grpc-port 8001 --http-port 8000 --metrics-port 8002
    SESSREC_ADMIN_KEY=... python -m export.serve --repo model_repository    # to load new versions yourself

Binds 127.0.0.1 unless `--host` says otherwise, waits until every model (the
`session_ranker` ensemble and its steps) is ready, prints the endpoints and
runs until Ctrl-C or SIGTERM, then stops the server: the ensemble is unloaded
first (requests in flight finish through every step; new ones get NOT_FOUND),
then tritonserver gets SIGINT and waits up to `--exit-timeout` seconds for the
rest. Exit status 0 after a clean stop. Port 0 picks a free port. For a GPU
server with the libtorch backend use the NGC container instead (see
export/README.md).

Model control is explicit by default (all models loaded at start): a new
version of the model step written by `python -m export ... --new-version` is
loaded with `POST /v2/repository/models/model/load` without downtime. That API,
and the shared-memory, logging and trace APIs, answer only requests with the
header `sessrec-admin-key: $SESSREC_ADMIN_KEY` (a random key when the variable
is unset). A watchdog restarts a step whose Python-backend stub process died,
which tritonserver 2.51 does not do by itself (see export/tritonserver.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from export.tritonserver import (
    ADMIN_KEY_ENV,
    MODEL_CONTROL_HELP,
    ServerConfig,
    ServerError,
    StubWatchdog,
    TritonServer,
)
from training.cli import command_line, help_meta
from training.names import ENSEMBLE_NAME


@dataclass
class ServeConfig(ServerConfig):
    """ServerConfig as an operator runs it: explicit model control (new versions, stub restarts)
    and the stub watchdog by default. The admin key comes from $SESSREC_ADMIN_KEY (never a flag)."""

    model_control: str = field(default="explicit", metadata=MODEL_CONTROL_HELP)
    watchdog_interval: float = field(
        default=1.0,
        metadata=help_meta(
            "seconds between checks for dead Python-backend stubs (0: no watchdog; explicit mode only)"
        ),
    )

    @property
    def watchdog_interval_s(self) -> float:
        """The watchdog's period; 0 (none) unless model control is explicit (it reloads models)."""
        return self.watchdog_interval if self.model_control == "explicit" else 0.0


_parse = command_line(ServeConfig, "python -m export.serve", __doc__)


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    """Flags from ServeConfig's fields; defaults < --config FILE (JSON) < explicit flags; the admin
    key from the environment."""
    cfg = _parse(argv)
    cfg.admin_key = os.environ.get(ADMIN_KEY_ENV) or cfg.admin_key
    return cfg


def serve(cfg: ServerConfig, watchdog_interval_s: float = 0.0) -> int:
    """Start, print the endpoints, block until SIGINT/SIGTERM or the server dies; return 0 on a clean stop."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        print(f"\n{signal.Signals(signum).name}: stopping tritonserver ...", file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server = TritonServer(cfg)
    print(f"starting tritonserver on {cfg.host} with {cfg.repo} ...", file=sys.stderr, flush=True)
    try:
        server.start()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    models = server.ready_models()
    print(f"ready: {', '.join(models)}", flush=True)
    print(f"  grpc     {server.grpc_url}", flush=True)
    print(f"  http     http://{server.http_url}", flush=True)
    print(f"  metrics  {server.metrics_url}", flush=True)
    print(f"  log      {server.log_path}", flush=True)
    print(
        f"  control  {cfg.model_control}"
        + (f", stub watchdog every {watchdog_interval_s:g} s" if watchdog_interval_s else ""),
        flush=True,
    )
    if ENSEMBLE_NAME in models:
        print(
            f"  try      python -m clients.rank --url {server.grpc_url} --input data/synthetic/interactions.parquet",
            flush=True,
        )
    watchdog = StubWatchdog(server, watchdog_interval_s).start() if watchdog_interval_s > 0 else None
    died = False
    while not stop.wait(0.5):
        if server.proc is None or server.proc.poll() is not None:
            print(f"error: tritonserver exited on its own:\n{server.log_tail()}", file=sys.stderr)
            died = True
            break
    if watchdog is not None:
        watchdog.stop()
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
    if code != 0 and watchdog is not None and watchdog.events:
        print(
            "  (a step whose stub died was restarted: tritonserver 2.51 may never finish unloading the dead "
            "instance, as seen with the model step, and then exits with an error after --exit-timeout)",
            file=sys.stderr,
        )
    return 1 if died or code != 0 else 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return serve(cfg, cfg.watchdog_interval_s)


if __name__ == "__main__":
    sys.exit(main())
