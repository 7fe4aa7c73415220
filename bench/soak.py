"""Soak test: drive the `session_ranker` ensemble for a bounded time and watch failures, latency and memory.

    make soak                    # python -m bench.soak --seconds 60  (report: bench_results/soak.json)
    python -m bench.soak --seconds 60 --concurrency 8 --out bench_results/soak.json
    python -m bench.soak --repo model_repository --data data/synthetic --seconds 600

Starts tritonserver (explicit model control, 127.0.0.1, free ports) on `--repo`,
or on a repository exported with the default options from `--data`/`--run`
(when those are missing: synthetic DATA and a 1-epoch RUN under `--work`, as
`make bench-serving` does). `--concurrency` client threads then send, without
pause, requests of 1 session or of 64 sessions (`--big-fraction` of them) built
from real sessions of DATA's interactions.parquet, first for `--warmup-seconds`
(not counted), then for `--seconds`. Every answer is checked: it must carry
the request's session ids, in order, and k items per session.

Memory: the resident set (VmRSS) of tritonserver plus its Python-backend stub
processes, summed over the process tree, sampled every second; `start` is the
sample after warm-up, `end` the one when the load stops.

Prints a summary and writes JSON (`--out`): requests, failures (with the first
messages), requests/s, p50/p99 latency per request size, RSS start/end/peak and
growth. Exit status 1 when a request failed or RSS grew by `--max-growth`
(default 10%) or more.

The requests, the load and the measurement are clients.load (tests/system/test_reliability.py
runs the same soak against its own server); this module finds or makes the
artifacts, starts the server and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import ensure_artifacts
from clients.load import LoadConfig, soak_server
from training.names import INTERACTIONS_FILE


@dataclass
class SoakConfig(LoadConfig):
    """The load (LoadConfig's fields) and where its server and report come from."""

    out: Path | None = Path("bench_results/soak.json")  # JSON report
    repo: Path | None = None  # serve this repository (default: export one into work/)
    data: Path = Path("data/synthetic")
    run: Path = Path("runs/synthetic")
    work: Path = Path("bench_results/soak_work")


def _artifacts(cfg: SoakConfig) -> tuple[Path, Path | None]:
    """(DATA, RUN or None when --repo is given)."""
    if cfg.repo is not None and (Path(cfg.data) / INTERACTIONS_FILE).is_file():
        return Path(cfg.data), None
    return ensure_artifacts(cfg.data, cfg.run, cfg.work)


def soak(cfg: SoakConfig) -> dict:
    import pandas as pd

    from export.repository import ExportConfig, export_repository
    from export.tritonserver import ServerConfig, TritonServer

    Path(cfg.work).mkdir(parents=True, exist_ok=True)
    data, run = _artifacts(cfg)
    repo = cfg.repo
    if repo is None:
        repo = export_repository(ExportConfig(run=run, data=data, out=Path(cfg.work) / "model_repository"))
    schema = json.loads((Path(data) / "schema.json").read_text())
    manifest = json.loads((Path(repo) / "sessrec_export.json").read_text())
    k = int(manifest["options"]["top_k"])
    interactions = pd.read_parquet(Path(data) / INTERACTIONS_FILE)
    load_before = os.getloadavg()
    server = TritonServer(ServerConfig(repo=Path(repo), grpc_port=0, http_port=0, metrics_port=0,
                                       model_control="explicit"))
    t0 = time.monotonic()
    with server:
        print(f"tritonserver ready at {server.grpc_url} after {time.monotonic() - t0:.1f} s "
              f"(RSS {server.rss_bytes() / 2**20:.0f} MiB)", flush=True)
        summary = soak_server(server, interactions, schema["raw_inputs"], k, cfg,
                              log=lambda m: print(m, flush=True))
    summary["command"] = "python -m bench.soak " + " ".join(sys.argv[1:])
    summary["config"] = {k: str(v) for k, v in asdict(cfg).items()}
    summary["repo"] = str(repo)
    summary["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return summary


def report(summary: dict) -> str:
    lines = [
        f"requests {summary['requests']} in {summary['seconds']} s ({summary['requests_per_s']}/s), "
        f"failures {summary['failures']}",
        f"latency p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms",
    ]
    for size, s in summary["by_size"].items():
        lines.append(f"  {size:>2} session(s)/request: {s['requests']} requests, p50 {s['p50_ms']} ms, "
                     f"p99 {s['p99_ms']} ms, {s['sessions_per_s']} sessions/s")
    lines.append(f"server RSS (tritonserver + stubs): start {summary['rss_start_mib']} MiB, end "
                 f"{summary['rss_end_mib']} MiB, peak {summary['rss_peak_mib']} MiB, growth "
                 f"{summary['rss_growth_pct']}%")
    for msg in summary["failure_examples"]:
        lines.append(f"  failure: {msg}")
    lines.append("PASS" if summary["pass"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured load duration")
    p.add_argument("--warmup-seconds", type=float, default=d.warmup_seconds, help="load before the RSS baseline")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    p.add_argument("--big-fraction", type=float, default=d.big_fraction, help="share of 64-session requests")
    p.add_argument("--max-growth", type=float, default=d.max_growth, help="RSS growth (fraction) that fails")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="client deadline per request (s)")
    p.add_argument("--seed", type=int, default=d.seed, help="request mix seed")
    p.add_argument("--out", type=Path, default=d.out, help="write the JSON report here")
    p.add_argument("--repo", type=Path, default=None, help="serve this repository (default: export one)")
    p.add_argument("--data", type=Path, default=d.data, help="DATA with interactions.parquet (requests)")
    p.add_argument("--run", type=Path, default=d.run, help="RUN to export when --repo is not given")
    p.add_argument("--work", type=Path, default=d.work, help="folder for made artifacts")
    a = p.parse_args(argv)
    if a.seconds <= 0 or a.concurrency < 1 or not 0 <= a.big_fraction <= 1:
        p.error("--seconds must be > 0, --concurrency >= 1, --big-fraction in [0, 1]")
    cfg = SoakConfig(seconds=a.seconds, warmup_seconds=a.warmup_seconds, concurrency=a.concurrency,
                     big_fraction=a.big_fraction, max_growth=a.max_growth, timeout_s=a.timeout, seed=a.seed,
                     out=a.out, repo=a.repo, data=a.data, run=a.run, work=a.work)
    summary = soak(cfg)
    print(report(summary))
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
