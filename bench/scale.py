"""Cost against catalogue size: prepare, train, serve and export the same log shape at 20k-1M items.

    python -m bench.scale --out bench_results/scale.json      # make bench-scale
    python -m bench.scale --out s.json --items 20000 1000000 --clicks 1000000 --max-steps 50

For every size in --items, one click log from `python -m bench.scale_log` with
the same --clicks (so every size has about the same number of sessions; only
the catalogue grows), then, each in a fresh process whose peak RSS is read
from `os.wait4`:

* prepare: `python -m training.prepare --input LOG --time-col timestamp
  --time-unit s --out DATA --quiet` (+ `--workers N` with --prepare-workers):
  wall time and peak RSS (with workers: the largest single process);
* train: the real recipe (`python -m training.train`, the recipe the data
  selects; loss and rank "auto": training/model/choice.py) on ONE late window
  (--start-window W --end-window W+1, W = the second-to-last window), 1 epoch
  capped at --max-steps optimizer steps, so every size does the same work;
  without early stopping / hold-out (their held-back scoring would count as
  training time) and without the baselines; then the evaluation of W+1 (full
  ranking, chunked). Sessions/s of the training steps (metrics.json) and the
  process's peak RSS;
* serve (IN-PROCESS, not through Triton): export.inference.TopKRanker around
  the trained model, traced as the export traces it, median latency of a
  1-session call and sessions/s of 64-session calls on --threads threads;
* export: `python -m export --run RUN --data DATA --out REPO`, size on disk;
* with --triton, served: the repository in a tritonserver, gRPC requests of
  whole real sessions from one client thread: p50 of 1-session requests,
  sessions/s of back-to-back 64-session requests (`serve_triton`; the
  per-step breakdown and concurrency sweep belong to bench.serving).

Prints one table with the ratios to the first size and writes the JSON.
Everything is timed in the same run, so the ratios compare like with like on a
shared machine; the absolute figures move with the machine's load.
"""

from __future__ import annotations

import training.runtime  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

# isort: split
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT
from training.integrity import atomic_write

DEFAULT_ITEMS = (20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000)
TOP_K = 20
MIB = 1024 * 1024


class BenchError(RuntimeError):
    pass


