"""Training benchmark: the reference protocol on the reference synthetic data, several seeds.

    python -m bench.train --out bench_results/train.json      # make bench-train
    python -m bench.train --out bench_results/train.json \\
        --reference-python /work/t4r-venv/bin/python      # + Transformers4Rec side by side

For every seed: prepare 100,000 synthetic interactions (`training.prepare`,
generator seeded like the reference notebook), train windows 1..7 and
evaluate each on the next window's valid split (`training.train`, 5 epochs,
batch 128, ...). Writes per-window and overall mean/stdev of every metric
(model and baselines), training throughput (sessions/s = sessions trained over
all epochs and windows / training seconds) and, with --reference-python, the
same for /work/shared/bench/t4rec_reference.py run with that interpreter in
the same benchmark (interleaved seed by seed, so both see the same machine
load) and the speed ratio. Prints a table; the JSON is the result to compare.
"""

from __future__ import annotations

import training.runtime  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

# isort: split
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_REFERENCE_SCRIPT = "/work/shared/bench/t4rec_reference.py"
COMPARED = ("ndcg@20", "recall@20", "ndcg@40", "recall@40")


@dataclass
class BenchConfig:
    out: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: int = 100_000
    work: str | None = None  # where DATA/RUN folders go (default: a temporary folder)
    threads: int = 0  # torch threads for both systems (0 = all cores)
    epochs: int = 5
    start_window: int = 1
    end_window: int = 8
    reference_python: str | None = None
    reference_script: str = DEFAULT_REFERENCE_SCRIPT
    baselines: bool = True


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def _prepare(data: Path, seed: int, rows: int) -> None:
    from training.data.prepare import PrepareConfig, prepare

    if (data / "schema.json").is_file():
        return
    prepare(PrepareConfig(out=data, synthetic=True, seed=seed, num_rows=rows, quiet=True))


def _run_ours(cfg: BenchConfig, data: Path, run: Path, seed: int) -> dict[str, Any]:
    from training.config import TrainConfig
    from training.train import train

    tc = TrainConfig(
        data=str(data),
        out=str(run),
        start_window=cfg.start_window,
        end_window=cfg.end_window,
        epochs=cfg.epochs,
        seed=seed,
        threads=cfg.threads or (os.cpu_count() or 1),
        device="cpu",
        baselines=cfg.baselines,
        progress=False,
    )
    return train(tc)


