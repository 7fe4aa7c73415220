"""Benchmark of the data stage (a script, not a timed test).

    python -m bench.prepare --out bench_results/prepare.json      # make bench-data
    python -m bench.prepare --out x.json --sizes 100000 --repeats 1 --no-reference

Times `training.data.prepare.prepare()` on synthetic click logs (default 100,000 rows, the
reference example, and 1,000,000 rows) and, in the same run, the reference example's
NVTabular ETL (Transformers4Rec getting-started notebook 01, cell 15 with stock ops,
`fit_transform(...).to_parquet(...)` and the per-day CPU split; the graph is
training.data.reference_workflow) on the same 100,000 rows. Every measurement runs
in a fresh process after the imports, so the figures exclude interpreter
start-up and the ~5 s NVTabular import; peak RSS is that process's maximum
resident set size (imports included).

Prints interactions/s and peak memory per size and writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_ROWS = 100_000


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measurement(kind: str, rows: int, seconds: float, sessions_kept: int, rss_before: float, **extra) -> dict:
    """One child's result line (peak RSS read now, at its end)."""
    return {
        "kind": kind,
        "rows": rows,
        "seconds": seconds,
        "interactions_per_s": rows / seconds,
        "sessions_kept": sessions_kept,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
        **extra,
    }


def child_prepare(rows: int, seed: int, workdir: Path) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import training.data.workflow  # noqa: F401  (import NVTabular before the clock starts)
    from training.data.prepare import PrepareConfig, prepare

    rss_before = _rss_mib()
    t = time.perf_counter()
    summary = prepare(PrepareConfig(out=workdir / "data", synthetic=True, seed=seed, num_rows=rows, quiet=True))
    seconds = time.perf_counter() - t
    return _measurement("prepare", rows, seconds, summary["sessions_kept"], rss_before, timings_s=summary["timings_s"])


def child_reference(rows: int, seed: int, workdir: Path) -> dict:
    """The reference notebook's ETL, as reproduced in ../shared/bench/t4rec_reference.py."""
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import nvtabular as nvt
    import pandas as pd
    from nvtabular import ops

    from training.data.reference_workflow import reference_etl_graph

    os.chdir(workdir)  # Categorify writes ./categories
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    np.random.seed(seed)
    item = np.clip(np.random.lognormal(3.0, 1.0, rows).astype(np.int32), 1, 50000)
    df = pd.DataFrame(np.random.randint(70000, 90000, rows), columns=["session_id"])
    df["item_id"] = item
    df["category"] = pd.cut(df["item_id"], bins=334, labels=np.arange(1, 335)).astype(np.int32)
    df["age_days"] = np.random.uniform(0, 1, rows).astype(np.float32)
    df["weekday_sin"] = np.random.uniform(0, 1, rows).astype(np.float32)
    map_day = dict(zip(df.session_id.unique(), np.random.randint(1, 10, size=df.session_id.nunique())))
    df["day"] = df.session_id.map(map_day)

    filtered = reference_etl_graph(workdir)
    seq = filtered["item_id-list", "category-list", "age_days-list", "weekday_sin-list"] >> ops.ValueCount()
    workflow = nvt.Workflow(filtered["session_id", "day-first"] + seq)
    # The notebook calls .to_parquet(processed_nvt) on the transformed Dataset; in this venv
    # merlin's to_parquet fails writing its schema.pbtxt (tensorflow_metadata vs protobuf),
    # so the same transform is computed with .to_ddf() and written by pandas.
    sessions = workflow.fit_transform(nvt.Dataset(df)).to_ddf().compute()
    (workdir / "processed_nvt").mkdir()
    sessions.to_parquet(workdir / "processed_nvt" / "part_0.parquet")
    workflow.save(str(workdir / "workflow_etl"))

    out_dir = workdir / "sessions_by_day"
    for day in sorted(sessions["day-first"].unique(), key=str):
        d = sessions[sessions["day-first"] == day].drop(columns=["day-first"]).sort_values("session_id")
        folder = out_dir / str(day)
        folder.mkdir(parents=True, exist_ok=True)
        np.random.seed(1)
        r = np.random.rand(len(d))
        d[r <= 0.8].to_parquet(folder / "train.parquet")
        d[(r > 0.8) & (r <= 0.9)].to_parquet(folder / "valid.parquet")
        d[r > 0.9].to_parquet(folder / "test.parquet")
    seconds = time.perf_counter() - t0
    return _measurement("reference_etl", rows, seconds, int(len(sessions)), rss_before)


