"""python -m export.serve: flags derived from ServeConfig keep their meaning (no server; the live ones are
tests/export/test_serving.py)."""

from __future__ import annotations

from pathlib import Path


def test_serve_flags_keep_their_meaning(monkeypatch):
    from export.serve import parse_args

    monkeypatch.delenv("SESSREC_ADMIN_KEY", raising=False)
    cfg = parse_args(["--repo", "x"])
    assert (cfg.repo, cfg.host, cfg.grpc_port, cfg.http_port, cfg.metrics_port) == (Path("x"), "127.0.0.1", 8001, 8000, 8002)
    assert (cfg.ready_timeout_s, cfg.exit_timeout_s, cfg.model_control, cfg.watchdog_interval_s) == (300.0, 30, "explicit", 1.0)
    assert (cfg.log_file, cfg.log_verbose, cfg.admin_key) == (None, 0, None)
    argv = ["--repo", "x", "--host", "127.0.0.2", "--grpc-port", "0", "--http-port", "1", "--metrics-port", "2",
            "--ready-timeout", "5", "--exit-timeout", "6", "--model-control", "none", "--watchdog-interval", "3",
            "--log-file", "l.log", "--log-verbose", "1"]  # fmt: skip
    monkeypatch.setenv("SESSREC_ADMIN_KEY", "k")
    cfg = parse_args(argv)
    assert (cfg.host, cfg.grpc_port, cfg.http_port, cfg.metrics_port) == ("127.0.0.2", 0, 1, 2)
    assert (cfg.ready_timeout_s, cfg.exit_timeout_s, cfg.model_control) == (5.0, 6, "none")
    assert cfg.watchdog_interval_s == 0.0, "no watchdog without explicit model control"
    assert (cfg.log_file, cfg.log_verbose, cfg.admin_key) == (Path("l.log"), 1, "k")


def test_free_ports_are_distinct_and_equal_ports_are_refused_before_launch(tmp_path, monkeypatch):
    import subprocess

    import pytest

    import export.tritonserver as ts

    for _ in range(50):  # one socket at a time could be handed the same port twice; these never
        ports = ts.free_ports(3)
        assert len(set(ports)) == 3, ports
    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: launched.append(a))
    monkeypatch.setattr(ts, "prepare_backend_dir", lambda p: p)
    cfg = ts.ServerConfig(repo=tmp_path, grpc_port=18123, http_port=18123, metrics_port=0)
    with pytest.raises(ts.ServerError, match=r"'grpc_port': 18123, 'http_port': 18123.*three different ports"):
        ts.TritonServer(cfg).start()
    assert not launched  # refused before a tritonserver was started
    # a free port is never one that was given for another of the three
    monkeypatch.setattr(ts, "free_ports", lambda n, host: [18123, 18124, 18125, 18126, 18127, 18128])
    server = ts.TritonServer(ts.ServerConfig(repo=tmp_path, grpc_port=18123, http_port=0, metrics_port=0))
    monkeypatch.setattr(ts.TritonServer, "wait_ready", lambda self, timeout_s: None)
    server.start()
    server._log.close()
    assert (server.grpc_port, server.http_port, server.metrics_port) == (18123, 18124, 18125) and launched
