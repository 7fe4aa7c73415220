"""Load, faults and model updates against live tritonservers (127.0.0.1, free ports, bounded time).

Two servers for the module, both on the default export options:
- A: `TritonServer` in explicit model-control mode: the CI-sized soak (10 s at
  concurrency 8, 1- and 64-session requests), a new model version loaded while
  clients keep sending, and Python-backend stubs killed during load (Triton
  2.51 does not recover; `StubWatchdog` does). A killed model-step stub leaves
  an instance tritonserver 2.51 does not finish unloading, so A's exit code is
  not checked.
- B: `python -m export.serve` (what operators run): a flood against the queue
  policy, then SIGTERM during load. B is started in the background when the
  module starts, so its start overlaps A's tests.
- A small `python -m export.serve` on the benchmark's floor ensemble: serve's own
  watchdog thread restarts a killed stub.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.load import LoadConfig, build_requests, soak_server
from export.floor import FLOOR_ENSEMBLE, FLOOR_STEPS, write_floor_repository
from export.repository import ExportConfig, add_ensemble_version, export_repository
from export.tritonserver import ServerConfig, ServerError, StubWatchdog, TritonServer
from tests.gate_util import GATED, add_gated_ensemble, open_gate, wait_arrived
from tests.triton_util import PROJECT_ROOT
from training.names import (
    ENSEMBLE_NAME,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    TORCH_MODEL,
)

pytestmark = pytest.mark.triton

K = 20  # the export default
ADMIN_KEY = "test-admin-key"
EXIT_TIMEOUT_S = 10  # B (python -m export.serve); A uses A_EXIT_TIMEOUT_S
A_EXIT_TIMEOUT_S = 5  # A ends with an instance tritonserver cannot unload: it waits this long for it


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repos(artifacts, tmp_path_factory):
    """(repository for A, a copy for B with a gated copy of the ensemble: tests/gate_util.py), default
    export options."""
    data, run = artifacts
    root = tmp_path_factory.mktemp("reliability")
    a = export_repository(ExportConfig(run=run, data=data, out=root / "repo_a"))
    b = root / "repo_b"
    shutil.copytree(a, b)
    add_gated_ensemble(b, root / "gate")
    return a, b


class ServeProcess:
    """`python -m export.serve` in the background; `wait_ready()` parses the endpoints it prints."""

    def __init__(self, repo: Path, log: Path):
        self.log = log
        env = dict(os.environ, SESSREC_ADMIN_KEY=ADMIN_KEY)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "export.serve", "--repo", str(repo), "--grpc-port", "0", "--http-port", "0",
             "--metrics-port", "0", "--exit-timeout", str(EXIT_TIMEOUT_S)],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=PROJECT_ROOT, env=env,
        )  # fmt: skip
        self.grpc_url = None
        self.metrics_url = None

    def wait_ready(self, timeout_s: float = 300) -> str:
        """The gRPC endpoint, once serve printed its endpoints (grpc, http, then metrics)."""
        deadline = time.monotonic() + timeout_s
        lines = []
        while self.metrics_url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("grpc"):
                self.grpc_url = line.split()[-1]
            elif line.strip().startswith("metrics"):
                self.metrics_url = line.split()[-1]
        assert self.grpc_url and self.metrics_url, "".join(lines) + self.log.read_text()[-3000:]
        return self.grpc_url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=2 * EXIT_TIMEOUT_S + 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server_b(repos, tmp_path_factory):
    serve = ServeProcess(repos[1], tmp_path_factory.mktemp("serve_b") / "serve.log")
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def server_a(repos, server_b):  # server_b first: its start overlaps A's tests
    last = None
    for _ in range(3):
        server = TritonServer(ServerConfig(repo=repos[0], grpc_port=0, http_port=0, metrics_port=0,
                                           model_control="explicit", exit_timeout_s=A_EXIT_TIMEOUT_S))
        try:
            server.start()
            break
        except ServerError as e:
            last = e
            if "address already in use" not in str(e).lower():
                raise
    else:
        raise last
    yield server
    t0 = time.monotonic()
    server.stop()  # exit code not checked: see the module docstring
    assert time.monotonic() - t0 < 2 * A_EXIT_TIMEOUT_S + 30


@pytest.fixture(scope="module")
def requests_(interactions, schema):
    return build_requests(interactions, schema["raw_inputs"], 8)


def _inputs(cols: dict[str, np.ndarray]) -> list:
    out = []
    for name, values in cols.items():
        inp = grpcclient.InferInput(name, [len(values)], {"i": "INT64", "f": "FP32"}[values.dtype.kind])
        inp.set_data_from_numpy(values)
        out.append(inp)
    return out


def _infer(client, cols, model: str = ENSEMBLE_NAME) -> dict[str, np.ndarray] | InferenceServerException:
    try:
        res = client.infer(model, _inputs(cols), client_timeout=60)
    except InferenceServerException as e:
        return e
    return {n: res.as_numpy(n) for n in (OUT_SESSION_ID, OUT_ITEM_IDS, OUT_SCORES)}


class Clients:
    """`n` threads sending the given requests round-robin until stopped; every outcome is logged
    as (start, end, request index, answer dict or InferenceServerException)."""

    def __init__(self, url: str, requests: list[dict], n: int, pause_after_error_s: float = 0.05):
        self.url, self.requests, self.pause = url, requests, pause_after_error_s
        self.log: list[tuple[float, float, int, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(n)]

    def _run(self, w: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        i = w
        try:
            while not self._stop.is_set():
                k = i % len(self.requests)
                i += 1
                t0 = time.monotonic()
                out = _infer(client, self.requests[k])
                with self._lock:
                    self.log.append((t0, time.monotonic(), k, out))
                if isinstance(out, Exception):
                    time.sleep(self.pause)
        finally:
            client.close()

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a client request hung"

    def failures(self) -> list:
        return [entry for entry in self.log if isinstance(entry[3], Exception)]


def _same(a: dict, b: dict) -> bool:
    """The same ranking. Scores are compared to 1e-4: a session's scores move in the last bits with the
    other sessions the model step batched it with (checked: 0.8300499 alone, 0.83004975 in a batch);
    scores are sorted, so near-ties that swap two items do not matter here."""
    return np.array_equal(a[OUT_SESSION_ID], b[OUT_SESSION_ID]) and np.allclose(
        a[OUT_SCORES], b[OUT_SCORES], atol=1e-4, rtol=0
    )


# --- A: soak ---------------------------------------------------------------------------------------
def test_soak_ci_sized(server_a, interactions, schema):
    """`make soak` in 10 s: no failure, RSS (tritonserver + stubs) grows < 10% after warm-up, no request left pending."""
    cfg = LoadConfig(seconds=10, warmup_seconds=2, concurrency=8, distinct_requests=16)
    summary = soak_server(server_a, interactions, schema["raw_inputs"], K, cfg, log=lambda m: None)
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples_mib"}))
    assert summary["failures"] == 0, summary["failure_examples"]
    assert summary["by_size"]["1"]["requests"] > 0 and summary["by_size"]["64"]["requests"] > 0
    assert summary["rss_growth_pct"] < 10, summary["rss_samples_mib"]
    assert not any(summary["pending_after"].values()), summary["pending_after"]
    assert summary["pass"]


# --- A: a new model version under load --------------------------------------------------------------
def _perturbed_run(run: Path, out: Path) -> Path:
    """A copy of RUN with other weights (a stand-in for a retrained model), written with the checkpoint API."""
    from training.checkpoint import read_meta, save_checkpoint

    shutil.copytree(run, out)
    meta = read_meta(out)
    meta.pop("files", None)
    state = torch.load(out / "model.pt", weights_only=True)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint(out, state, torch.load(out / "optim.pt", weights_only=True), meta)
    return out


def test_new_model_version_under_load(server_a, repos, artifacts, requests_, tmp_path):
    """Explicit model control: whole-ensemble version 2 (issue 12) is switched in by
    export.versions.swap_to while 4 clients keep sending. Zero failed requests; every answer is
    version 1's or version 2's (scores to 1e-4); after the swap, only version 2's, and those differ
    from version 1's. Version 1 of every step stays loaded (rollback)."""
    from export.versions import swap_to

    data, run = artifacts
    reqs = requests_[1][:6] + requests_[64][:2]
    client = grpcclient.InferenceServerClient(server_a.grpc_url)
    v1 = [_infer(client, r) for r in reqs]
    assert not any(isinstance(a, Exception) for a in v1), [str(a) for a in v1 if isinstance(a, Exception)]
    version = add_ensemble_version(ExportConfig(run=_perturbed_run(run, tmp_path / "run2"), data=data, out=repos[0]))
    assert version == 2
    with Clients(server_a.grpc_url, reqs, 4) as clients:
        time.sleep(1.0)
        t0 = time.monotonic()
        swap_to(server_a.http_url, repos[0], version, server_a.admin_headers)  # steps' 2 READY, then the ensemble
        loaded = time.monotonic()
        time.sleep(1.5)
    v2 = [_infer(client, r) for r in reqs]
    client.close()
    assert clients.failures() == [], Counter(str(f[3]) for f in clients.failures())
    assert all(not np.array_equal(a[OUT_SCORES], b[OUT_SCORES]) for a, b in zip(v1, v2)), "scores did not change"
    which = Counter()
    for start, _end, k, out in clients.log:
        is_v1, is_v2 = _same(out, v1[k]), _same(out, v2[k])
        assert is_v1 or is_v2, f"request {k}: an answer from neither version"
        if start > loaded + 0.2:
            assert is_v2, f"request {k} sent after the load returned got version 1's answer"
        which["v1" if is_v1 else "v2"] += 1
    assert which["v1"] > 0 and which["v2"] > 0, which
    assert server_a.model_states()[TORCH_MODEL] == "READY"
    meta = grpcclient.InferenceServerClient(server_a.grpc_url).get_model_metadata(TORCH_MODEL, as_json=True)
    assert sorted(meta["versions"]) == ["1", "2"], meta
    meta = grpcclient.InferenceServerClient(server_a.grpc_url).get_model_metadata(ENSEMBLE_NAME, as_json=True)
    assert meta["versions"] == ["2"], meta
    print(f"version swap: load took {loaded - t0:.1f} s, answers {dict(which)}, 0 failures of {len(clients.log)}")