def _run_child(kind: str, rows: int, seed: int, timeout: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        cmd = [sys.executable, "-m", "bench.prepare", "--child", kind, "--rows", str(rows),
               "--seed", str(seed), "--workdir", str(workdir)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(sizes: list[int], repeats: int, reference: bool, seed: int) -> dict:
    runs = []
    for rows in sizes:
        for i in range(repeats):
            r = _run_child("prepare", rows, seed, timeout=1800)
            r["repeat"] = i
            runs.append(r)
            print(f"prepare {rows:>9,} rows: {r['seconds']:7.2f} s  {r['interactions_per_s']:>11,.0f} interactions/s  "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    ref = None
    if reference:
        ref = _run_child("reference", REFERENCE_ROWS, seed, timeout=1800)
        print(f"reference ETL {REFERENCE_ROWS:,} rows: {ref['seconds']:.2f} s", file=sys.stderr, flush=True)

    summary = []
    for rows in sizes:
        secs = [r["seconds"] for r in runs if r["rows"] == rows]
        med = statistics.median(secs)
        summary.append({
            "rows": rows,
            "seconds_median": round(med, 3),
            "seconds_min": round(min(secs), 3),
            "interactions_per_s": round(rows / med),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs if r["rows"] == rows), 1),
        })  # fmt: skip
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "note": "seconds exclude interpreter start-up and imports; one fresh process per run",
        "summary": summary,
        "runs": runs,
        "reference_etl": ref,
    }
    ours = next((s for s in summary if s["rows"] == REFERENCE_ROWS), None)
    if ref and ours:
        result["speedup_vs_reference_100k"] = round(ref["seconds"] / ours["seconds_median"], 1)
    return result


def format_table(result: dict) -> str:
    lines = [f"{'rows':>10} {'median s':>9} {'min s':>8} {'interactions/s':>15} {'peak RSS MiB':>13}"]
    for s in result["summary"]:
        lines.append(f"{s['rows']:>10,} {s['seconds_median']:>9.2f} {s['seconds_min']:>8.2f} "
                     f"{s['interactions_per_s']:>15,} {s['peak_rss_mib']:>13,.0f}")  # fmt: skip
    ref = result.get("reference_etl")
    if ref:
        lines.append(f"reference NVTabular ETL, {ref['rows']:,} rows: {ref['seconds']:.2f} s, "
                     f"peak RSS {ref['peak_rss_mib']:,.0f} MiB; speedup "
                     f"{result.get('speedup_vs_reference_100k', float('nan'))}x (target >= 10x)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON file to write (parent folders are created)")
    p.add_argument("--sizes", default=f"{REFERENCE_ROWS},1000000", help="comma-separated synthetic row counts")
    p.add_argument("--repeats", type=int, default=3, help="runs per size (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    p.add_argument("--no-reference", action="store_true", help="skip timing the reference NVTabular ETL (~1 min)")
    p.add_argument("--child", choices=("prepare", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=REFERENCE_ROWS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        fn = child_prepare if a.child == "prepare" else child_reference
        print(json.dumps(fn(a.rows, a.seed, a.workdir)))
        return 0
    if a.out is None:
        p.error("--out is required")
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    result = run(sizes, a.repeats, not a.no_reference, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