def run_measured(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd` (cwd: the project) with output to `log`: wall seconds and peak RSS (MiB) of the
    largest process of its tree (`os.wait4`: the child's rusage, its waited-for descendants included)."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"{' '.join(cmd)} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss: KiB on Linux


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def serve_in_process(run: Path, threads: int, repeats: int) -> dict[str, float]:
    """Median latency (ms) of the traced TopKRanker at 1 session and sessions/s at 64, in this process."""
    import torch

    from export.inference import TopKRanker, example_inputs, trace_ranker
    from training.checkpoint import load_run

    torch.set_num_threads(threads)
    model, meta = load_run(run)
    cfg = model.cfg
    ranker = TopKRanker(model, cfg.feature_names, TOP_K, cfg.n_items)
    traced = trace_ranker(ranker, example_inputs(meta["schema"], batch=4))
    out: dict[str, float] = {}
    with torch.inference_mode():
        for batch in (1, 64):
            inputs = example_inputs(meta["schema"], batch=batch)
            traced(*inputs)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                traced(*inputs)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            if batch == 1:
                out["p50_ms_1_session"] = med * 1000
            else:
                out["sessions_per_s_64"] = batch / med
    return out


def serve_triton(repo: Path, data: Path, seconds: float) -> dict[str, float]:
    """Through Triton (the exported ensemble, gRPC, one client thread): median latency (ms) of
    1-session requests and sessions/s of back-to-back 64-session requests, whole real sessions of
    DATA; also the server's resident set (tritonserver + Python-backend stubs) after the load."""
    import pandas as pd

    from clients.load import build_requests, run_load
    from export.tritonserver import ServerConfig, TritonServer
    from training.names import INTERACTIONS_FILE, SCHEMA_FILE

    schema = json.loads((data / SCHEMA_FILE).read_text())
    requests = build_requests(pd.read_parquet(data / INTERACTIONS_FILE), schema["raw_inputs"], 32)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    with TritonServer(ServerConfig(repo=repo, grpc_port=0, http_port=0, metrics_port=0)) as server:
        out["server_start_s"] = time.perf_counter() - t0
        url = server.grpc_url
        for big, key in ((0.0, 1), (1.0, 64)):
            run_load(url, requests, min(3.0, seconds), 1, big, TOP_K)  # warm-up
            res = run_load(url, requests, seconds, 1, big, TOP_K)
            if res.failures:
                raise BenchError(f"{len(res.failures)} failed requests through Triton: {res.failures[:3]}")
            lat = res.latencies[key]
            if key == 1:
                out["p50_ms_1_session"] = statistics.median(lat) * 1000
                out["requests_1_session"] = len(lat)
            else:
                out["sessions_per_s_64"] = 64 * len(lat) / sum(lat)
                out["p50_ms_64_sessions"] = statistics.median(lat) * 1000
                out["requests_64_sessions"] = len(lat)
        out["server_rss_mib"] = server.rss_bytes() / MIB
    return out


def one_size(items: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from training.data.splits import available_windows, load_schema, load_split, split_path
    from training.schema import Schema

    py = sys.executable
    tag = f"items{items}"
    log = work / f"log-{tag}-clicks{args.clicks}.parquet"
    data, run, repo = work / f"data-{tag}", work / f"run-{tag}", work / f"repo-{tag}"
    res: dict[str, Any] = {"items": items, "clicks_asked": args.clicks}
    if not log.is_file():
        subprocess.run(
            [py, "-m", "bench.scale_log", "--items", str(items), "--clicks", str(args.clicks),
             "--days", str(args.days), "--out", str(log)],
            cwd=PROJECT_ROOT, check=True,
        )  # fmt: skip
    for p in (data, run, repo):
        shutil.rmtree(p, ignore_errors=True)
    prep = [py, "-m", "training.prepare", "--input", str(log), "--time-col", "timestamp",
            "--time-unit", "s", "--out", str(data), "--quiet"]  # fmt: skip
    if args.prepare_workers:
        prep += ["--workers", str(args.prepare_workers)]
    res["prepare"] = run_measured(prep, work / f"prepare-{tag}.log")
    print(f"[scale] {tag}: prepare {res['prepare']}", file=sys.stderr, flush=True)

    schema = Schema.of(load_schema(data))
    res["vocabulary"] = int(schema.categorical[schema.item_feature])  # encoded ids, specials included
    windows = available_windows(data, schema)
    w = windows[-2]  # a late window that has a next one to evaluate on
    st = load_split(split_path(data, w, "train"), schema)
    res["train_window"], res["window_sessions"] = w, len(st)
    train = [py, "-m", "training.train", "--data", str(data), "--out", str(run), "--no-progress",
             "--start-window", str(w), "--end-window", str(w + 1), "--epochs", "1",
             "--max-steps", str(args.max_steps), "--early-stopping", "0", "--holdout", "0",
             "--no-baselines", "--threads", str(args.threads), *args.train_args.split()]  # fmt: skip
    res["train"] = run_measured(train, work / f"train-{tag}.log")
    metrics = json.loads((run / "metrics.json").read_text())
    row = metrics["windows"][-1]
    meta = json.loads((run / "meta.json").read_text())
    res["train"].update(
        loss=meta["model_config"]["loss"],
        rank=meta["model_config"]["rank"],
        choices=meta.get("choices"),
        memory=meta["model_config"]["memory"],
        memory_k=meta["model_config"]["memory_k"],
        steps=row["steps"],
        sessions_trained=row["sessions_trained"],
        sessions_per_s=row["train_sessions_per_second"],
        train_seconds=row["train_seconds"],
        eval_seconds=row.get("eval_seconds"),
        eval_sessions=row.get("eval_sessions"),
        ndcg20=row.get("ndcg@20"),
        model_pt_mib=(run / "model.pt").stat().st_size / MIB,
        optim_pt_mib=(run / "optim.pt").stat().st_size / MIB,
    )
    print(f"[scale] {tag}: train {res['train']}", file=sys.stderr, flush=True)
    res["serve_in_process"] = serve_in_process(run, args.threads, args.repeats)
    print(f"[scale] {tag}: serve (in-process) {res['serve_in_process']}", file=sys.stderr, flush=True)
    if args.export:
        exp = run_measured(
            [py, "-m", "export", "--run", str(run), "--data", str(data), "--out", str(repo)],
            work / f"export-{tag}.log",
        )
        res["export"] = {**exp, "repository_mib": du_bytes(repo) / MIB}
        print(f"[scale] {tag}: export {res['export']}", file=sys.stderr, flush=True)
        if args.triton:
            res["serve_triton"] = serve_triton(repo, data, args.triton_seconds)
            print(f"[scale] {tag}: serve (Triton) {res['serve_triton']}", file=sys.stderr, flush=True)
    return res


def _get(r: dict[str, Any], path: str) -> float | None:
    v: Any = r
    for k in path.split("."):
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


COLUMNS = (  # (header, path in a size's result, format)
    ("items", "items", "{:,}"),
    ("vocab", "vocabulary", "{:,}"),
    ("prep s", "prepare.seconds", "{:.0f}"),
    ("prep RSS MiB", "prepare.peak_rss_mib", "{:.0f}"),
    ("loss", "train.loss", "{}"),
    ("rank", "train.rank", "{}"),
    ("train sess/s", "train.sessions_per_s", "{:.0f}"),
    ("train RSS MiB", "train.peak_rss_mib", "{:.0f}"),
    ("p50 1-sess ms*", "serve_in_process.p50_ms_1_session", "{:.2f}"),
    ("64-sess sess/s*", "serve_in_process.sessions_per_s_64", "{:.0f}"),
    ("export MiB", "export.repository_mib", "{:.0f}"),
    ("Triton p50 1-sess ms", "serve_triton.p50_ms_1_session", "{:.2f}"),
    ("Triton 64-sess sess/s", "serve_triton.sessions_per_s_64", "{:.0f}"),
)
RATIOS = (  # (name, path, target as "x >= / <= value" of the first size's)
    ("train sessions/s", "train.sessions_per_s", ">=", 0.5),
    ("served p50 1 session (in-process)", "serve_in_process.p50_ms_1_session", "<=", 2.0),
    ("64-session sessions/s (in-process)", "serve_in_process.sessions_per_s_64", ">=", 0.5),
    ("served p50 1 session (Triton)", "serve_triton.p50_ms_1_session", "<=", 2.0),
    ("64-session sessions/s (Triton)", "serve_triton.sessions_per_s_64", ">=", 0.5),
)


def table(sizes: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], path: str, fmt: str) -> str:
        v = _get(r, path)
        return "-" if v is None else fmt.format(v)

    lines = [
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(cell(r, p, f) for _, p, f in COLUMNS) + " |" for r in sizes),
        "",
        "* in-process: the traced TopKRanker called in Python, not a request through Triton "
        "(the Triton columns: gRPC requests to the exported ensemble, one client thread).",
    ]
    return "\n".join(lines)


def ratios(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every size against the first: value / first value, and whether the issue's target holds."""
    out = []
    first = sizes[0]
    for r in sizes[1:]:
        for name, path, op, target in RATIOS:
            a, b = _get(first, path), _get(r, path)
            if a is None or b is None or a == 0:
                continue
            x = b / a
            out.append(
                {"items": r["items"], "metric": name, "ratio": x, "target": f"{op} {target}",
                 "met": x >= target if op == ">=" else x <= target}
            )  # fmt: skip
        rss = _get(r, "train.peak_rss_mib")
        if rss is not None:
            out.append({"items": r["items"], "metric": "train peak RSS GiB", "ratio": rss / 1024,
                        "target": "<= 4", "met": rss / 1024 <= 4.0})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--items", type=int, nargs="+", default=list(DEFAULT_ITEMS), help="catalogue sizes")
    p.add_argument("--clicks", type=int, default=5_000_000, help="clicks of every log (same for every size)")
    p.add_argument("--days", type=int, default=14, help="days the sessions spread over")
    p.add_argument("--max-steps", type=int, default=100, help="training steps of batch 128 at every size")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and in-process serving")
    p.add_argument("--repeats", type=int, default=30, help="timed in-process calls per batch size")
    p.add_argument(
        "--prepare-workers", type=int, default=0, help="training.prepare --workers (0 = one process)"
    )
    p.add_argument(
        "--train-args", default="", help="more training.train flags, one string (e.g. '--memory-k 20')"
    )
    p.add_argument("--no-export", dest="export", action="store_false", help="skip the export step")
    p.add_argument(
        "--triton", action="store_true", help="also serve each exported repository through Triton (gRPC)"
    )
    p.add_argument("--triton-seconds", type=float, default=15.0, help="measured load per request size")
    p.add_argument(
        "--work", default=None, help="folder for logs, data, runs (default: a temp folder; logs are kept)"
    )
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = []
    for items in args.items:
        sizes.append(one_size(items, args, work))
        result = {  # written after every size: a long run leaves what it measured
            "config": {k: v for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "sizes": sizes,
            "ratios_to_first": ratios(sizes),
        }
        atomic_write(Path(args.out), json.dumps(result, indent=2).encode())
    print(table(sizes))
    for r in ratios(sizes):
        print(
            f"{r['items']:>9,} {r['metric']}: {r['ratio']:.3f} (target {r['target']}) {'met' if r['met'] else 'NOT met'}"
        )
    print(f"wrote {args.out} (work folder {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
