"""Start and stop a real tritonserver for tests: 127.0.0.1, free ports, its own temp log.

    from tests.triton_util import running_server
    with running_server(repo) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

Free ports are picked by binding port 0 and closing it, so another process can
take one before the server binds it; a start that fails with "address in use"
is retried on new ports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from export.tritonserver import ServerConfig, ServerError, TritonServer


def start_server(repo: Path, attempts: int = 3, ready_timeout_s: float = 300.0) -> TritonServer:
    last: ServerError | None = None
    for _ in range(attempts):
        server = TritonServer(
            ServerConfig(repo=Path(repo), grpc_port=0, http_port=0, metrics_port=0, ready_timeout_s=ready_timeout_s)
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