# --- A: a Python-backend stub killed during load --------------------------------------------------------
def _stub_pid(server: TritonServer, model: str) -> int:
    """The live stub of `model`'s highest version (the served one: after a swap two versions are loaded)."""
    live = [p for p in server.stub_processes() if p.model == model and p.state != "Z"]
    top = max((p.version or 0) for p in live)
    live = [p.pid for p in live if (p.version or 0) == top]
    assert len(live) == 1, server.stub_processes()
    return live[0]


def test_killed_stub_is_restarted_by_the_watchdog(server_a, requests_):
    """Triton 2.51: after `kill -9` of a step's stub, every request through that step fails with INTERNAL
    "Stub process '<step>_0_0' is not healthy." while /v2/health/ready still answers 200, and it never
    recovers on its own. StubWatchdog (python -m export.serve runs one) restarts the step; requests fail
    meanwhile (counted) and succeed afterwards, with the same answers as before the kill."""
    reqs = requests_[1][:4] + requests_[64][:1]
    client = grpcclient.InferenceServerClient(server_a.grpc_url)
    before = [_infer(client, r) for r in reqs]
    assert not any(isinstance(a, Exception) for a in before)

    watchdog = StubWatchdog(server_a, interval_s=0.5, log=lambda m: None)
    watchdog.check()  # remember the live stubs (no thread yet)
    os.kill(_stub_pid(server_a, "postprocess"), signal.SIGKILL)
    time.sleep(0.5)
    for r in reqs[:2]:  # Triton alone: fails, and keeps saying it is ready
        out = _infer(client, r)
        assert isinstance(out, InferenceServerException) and out.status() == "StatusCode.INTERNAL", out
        assert "Stub process 'postprocess_0_0' is not healthy" in out.message(), out.message()
    assert client.is_server_ready() and client.is_model_ready("postprocess")

    watchdog.start()  # restarts postprocess at once (its zombie was seen alive by check())
    with Clients(server_a.grpc_url, reqs, 2) as clients:
        deadline = time.monotonic() + 120
        while not watchdog.events and time.monotonic() < deadline:
            time.sleep(0.2)
        assert watchdog.events and "restarted" in watchdog.events[0][2], watchdog.events
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(_stub_pid(server_a, TORCH_MODEL), signal.SIGKILL)  # now during load
        while len(watchdog.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(watchdog.events) == 2 and "restarted" in watchdog.events[1][2], watchdog.events
        recovered = time.monotonic()
        time.sleep(2.0)
    watchdog.stop()
    failed = [f for f in clients.failures() if f[0] >= t_kill]
    kinds = Counter(f"{f[3].status()}: {f[3].message()[:70]}" for f in failed)
    assert failed, "killing the model step's stub failed no request?"
    for f in failed:
        assert f[3].status() in ("StatusCode.INTERNAL", "StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE"), kinds
    late = [e for e in clients.log if e[0] > recovered + 0.2]
    assert late and not any(isinstance(e[3], Exception) for e in late), kinds
    for _start, _end, k, out in late:
        assert _same(out, before[k])
    after = [_infer(client, r) for r in reqs]
    assert all(_same(a, b) for a, b in zip(after, before))
    client.close()
    print(f"stub kill: {len(failed)} failed requests ({dict(kinds)}), model step back after "
          f"{watchdog.events[1][2]}; postprocess {watchdog.events[0][2]}")


# --- B (python -m export.serve): queue policy ----------------------------------------------------------
def test_flood_is_answered_unavailable_never_hangs(server_b, requests_):
    """The default queue policy (64 queued requests per step, 5 s queue timeout): 160 requests of 64 sessions
    at once. Every request gets an answer: success, or UNAVAILABLE at once (queue full) or after at most the
    queue timeout; none hangs; the server answers normally afterwards."""
    url = server_b.wait_ready()
    client = grpcclient.InferenceServerClient(url)
    good = requests_[64][0]
    before = _infer(client, good)
    n = 160
    done: list[tuple[float, object]] = []
    lock = threading.Lock()
    all_done = threading.Event()
    t0 = time.monotonic()

    def callback(result, error):
        with lock:
            done.append((time.monotonic() - t0, error if error is not None else result))
            if len(done) == n:
                all_done.set()

    for i in range(n):
        client.async_infer(ENSEMBLE_NAME, _inputs(requests_[64][i % len(requests_[64])]), callback,
                           client_timeout=120)
    assert all_done.wait(180), f"only {len(done)} of {n} answered"
    ok = [t for t, r in done if not isinstance(r, Exception)]
    rejected = [(t, r) for t, r in done if isinstance(r, Exception)]
    kinds = Counter(r.message().split("] ")[-1] for _, r in rejected)
    for _t, r in rejected:
        assert r.status() == "StatusCode.UNAVAILABLE", r
        assert "Exceeds maximum queue size" in r.message() or "Request timeout expired" in r.message(), r
    assert rejected, "no request was rejected: the flood did not reach the queue limit"
    assert ok, "no request succeeded"
    full = [t for t, r in rejected if "Exceeds maximum queue size" in r.message()]
    assert full and min(full) < 5.0, "queue-full rejections were not immediate"
    assert max(t for t, _ in done) < 120
    after = _infer(client, good)
    assert _same(after, before)
    client.close()
    print(f"flood: {n} requests, {len(ok)} ok, {len(rejected)} UNAVAILABLE {dict(kinds)}, "
          f"last answer after {max(t for t, _ in done):.1f} s, rejections within {max(t for t, _ in rejected):.1f} s")


# --- B: graceful shutdown --------------------------------------------------------------------------------
def test_sigterm_during_load(server_b, repos, requests_):
    """SIGTERM to `python -m export.serve` while 8 clients send 64-session requests: requests in flight
    complete, later ones are refused (NOT_FOUND while the ensemble drains, UNAVAILABLE once tritonserver
    stops, CANCELLED for a call that reached its gRPC server while it closed), none hangs, and the process
    exits 0 within 2 x --exit-timeout.

    In flight by construction (was: a request that happened to last > 0.1 s across the SIGTERM, which a
    fast machine did not give): two 64-session requests go to `gated_ranker` (tests/gate_util.py: a gate
    step in front of the served preprocess -> model -> postprocess), which holds them until the test
    opens it. SIGTERM is sent once a request is held there, the gate opens 1 s later, while the ensembles
    drain: both requests must still run all three real steps and be answered."""
    url = server_b.wait_ready()
    gate_dir = repos[1].parent / "gate"
    reqs = requests_[64][:4]
    gated: list = []

    def send_gated(k: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        t0 = time.monotonic()
        out = _infer(client, reqs[k], model=GATED)
        gated.append((t0, time.monotonic(), k, out))
        client.close()

    with Clients(url, reqs, 8, pause_after_error_s=0.02) as clients:
        time.sleep(1.0)  # answered normally meanwhile
        held = [threading.Thread(target=send_gated, args=(k,)) for k in range(2)]
        for t in held:
            t.start()
        assert wait_arrived(gate_dir), "no request reached the gate"
        t_term = time.monotonic()
        server_b.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the drain has begun: new requests are refused, the held ones are waited for
        open_gate(gate_dir)
        code = server_b.proc.wait(timeout=2 * EXIT_TIMEOUT_S + 30)
        exited = time.monotonic()
        for t in held:
            t.join(timeout=60)
        time.sleep(0.5)
    assert code == 0, server_b.log.read_text()[-3000:]
    assert exited - t_term < 2 * EXIT_TIMEOUT_S + 10
    # in flight: the held requests (sent before SIGTERM, answered after it through all three steps), and
    # any request of the clients that was under way across the SIGTERM
    in_flight = gated + [e for e in clients.log if e[0] < t_term and e[1] > t_term]
    assert len(gated) == 2 and all(e[0] < t_term < e[1] for e in gated), gated
    for _s, _e, k, out in in_flight:
        assert not isinstance(out, Exception), out
        sids, first = np.unique(reqs[k]["session_id"], return_index=True)
        assert out[OUT_SESSION_ID].tolist() == sids[np.argsort(first)].tolist()
    # sent after SIGTERM: answered (until the drain starts, a few ms later) or refused cleanly; after 1 s, refused
    after = [e for e in clients.log if e[0] > t_term]
    refused = [e[3] for e in after if isinstance(e[3], Exception)]
    assert refused and all(isinstance(e[3], Exception) for e in after if e[0] > t_term + 1.0)
    kinds = Counter(f"{r.status()}: {r.message()[:60]}" for r in refused)
    for r in refused:
        assert (r.status() == "StatusCode.NOT_FOUND" and "has no available versions" in r.message()) or (
            r.status() in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
        ), f"{r.status()}: {r.message()}"
    print(f"SIGTERM: {len(in_flight)} in-flight requests completed ({len(gated)} held in the gate), "
          f"{len(refused)} refused {dict(kinds)}, exit 0 after {exited - t_term:.1f} s")


# --- python -m export.serve's own watchdog (small repository: the benchmark's floor ensemble) ---------------
def test_serve_restarts_a_killed_stub(schema, tmp_path):
    """The watchdog thread that `python -m export.serve` runs: a step's stub killed with SIGKILL is restarted
    and requests through the ensemble succeed again. (On shutdown tritonserver 2.51 may not finish unloading
    a dead instance: seen with the model step, not with this floor step; serve then says why it exits 1.)"""
    from export.tritonserver import process_tree

    repo = write_floor_repository(tmp_path / "floor", schema["raw_inputs"])
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "export.serve", "--repo", str(repo), "--grpc-port", "0", "--http-port", "0",
         "--metrics-port", "0", "--exit-timeout", "3", "--watchdog-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=PROJECT_ROOT,
    )  # fmt: skip
    serve = ServeProcess.__new__(ServeProcess)
    serve.proc, serve.log, serve.grpc_url, serve.metrics_url = proc, log, None, None
    try:
        url = serve.wait_ready()
        cols = {n: np.arange(3).astype(dt) for n, dt in schema["raw_inputs"].items()}
        client = grpcclient.InferenceServerClient(url)
        assert client.infer(FLOOR_ENSEMBLE, _inputs(cols)).as_numpy("item_id_b").tolist() == [0, 1, 2]
        stub = next(p for p in process_tree(proc.pid) if p.model == FLOOR_STEPS[1] and p.state != "Z")
        os.kill(stub.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while "is back after" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"the stub of model '{FLOOR_STEPS[1]}'" in log.read_text(), log.read_text()[-2000:]
        out = None
        while time.monotonic() < deadline:  # the ensemble comes back with the step
            try:
                out = client.infer(FLOOR_ENSEMBLE, _inputs(cols))
                break
            except InferenceServerException:
                time.sleep(0.2)
        assert out is not None and out.as_numpy("item_id_b").tolist() == [0, 1, 2]
        client.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # 0 here; with the model step's dead instance tritonserver 2.51 never finished the unload (exit 1)
        assert code == 0 or (code == 1 and "may never finish unloading" in log.read_text()), log.read_text()[-2000:]
    finally:
        serve.stop()
