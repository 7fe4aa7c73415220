"""Accuracy of the training recipe against the baselines on DIGINETICA (3 seeds).

    python -m bench.quality --out bench_results/quality.json      # make bench-quality
    python -m bench.quality --out q.json --seeds 0 --recipe reference

Prepares ../shared/data/diginetica/diginetica-views-7days.tsv (or --input) with
`python -m training.prepare`, trains `python -m training.train` with the
recipe the data selects (real logs: the "real" recipe; override with
--recipe) for every seed, and writes per-window and mean NDCG@20,
Recall@20 and MRR@20 of the model, of the baselines of training/baselines.py
(vsknn included) and of the count blend, all evaluated on the same sessions,
the training time, and the model / best-baseline ratios. Prints the markdown
table of docs/quality.md. The learning curve (model, count blend and V-SKNN
per window against the training sessions seen so far, mean over seeds; from
how many sessions the model leads each in every later window) goes in the JSON
(`learning_curve`, `leads_from`), the markdown, and a PNG beside OUT.

Honest numbers (issue 12): the table is measured on the TEST split of every
evaluation window (`--eval-split test`, the default here), which no choice
reads (early stopping and head selection use held-back training sessions);
window t is evaluated with the vocabulary known after t (unknown input items
are OOV, an unknown target is a miss for every method); each row records
items_known and unseen_targets.

The "count blend" is the model's ItemMemory untrained (gates at their initial
values, no network logits): what the counts alone give. training.train reports
it in every row beside the baselines (`baselines.count_blend`), computed from
the model's own count tables with a fresh ItemMemory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.ablation import curve_markdown, leads_from, learning_curve, plot_curve
from bench.common import PROJECT_ROOT
from bench.paired import SPLITS, PairedError, group_table, paired, split_sessions
from bench.paired import markdown as paired_markdown
from training.baselines import BASELINES
from training.checkpoint import RunError
from training.config import TrainConfig, load_params
from training.data.splits import DataError, load_schema
from training.evaluate import COUNT_BLEND
from training.integrity import atomic_write
from training.recipes import resolve_settings
from training.train import train

DEFAULT_INPUT = PROJECT_ROOT.parent / "shared" / "data" / "diginetica" / "diginetica-views-7days.tsv"
PREPARE_ARGS = [
    "--session-col", "sessionId", "--item-col", "itemId", "--time-col", "Time",
    "--order-col", "timeframe", "--time-unit", "s",
]  # fmt: skip
METRICS = ("ndcg@20", "recall@20", "mrr@20")
METHODS = ("model", *BASELINES, COUNT_BLEND)


class BenchError(RuntimeError):
    pass


def prepare(input_path: Path, out: Path, extra: list[str] | None = None) -> None:
    if not input_path.is_file():
        raise BenchError(
            f"{input_path} does not exist: bench.quality needs the DIGINETICA views file "
            "(../shared/data/diginetica/diginetica-views-7days.tsv next to the repository), or pass --input"
        )
    cmd = [sys.executable, "-m", "training.prepare", "--input", str(input_path), *(extra or PREPARE_ARGS)]
    subprocess.run([*cmd, "--out", str(out)], check=True, cwd=PROJECT_ROOT)


def per_window(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows, seen = [], 0
    for r in result["windows"]:
        seen += r.get("train_sessions", 0)
        if r.get("eval_sessions", 0) == 0 or seen == 0:
            continue  # nothing trained yet (DIGINETICA's window 1 is empty): no method has data
        row = {
            "train_window": r["train_window"],
            "eval_window": r["eval_window"],
            "eval_sessions": r["eval_sessions"],
            "items_known": r["items_known"],
            "unseen_targets": r["unseen_targets"],
        }
        row["model"] = {m: r[m] for m in METRICS}
        for b in (*BASELINES, COUNT_BLEND):
            row[b] = {m: r["baselines"][b][m] for m in METRICS}
        rows.append(row)
    return rows


def reused_run(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """--reuse-runs: a seed's finished RUN/metrics.json (same last window and eval split), else None."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    rows = result["windows"]
    split = result.get("train_config", {}).get("eval_split", "valid")
    if not rows or rows[-1]["train_window"] != args.end_window - 1 or split != args.eval_split:
        raise BenchError(
            f"--reuse-runs: {path} is not a finished run of windows ..{args.end_window - 1} evaluated on "
            f"{args.eval_split} (last window {rows[-1]['train_window'] if rows else None}, split {split}); "
            "remove it or drop --reuse-runs"
        )
    print(f"[bench_quality] reusing {path}", file=sys.stderr)
    return result


