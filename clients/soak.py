"""Soak test: drive the `session_ranker` ensemble for a bounded time and watch failures, latency and memory.

    make soak                    # python -m clients.soak --seconds 60  (report: bench_results/soak.json)
    python -m clients.soak --seconds 60 --concurrency 8 --out bench_results/soak.json
    python -m clients.soak --repo model_repository --data data/synthetic --seconds 600

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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training.names import (
    ENSEMBLE_NAME,
    INTERACTIONS_FILE,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    SESSION_COL,
)

SIZES = (1, 64)  # sessions per request


@dataclass
class SoakConfig:
    seconds: float = 60.0  # measured load
    warmup_seconds: float = 10.0  # load before the memory baseline is taken (not counted)
    concurrency: int = 8  # client threads, one request in flight each
    big_fraction: float = 0.25  # share of 64-session requests (the rest: 1 session)
    max_growth: float = 0.10  # RSS growth (end vs start) at which the soak fails
    distinct_requests: int = 64  # different requests per size, cycled
    timeout_s: float = 60.0  # client deadline per request
    seed: int = 0
    out: Path | None = Path("bench_results/soak.json")  # JSON report
    repo: Path | None = None  # serve this repository (default: export one into work/)
    data: Path = Path("data/synthetic")
    run: Path = Path("runs/synthetic")
    work: Path = Path("bench_results/soak_work")


@dataclass
class LoadResult:
    """What one phase of load produced (latencies in seconds, per request size)."""

    latencies: dict[int, list[float]] = field(default_factory=lambda: {s: [] for s in SIZES})
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + len(self.failures)


# --- requests -----------------------------------------------------------------------------
def build_requests(interactions, raw_inputs: dict[str, str], count: int) -> dict[int, list[dict[str, np.ndarray]]]:
    """`count` requests of 1 session and `count` of 64 sessions, whole real sessions, no session twice per size."""
    from clients.bench_serving import session_requests

    return {size: session_requests(interactions, raw_inputs, size, count) for size in SIZES}


def _expected_sessions(request: dict[str, np.ndarray]) -> np.ndarray:
    sid = request[SESSION_COL]
    uniq, first = np.unique(sid, return_index=True)
    return uniq[np.argsort(first)]


def run_load(
    url: str,
    requests: dict[int, list[dict[str, np.ndarray]]],
    seconds: float,
    concurrency: int,
    big_fraction: float,
    k: int,
    seed: int = 0,
    timeout_s: float = 60.0,
    model: str = ENSEMBLE_NAME,
) -> LoadResult:
    """`concurrency` threads send requests back to back for `seconds`; every answer is checked."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    prepared = {}  # (size, i) -> (inputs, expected session ids)
    for size, reqs in requests.items():
        for i, req in enumerate(reqs):
            inputs = []
            for name, values in req.items():
                inp = grpcclient.InferInput(name, [len(values)], {"i": "INT64", "f": "FP32"}[values.dtype.kind])
                inp.set_data_from_numpy(values)
                inputs.append(inp)
            prepared[(size, i)] = (inputs, _expected_sessions(req))
    outputs = [grpcclient.InferRequestedOutput(n) for n in (OUT_SESSION_ID, OUT_ITEM_IDS, OUT_SCORES)]
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(w: int) -> None:
        rng = np.random.default_rng([seed, w])
        client = grpcclient.InferenceServerClient(url)
        try:
            while time.monotonic() < deadline:
                size = SIZES[1] if rng.random() < big_fraction else SIZES[0]
                inputs, want = prepared[(size, int(rng.integers(len(requests[size]))))]
                t0 = time.perf_counter()
                try:
                    res = client.infer(model, inputs, outputs=outputs, client_timeout=timeout_s)
                    dt = time.perf_counter() - t0
                    got = res.as_numpy(OUT_SESSION_ID)
                    ids, scores = res.as_numpy(OUT_ITEM_IDS), res.as_numpy(OUT_SCORES)
                    if not np.array_equal(got, want) or ids.shape != (len(want), k) or scores.shape != ids.shape:
                        error = f"wrong answer: sessions {got[:3]}... for {want[:3]}..., item_ids {ids.shape}"
                    elif not np.isfinite(scores).all():
                        error = "wrong answer: non-finite scores"
                    else:
                        error = None
                except InferenceServerException as e:
                    dt, error = time.perf_counter() - t0, f"{e.status()}: {e.message()}"
                with lock:
                    if error is None:
                        result.latencies[size].append(dt)
                    else:
                        result.failures.append(error)
        finally:
            client.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout_s + 30)
    result.seconds = time.monotonic() - t0
    return result


