"""Bounded load against a running `session_ranker` ensemble, every answer checked.

    from clients.load import LoadConfig, build_requests, soak_server
    requests = build_requests(interactions, schema["raw_inputs"], count=16)   # {1: [...], 64: [...]}
    summary = soak_server(server, interactions, schema["raw_inputs"], k=20, cfg=LoadConfig(seconds=10))

- `session_requests` / `build_requests`: requests of 1 or 64 whole real
  sessions (DATA's interactions.parquet), no session twice per size.
- `run_load`: `concurrency` client threads send requests back to back for a
  bounded time; an answer must carry the request's session ids, in order, k
  items per session and finite scores, or it counts as a failure.
- `soak_server`: warm-up, then the measured load while the server's resident
  set (tritonserver + Python-backend stubs) is sampled every second, then the
  requests left pending; returns the summary `python -m bench.soak` reports.

Client code: it drives a server it is given (a `export.tritonserver.TritonServer`
for the memory and metrics) and starts none. Used by bench.serving, bench.soak
and tests/system/test_reliability.py.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from clients.ranking import plan_requests
from training.names import ENSEMBLE_NAME, OUT_ITEM_IDS, OUT_SCORES, OUT_SESSION_ID, SESSION_COL

SIZES = (1, 64)  # sessions per request


@dataclass
class LoadConfig:
    seconds: float = 60.0  # measured load
    warmup_seconds: float = 10.0  # load before the memory baseline is taken (not counted)
    concurrency: int = 8  # client threads, one request in flight each
    big_fraction: float = 0.25  # share of 64-session requests (the rest: 1 session)
    max_growth: float = 0.10  # RSS growth (end vs start) at which the soak fails
    distinct_requests: int = 64  # different requests per size, cycled
    timeout_s: float = 60.0  # client deadline per request
    seed: int = 0


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
def session_requests(
    interactions, raw_inputs: dict[str, str], size: int, count: int
) -> list[dict[str, np.ndarray]]:
    """`count` requests of `size` whole sessions each (sessions in file order, no session twice)."""
    sessions, plan = plan_requests(interactions[SESSION_COL].to_numpy(), size)
    need = size * count
    if len(sessions) < need:
        raise ValueError(f"{len(sessions)} sessions in the data, the benchmark needs {need}")
    return [
        {c: interactions[c].to_numpy()[rows].astype(dt) for c, dt in raw_inputs.items()}
        for rows in plan[:count]
    ]


def build_requests(
    interactions, raw_inputs: dict[str, str], count: int
) -> dict[int, list[dict[str, np.ndarray]]]:
    """`count` requests of 1 session and `count` of 64 sessions, whole real sessions, no session twice per size."""
    return {size: session_requests(interactions, raw_inputs, size, count) for size in SIZES}


# --- load -----------------------------------------------------------------------------------
def run_load(
    url: str,
    requests: dict[int, list[dict[str, np.ndarray]]],
    seconds: float,
    concurrency: int,
    big_fraction: float,
    k: int,
    *,
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
                inp = grpcclient.InferInput(
                    name, [len(values)], {"i": "INT64", "f": "FP32"}[values.dtype.kind]
                )
                inp.set_data_from_numpy(values)
                inputs.append(inp)
            sessions = plan_requests(req[SESSION_COL], 1)[0]  # in order of first appearance
            prepared[(size, i)] = (inputs, sessions)
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
                    if (
                        not np.array_equal(got, want)
                        or ids.shape != (len(want), k)
                        or scores.shape != ids.shape
                    ):
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


# --- measurement around the load -------------------------------------------------------------
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


def summarise(load: LoadResult, rss: list[tuple[float, int]], cfg: LoadConfig) -> dict:
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
def soak_server(server, interactions, raw_inputs: dict[str, str], k: int, cfg: LoadConfig, log=print) -> dict:
    """Warm-up, baseline RSS, measured load, final RSS, against a running TritonServer; returns the summary."""
    requests = build_requests(interactions, raw_inputs, cfg.distinct_requests)
    log(f"warm-up: {cfg.warmup_seconds:g} s at concurrency {cfg.concurrency}")
    warm = run_load(
        server.grpc_url,
        requests,
        cfg.warmup_seconds,
        cfg.concurrency,
        cfg.big_fraction,
        k,
        seed=cfg.seed + 1,
        timeout_s=cfg.timeout_s,
    )
    log(f"  {warm.requests} requests, {len(warm.failures)} failed")
    log(
        f"soak: {cfg.seconds:g} s at concurrency {cfg.concurrency}, {100 * cfg.big_fraction:g}% of requests 64 sessions"
    )
    with RssSampler(server.rss_bytes) as sampler:
        load = run_load(
            server.grpc_url,
            requests,
            cfg.seconds,
            cfg.concurrency,
            cfg.big_fraction,
            k,
            seed=cfg.seed,
            timeout_s=cfg.timeout_s,
        )
        sampler.sample()  # the end: right when the load stopped
    summary = summarise(load, sampler.samples, cfg)
    summary["warmup"] = {"requests": warm.requests, "failures": len(warm.failures)}
    summary["pending_after"] = pending_requests(server.metrics_url)
    if any(summary["pending_after"].values()):
        summary["pass"] = False
    return summary