def mean_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {k: {m: float(np.mean([r[k][m] for r in rows])) for m in METRICS} for k in METHODS}


def markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [
        f"Mean over seeds {', '.join(map(str, seeds))} (train windows 1..t, evaluate window t+1's "
        f"{summary['eval_split']} split with the vocabulary known after t; recipe `{summary['recipe']}`)",
        "",
        "| eval window | sessions | items known | unseen targets | "
        + " | ".join(f"{k} NDCG@20 / Recall@20 / MRR@20" for k in METHODS)
        + " |",
        "|---|---|---|---|" + "---|" * len(METHODS),
    ]
    for w in summary["windows"]:
        cells = [" / ".join(f"{w[k][m]:.4f}" for m in METRICS) for k in METHODS]
        lines.append(
            f"| {w['eval_window']} | {w['eval_sessions']} | {w['items_known']} | {w['unseen_targets']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    mean = summary["mean"]
    cells = [" / ".join(f"**{mean[k][m]:.4f}**" for m in METRICS) for k in METHODS]
    lines.append(f"| **mean** | | | {summary['unseen_targets']:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| seed | model NDCG@20 | best baseline NDCG@20 | model Recall@20 | best baseline Recall@20 | train s |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary["per_seed"]:
        lines.append(
            f"| {s['seed']} | {s['mean']['model']['ndcg@20']:.4f} | {s['best_baseline']['ndcg@20']:.4f} | "
            f"{s['mean']['model']['recall@20']:.4f} | {s['best_baseline']['recall@20']:.4f} | {s['train_seconds']:.0f} |"
        )
    r = summary["ratio_to_best_baseline"]
    lines += [
        "",
        f"Model / best baseline (mean over seeds): NDCG@20 {r['ndcg@20']:.3f}x, Recall@20 {r['recall@20']:.3f}x "
        f"(target >= 1.05x). Training time per seed: {summary['train_seconds_per_seed']:.0f} s.",
    ]
    rb = summary["ratio_to_count_blend"]
    lines += [
        "",
        f"Model / count blend (the ItemMemory untrained): NDCG@20 {rb['ndcg@20']:.3f}x, "
        f"Recall@20 {rb['recall@20']:.3f}x, MRR@20 {rb['mrr@20']:.3f}x.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-quality-"))
    data = work / "data"
    if not (data / "schema.json").is_file():
        prepare(Path(args.input), data, args.prepare_args.split() if args.prepare_args else None)
    schema = load_schema(data)
    if not args.end_window:  # every window of the data: the last one is only evaluated
        args.end_window = max(schema["windows"])
    # load_params: model fields at the top level or under "model", as training.train --config reads them
    settings = resolve_settings(schema, args.recipe, load_params(args.config) if args.config else None)
    per_seed, all_rows, results = [], [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run_dir = work / f"run-seed{seed}"
        result = reused_run(run_dir, args) if args.reuse_runs else None
        result = result or train(
            TrainConfig(
                **{
                    **settings,  # the bench's own arguments below win over a --config file's
                    "data": str(data),
                    "out": str(run_dir),
                    "seed": seed,
                    "end_window": args.end_window,
                    "threads": args.threads,
                    "progress": False,
                    "eval_split": args.eval_split,
                    "save_ranks": True,  # per-session ranks: the paired bootstrap below
                }
            )
        )
        results.append(result)
        rows = per_window(result)
        mean = mean_of(rows)
        best = {m: max(mean[b][m] for b in BASELINES) for m in METRICS}
        per_seed.append(
            {
                "seed": seed,
                "mean": mean,
                "best_baseline": best,
                "windows": rows,
                "train_seconds": result["summary"]["train_seconds"],
                "wall_seconds": time.perf_counter() - t0,
            }
        )
        all_rows.append(rows)
        print(
            f"[bench_quality] seed {seed}: model ndcg@20={mean['model']['ndcg@20']:.4f} "
            f"best baseline {best['ndcg@20']:.4f}",
            file=sys.stderr,
        )
    windows = []
    for i, w in enumerate(all_rows[0]):
        windows.append(
            {
                "eval_window": w["eval_window"],
                "eval_sessions": w["eval_sessions"],
                "items_known": w["items_known"],
                "unseen_targets": w["unseen_targets"],
                **{
                    k: {m: float(np.mean([rows[i][k][m] for rows in all_rows])) for m in METRICS}
                    for k in METHODS
                },
            }
        )
    mean = {k: {m: float(np.mean([s["mean"][k][m] for s in per_seed])) for m in METRICS} for k in METHODS}
    best = {m: max(mean[b][m] for b in BASELINES) for m in METRICS}
    summary = {
        "data": str(args.input),
        "eval_split": args.eval_split,
        "recipe": settings["recipe"],
        "settings": settings,
        "seeds": list(args.seeds),
        "windows": windows,
        "unseen_targets": float(np.mean([w["unseen_targets"] for w in windows])),
        "mean": mean,
        "best_baseline": best,
        "ratio_to_best_baseline": {m: mean["model"][m] / best[m] if best[m] > 0 else None for m in METRICS},
        "ratio_to_count_blend": {
            m: mean["model"][m] / mean["count_blend"][m] if mean["count_blend"][m] > 0 else None
            for m in METRICS
        },
        "train_seconds_per_seed": float(np.mean([s["train_seconds"] for s in per_seed])),
        "per_seed": per_seed,
    }
    # from how many training sessions the network pays: model, blend and V-SKNN per window, mean over seeds
    curve = learning_curve(results)
    summary["learning_curve"] = curve
    summary["leads_from"] = {
        k: {m: leads_from(curve, k, m) for m in ("ndcg@20", "recall@20")} for k in (COUNT_BLEND, "vsknn")
    }
    runs = [work / f"run-seed{seed}" for seed in args.seeds]
    try:  # model against the count blend and against V-SKNN, session by session (bench/paired.py)
        scored = [w["eval_window"] for w in windows]  # the protocol's windows (something trained before)
        summary["paired"] = {b: paired(runs, b, windows=scored) for b in (COUNT_BLEND, "vsknn")}
        # where the model's lead over its blend sits: re-visits or new items, and by how often the
        # target was seen in training (`bench.paired --by-repeat / --by-frequency`)
        for kind in SPLITS:
            summary[kind] = split_sessions(kind, runs, data, args.eval_split, COUNT_BLEND, windows=scored)
    except PairedError as e:  # reused runs trained before --save-ranks
        summary["paired"] = {"skipped": str(e)}
    summary["markdown"] = markdown(summary)
    if "skipped" not in summary["paired"]:
        summary["markdown"] += "\n\n" + "\n\n".join(paired_markdown(r) for r in summary["paired"].values())
        summary["markdown"] += "\n\n" + "\n\n".join(
            [
                group_table(summary["by_repeat"], COUNT_BLEND, "target"),
                group_table(summary["by_frequency"], COUNT_BLEND, "target seen in training"),
            ]
        )
    summary["markdown"] += "\n\nLearning curve (mean over seeds):\n\n" + curve_markdown(curve)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, out.with_suffix(".png"), f"{Path(args.input).parent.name}/{Path(args.input).name}: learning curve", split=args.eval_split)
    atomic_write(out, json.dumps(summary, indent=2).encode())
    print(summary["markdown"])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--input", default=str(DEFAULT_INPUT), help="DIGINETICA views TSV")
    p.add_argument(
        "--prepare-args",
        default=None,
        help="training.prepare column flags for another --input, one string "
        "(default: DIGINETICA's sessionId/itemId/Time/timeframe)",
    )
    p.add_argument(
        "--work", default=None, help="folder for the prepared data and runs (default: a temp folder)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--recipe", default="auto", help="auto | reference | real")
    p.add_argument("--config", default=None, help="settings JSON (training.tune output) on top of the recipe")
    p.add_argument(
        "--end-window",
        type=int,
        default=0,
        help="train on windows 1..END-1, evaluating each t on t+1 (default 0: through the data's last window)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument(
        "--reuse-runs",
        action="store_true",
        help="read a seed's finished --work/run-seed<N>/metrics.json instead of training it again "
        "(seeds trained by separate bench processes, then summarised together)",
    )
    p.add_argument(
        "--eval-split",
        choices=("valid", "test"),
        default="test",
        help="split of each evaluation window (default test: final numbers no choice has read)",
    )
    args = p.parse_args(argv)
    try:
        run(args)
    except (BenchError, DataError, RunError) as e:  # e.g. --work already holds runs of these seeds
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