class RssSampler:
    """Sample `rss()` every `interval_s` seconds on a thread: [(seconds since start, bytes)]."""

    def __init__(self, rss, interval_s: float = 1.0):
        self.rss = rss
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> int:
        value = self.rss()
        self.samples.append((round(time.monotonic() - self._t0, 2), value))
        return value

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pending_requests(metrics_url: str) -> dict[str, float]:
    """nv_inference_pending_request_count per model, from the Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{"):
            labels, value = line.rsplit(" ", 1)
            model = labels.split('model="', 1)[1].split('"', 1)[0]
            out[model] = out.get(model, 0.0) + float(value)
    return out


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def summarise(load: LoadResult, rss: list[tuple[float, int]], cfg: SoakConfig) -> dict:
    every = [v for vs in load.latencies.values() for v in vs]
    start, end = rss[0][1], rss[-1][1]
    growth = (end - start) / start
    per_size = {
        str(size): {
            "requests": len(v),
            "p50_ms": _ms(v, 50),
            "p99_ms": _ms(v, 99),
            "sessions_per_s": round(len(v) * size / load.seconds, 1),
        }
        for size, v in load.latencies.items()
    }
    return {
        "requests": load.requests,
        "failures": len(load.failures),
        "failure_examples": sorted(set(load.failures))[:10],
        "seconds": round(load.seconds, 2),
        "requests_per_s": round(load.requests / load.seconds, 1),
        "p50_ms": _ms(every, 50),
        "p99_ms": _ms(every, 99),
        "by_size": per_size,
        "rss_start_mib": round(start / 2**20, 1),
        "rss_end_mib": round(end / 2**20, 1),
        "rss_peak_mib": round(max(v for _, v in rss) / 2**20, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "rss_samples_mib": [(t, round(v / 2**20, 1)) for t, v in rss],
        "pass": len(load.failures) == 0 and growth < cfg.max_growth,
    }


# --- the whole soak -------------------------------------------------------------------------------
def soak_server(server, interactions, raw_inputs: dict[str, str], k: int, cfg: SoakConfig, log=print) -> dict:
    """Warm-up, baseline RSS, measured load, final RSS, against a running TritonServer; returns the summary."""
    requests = build_requests(interactions, raw_inputs, cfg.distinct_requests)
    log(f"warm-up: {cfg.warmup_seconds:g} s at concurrency {cfg.concurrency}")
    warm = run_load(server.grpc_url, requests, cfg.warmup_seconds, cfg.concurrency, cfg.big_fraction, k,
                    cfg.seed + 1, cfg.timeout_s)
    log(f"  {warm.requests} requests, {len(warm.failures)} failed")
    log(f"soak: {cfg.seconds:g} s at concurrency {cfg.concurrency}, {100 * cfg.big_fraction:g}% of requests 64 sessions")
    with RssSampler(server.rss_bytes) as sampler:
        load = run_load(server.grpc_url, requests, cfg.seconds, cfg.concurrency, cfg.big_fraction, k, cfg.seed,
                        cfg.timeout_s)
        sampler.sample()  # the end: right when the load stopped
    summary = summarise(load, sampler.samples, cfg)
    summary["warmup"] = {"requests": warm.requests, "failures": len(warm.failures)}
    summary["pending_after"] = pending_requests(server.metrics_url)
    if any(summary["pending_after"].values()):
        summary["pass"] = False
    return summary


def _artifacts(cfg: SoakConfig) -> tuple[Path, Path | None]:
    """(DATA, RUN or None when --repo is given)."""
    from clients.bench_serving import BenchConfig, ensure_artifacts

    if cfg.repo is not None and (Path(cfg.data) / INTERACTIONS_FILE).is_file():
        return Path(cfg.data), None
    data, run = ensure_artifacts(BenchConfig(out=cfg.work, data=cfg.data, run=cfg.run), Path(cfg.work))
    return data, run


def soak(cfg: SoakConfig) -> dict:
    import pandas as pd

    from export.repository import ExportConfig, export_repository
    from export.tritonserver import ServerConfig, TritonServer

    Path(cfg.work).mkdir(parents=True, exist_ok=True)
    data, run = _artifacts(cfg)
    repo = cfg.repo
    if repo is None:
        repo = export_repository(ExportConfig(run=run, data=data, out=Path(cfg.work) / "model_repository"))
    schema = json.loads((Path(repo) / "preprocess" / "1" / "schema.json").read_text())
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
    summary["command"] = "python -m clients.soak " + " ".join(sys.argv[1:])
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
    p = argparse.ArgumentParser(prog="python -m clients.soak", description=__doc__.split("\n\n")[0])
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
