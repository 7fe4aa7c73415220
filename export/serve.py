"""Serve a model repository on the tritonserver binary of the nvidia-pytriton wheel.

    python -m export.serve --repo model_repository
    python -m export.serve --repo model_repository --grpc-port 8001 --http-port 8000 --metrics-port 8002

Binds 127.0.0.1 unless `--host` says otherwise, waits until every model (the
`session_ranker` ensemble and its steps) is ready, prints the endpoints and
runs until Ctrl-C or SIGTERM, then stops the server (in-flight requests
finish first). Port 0 picks a free port. For a GPU server with the libtorch
backend use the NGC container instead (see export/README.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from export.tritonserver import ServerConfig, ServerError, TritonServer
from training.names import ENSEMBLE_NAME


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="python -m export.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="model repository written by `python -m export`")
    p.add_argument("--host", default="127.0.0.1", help="address all endpoints bind (default: loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 = a free port)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0 = a free port)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0 = a free port)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every model to load")
    p.add_argument("--log-file", type=Path, default=None, help="write the server log here (default: a temp file)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    a = p.parse_args(argv)
    return ServerConfig(
        repo=a.repo,
        host=a.host,
        grpc_port=a.grpc_port,
        http_port=a.http_port,
        metrics_port=a.metrics_port,
        ready_timeout_s=a.ready_timeout,
        log_file=a.log_file,
        log_verbose=a.log_verbose,
    )


def serve(cfg: ServerConfig) -> int:
    """Start, print the endpoints, block until SIGINT/SIGTERM or the server dies; return its exit code."""
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
    if ENSEMBLE_NAME in models:
        print(f"  try      python -m clients.rank --url {server.grpc_url} --input data/synthetic/interactions.parquet",
              flush=True)
    died = False
    while not stop.wait(0.5):
        if server.proc is None or server.proc.poll() is not None:
            print(f"error: tritonserver exited on its own:\n{server.log_tail()}", file=sys.stderr)
            died = True
            break
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
    return 1 if died else 0


def main(argv: list[str] | None = None) -> int:
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
