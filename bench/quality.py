"""Accuracy of the training recipe against the baselines on DIGINETICA (3 seeds).

    python -m bench.quality --out bench_results/quality.json      # make bench-quality
    python -m bench.quality --out q.json --seeds 0 --recipe reference

Prepares ../shared/data/diginetica/diginetica-views-7days.tsv (or --input) with
`python -m training.prepare`, trains `python -m training.train` with the
recipe the data selects (real logs: the "real" recipe; override with
--recipe) for every seed, and writes per-window and mean NDCG@20,
Recall@20 and MRR@20 of the model and of the three baselines (evaluated on
the same sessions), the training time, and the model / best-baseline ratios.
Prints the markdown table of docs/quality.md.

Also reported, as an ablation that is not one of the issue's baselines: the
"count blend", i.e. the model's ItemMemory at its initial weights with the
network's item logits at zero (no training, no XLNet): what the counts alone
give. The trained model must beat it too for the network to earn its place.
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

from bench.common import PROJECT_ROOT
from training.baselines import BASELINES
from training.checkpoint import RunError
from training.config import TrainConfig, load_params
from training.data import DataError, load_schema, load_split, split_path
from training.integrity import atomic_write
from training.model import ModelConfig, SessionModel
from training.recipes import resolve_settings
from training.train import train
from training.trainer import evaluate_model, set_memory

DEFAULT_INPUT = PROJECT_ROOT.parent / "shared" / "data" / "diginetica" / "diginetica-views-7days.tsv"
PREPARE_ARGS = [
    "--session-col", "sessionId", "--item-col", "itemId", "--time-col", "Time",
    "--order-col", "timeframe", "--time-unit", "s",
]  # fmt: skip
METRICS = ("ndcg@20", "recall@20", "mrr@20")
METHODS = ("model", *BASELINES)


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
        }
        row["model"] = {m: r[m] for m in METRICS}
        for b in BASELINES:
            row[b] = {m: r["baselines"][b][m] for m in METRICS}
        rows.append(row)
    return rows


def count_blend(data: Path, schema: dict[str, Any], eval_windows: list[int]) -> dict[int, dict[str, float]]:
    """Metrics of the untrained ItemMemory alone (initial gates, item logits of the network at zero)
    on `<t+1>/valid.parquet`, with the counts of every training split of windows <= t."""
    import torch

    model = SessionModel(ModelConfig.from_schema(schema, memory=True, objective="clm")).eval()
    with torch.no_grad():
        model.embeddings[model.cfg.item_feature].weight.zero_()  # h @ E^T = 0: only the counts rank
    out: dict[int, dict[str, float]] = {}
    for e in eval_windows:
        train_splits = [load_split(split_path(data, w, "train"), schema) for w in schema["windows"] if w < e]
        set_memory(model, train_splits)
        res = evaluate_model(model, load_split(split_path(data, e, "valid"), schema), torch.device("cpu"), 1024)
        out[e] = {m: res[m] for m in METRICS}
    return out


def mean_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {k: {m: float(np.mean([r[k][m] for r in rows])) for m in METRICS} for k in METHODS}


def markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [
        f"Mean over seeds {', '.join(map(str, seeds))} (train windows 1..t, evaluate window t+1; "
        f"recipe `{summary['recipe']}`)",
        "",
        "| eval window | sessions | "
        + " | ".join(f"{k} NDCG@20 / Recall@20 / MRR@20" for k in METHODS)
        + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for w in summary["windows"]:
        cells = [" / ".join(f"{w[k][m]:.4f}" for m in METRICS) for k in METHODS]
        lines.append(f"| {w['eval_window']} | {w['eval_sessions']} | " + " | ".join(cells) + " |")
    mean = summary["mean"]
    cells = [" / ".join(f"**{mean[k][m]:.4f}**" for m in METRICS) for k in METHODS]
    lines.append("| **mean** | | " + " | ".join(cells) + " |")
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
    if "count_blend" in mean:
        b, rb = mean["count_blend"], summary["ratio_to_count_blend"]
        lines += [
            "",
            "Ablation, count blend (the ItemMemory untrained, network logits at zero): "
            + " / ".join(f"{b[m]:.4f}" for m in METRICS)
            + f" (NDCG@20 / Recall@20 / MRR@20); model / count blend: NDCG@20 {rb['ndcg@20']:.3f}x, "
            f"Recall@20 {rb['recall@20']:.3f}x.",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-quality-"))
    data = work / "data"
    if not (data / "schema.json").is_file():
        prepare(Path(args.input), data, args.prepare_args.split() if args.prepare_args else None)
    schema = load_schema(data)
    # load_params: model fields at the top level or under "model", as training.train --config reads them
    settings = resolve_settings(schema, args.recipe, load_params(args.config) if args.config else None)
    per_seed, all_rows = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        result = train(
            TrainConfig(
                data=str(data),
                out=str(work / f"run-seed{seed}"),
                seed=seed,
                end_window=args.end_window,
                threads=args.threads,
                progress=False,
                **settings,
            )
        )
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
                **{
                    k: {m: float(np.mean([rows[i][k][m] for rows in all_rows])) for m in METRICS}
                    for k in METHODS
                },
            }
        )
    mean = {k: {m: float(np.mean([s["mean"][k][m] for s in per_seed])) for m in METRICS} for k in METHODS}
    best = {m: max(mean[b][m] for b in BASELINES) for m in METRICS}
    blend = count_blend(data, schema, [w["eval_window"] for w in windows])
    for w in windows:
        w["count_blend"] = blend[w["eval_window"]]
    mean["count_blend"] = {m: float(np.mean([w["count_blend"][m] for w in windows])) for m in METRICS}
    summary = {
        "data": str(args.input),
        "recipe": settings["recipe"],
        "settings": settings,
        "seeds": list(args.seeds),
        "windows": windows,
        "mean": mean,
        "best_baseline": best,
        "ratio_to_best_baseline": {m: mean["model"][m] / best[m] if best[m] > 0 else None for m in METRICS},
        "ratio_to_count_blend": {
            m: mean["model"][m] / mean["count_blend"][m] if mean["count_blend"][m] > 0 else None for m in METRICS
        },
        "train_seconds_per_seed": float(np.mean([s["train_seconds"] for s in per_seed])),
        "per_seed": per_seed,
    }
    summary["markdown"] = markdown(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    p.add_argument("--end-window", type=int, default=8, help="train on windows 1..END-1")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    args = p.parse_args(argv)
    try:
        run(args)
    except (BenchError, DataError, RunError) as e:  # e.g. --work already holds runs of these seeds
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