def _run_reference(cfg: BenchConfig, seed: int, work: Path) -> dict[str, Any]:
    cmd = [
        cfg.reference_python,
        cfg.reference_script,
        "--seed",
        str(seed),
        "--workdir",
        str(work / f"t4rec_seed{seed}"),
    ]
    cmd += ["--threads", str(cfg.threads or (os.cpu_count() or 1))]
    cwd = work / f"t4rec_cwd_seed{seed}"  # NVTabular writes ./categories into the working directory
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def summarise(ours: dict[int, dict], reference: dict[int, dict]) -> dict[str, Any]:
    seeds = sorted(ours)
    windows = [r["eval_window"] for r in ours[seeds[0]]["windows"] if r.get("eval_sessions", 0) > 0]
    keys = [k for k in ours[seeds[0]]["windows"][0] if "@" in k]
    baselines = list(ours[seeds[0]]["windows"][0].get("baselines", {}))

    def rows(s: int) -> dict[int, dict]:
        return {r["eval_window"]: r for r in ours[s]["windows"]}

    per_window = []
    for w in windows:
        entry: dict[str, Any] = {"eval_window": w}
        entry.update({k: _mean_sd([rows(s)[w][k] for s in seeds]) for k in keys})
        entry["eval_sessions"] = _mean_sd([rows(s)[w]["eval_sessions"] for s in seeds])
        entry["baselines"] = {
            b: {k: _mean_sd([rows(s)[w]["baselines"][b][k] for s in seeds]) for k in keys} for b in baselines
        }
        per_window.append(entry)
    seed_means = {s: ours[s]["summary"] for s in seeds}
    overall: dict[str, Any] = {k: _mean_sd([seed_means[s][k] for s in seeds]) for k in keys}
    overall["sessions_per_second"] = _mean_sd([seed_means[s]["sessions_per_second"] for s in seeds])
    overall["train_seconds"] = _mean_sd([seed_means[s]["train_seconds"] for s in seeds])
    overall["baselines"] = {
        b: {k: _mean_sd([seed_means[s]["baselines"][b][k] for s in seeds]) for k in keys} for b in baselines
    }
    out: dict[str, Any] = {"per_window": per_window, "overall": overall}
    if reference:
        rs = sorted(reference)
        ref = {k: _mean_sd([reference[s]["mean_over_days"][k] for s in rs]) for k in COMPARED}
        ref["sessions_per_second"] = _mean_sd([reference[s]["train_sessions_per_s"] for s in rs])
        ref["train_seconds"] = _mean_sd([reference[s]["train_s_total"] for s in rs])
        ref["per_window"] = [
            {
                "eval_window": d["day"],
                **{k: _mean_sd([reference[s]["per_day"][i][k] for s in rs]) for k in COMPARED},
            }
            for i, d in enumerate(reference[rs[0]]["per_day"])
        ]
        out["reference"] = ref
        out["speedup_sessions_per_second"] = (
            overall["sessions_per_second"]["mean"] / ref["sessions_per_second"]["mean"]
        )
        # per seed, measured back to back: the ratio is less sensitive to machine load
        out["speedup_per_seed"] = {
            s: seed_means[s]["sessions_per_second"] / reference[s]["train_sessions_per_s"]
            for s in rs
            if s in seed_means
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    lines = []
    baselines = list(summary["overall"].get("baselines", {}))
    head = f"{'window':>6} {'model ndcg@20':>16} {'model recall@20':>16}"
    head += "".join(f" {b + ' ndcg@20':>22}" for b in baselines)
    if "reference" in summary:
        head += f" {'t4rec ndcg@20':>16} {'t4rec recall@20':>16}"
    lines.append(head)
    ref_rows = {r["eval_window"]: r for r in summary.get("reference", {}).get("per_window", [])}

    def ms(d: dict) -> str:
        return f"{d['mean']:.4f}±{d['stdev']:.4f}"

    for r in summary["per_window"]:
        line = f"{r['eval_window']:>6} {ms(r['ndcg@20']):>16} {ms(r['recall@20']):>16}"
        line += "".join(f" {ms(r['baselines'][b]['ndcg@20']):>22}" for b in baselines)
        if r["eval_window"] in ref_rows:
            rr = ref_rows[r["eval_window"]]
            line += f" {ms(rr['ndcg@20']):>16} {ms(rr['recall@20']):>16}"
        lines.append(line)
    o = summary["overall"]
    line = f"{'mean':>6} {ms(o['ndcg@20']):>16} {ms(o['recall@20']):>16}"
    line += "".join(f" {ms(o['baselines'][b]['ndcg@20']):>22}" for b in baselines)
    if "reference" in summary:
        line += f" {ms(summary['reference']['ndcg@20']):>16} {ms(summary['reference']['recall@20']):>16}"
    lines.append(line)
    lines.append(f"training throughput: {ms(o['sessions_per_second'])} sessions/s (ours)")
    if "reference" in summary:
        ref = summary["reference"]
        lines.append(f"                     {ms(ref['sessions_per_second'])} sessions/s (Transformers4Rec)")
        lines.append(
            f"speed-up: {summary['speedup_sessions_per_second']:.2f}x (per seed: "
            + ", ".join(f"{v:.2f}x" for v in summary["speedup_per_seed"].values())
            + ")"
        )
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict[str, Any]:
    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    ours: dict[int, dict] = {}
    reference: dict[int, dict] = {}
    for seed in cfg.seeds:
        data = work / f"data_seed{seed}"
        t0 = time.perf_counter()
        _prepare(data, seed, cfg.rows)
        print(f"[bench] seed {seed}: data ready in {time.perf_counter() - t0:.1f}s ({data})", file=sys.stderr)
        run_dir = work / f"run_seed{seed}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        ours[seed] = _run_ours(cfg, data, run_dir, seed)
        s = ours[seed]["summary"]
        print(
            f"[bench] seed {seed}: ndcg@20={s['ndcg@20']:.4f} recall@20={s['recall@20']:.4f} "
            f"{s['sessions_per_second']:.0f} sessions/s",
            file=sys.stderr,
        )
        if cfg.reference_python:
            reference[seed] = _run_reference(cfg, seed, work)
            r = reference[seed]
            print(
                f"[bench] seed {seed} t4rec: ndcg@20={r['mean_over_days']['ndcg@20']:.4f} "
                f"recall@20={r['mean_over_days']['recall@20']:.4f} {r['train_sessions_per_s']:.0f} sessions/s",
                file=sys.stderr,
            )
    import torch

    result = {
        "config": asdict(cfg),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "summary": summarise(ours, reference),
        "seeds": {str(s): {"windows": ours[s]["windows"], "summary": ours[s]["summary"]} for s in ours},
        "reference_runs": {str(s): reference[s] for s in reference},
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_table(result["summary"]))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return result


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data generation and training)"
    )
    p.add_argument("--rows", type=int, default=100_000, help="synthetic interactions per seed")
    p.add_argument(
        "--work", default=None, help="folder for the prepared data and runs (default: a temp folder)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for both systems (0 = all cores)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per window")
    p.add_argument("--start-window", type=int, default=1, help="first training window")
    p.add_argument("--end-window", type=int, default=8, help="train windows start..END-1")
    p.add_argument(
        "--reference-python", default=None, help="python of a Transformers4Rec venv: run it side by side"
    )
    p.add_argument(
        "--reference-script", default=DEFAULT_REFERENCE_SCRIPT, help="the T4Rec reproduction script"
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    a = p.parse_args(argv)
    return BenchConfig(
        out=a.out,
        seeds=a.seeds,
        rows=a.rows,
        work=a.work,
        threads=a.threads,
        epochs=a.epochs,
        start_window=a.start_window,
        end_window=a.end_window,
        reference_python=a.reference_python,
        reference_script=a.reference_script,
        baselines=not a.no_baselines,
    )


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
