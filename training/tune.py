"""Small hyper-parameter search for the real-log recipe, selecting on training data only.

    python -m training.tune --data DATA --out best.json [--trials 6] [--seed 0]
    python -m training.train --data DATA --out RUN --config best.json

Every trial is a `training.train` run (the "real" recipe plus the trial's
settings) with evaluation on window t+1 switched off (`evaluate=False`): the
only score a trial gets is, for each training window t, the best NDCG@20 of
its early-stopping epochs on the held-back slice of window t's TRAINING
sessions (`holdout`, 10% by default), averaged over the windows. The
evaluation windows' sessions are never read. The best trial's settings are
written as {"params": {...}, "score": ..., "trials": [...]}, which
`python -m training.train --config FILE` accepts.

The search is a seeded random sample (without repetition) of SPACE: a few
settings that matter for any click log of this size, not a DIGINETICA grid.
Optuna would add a dependency for a search this small; a plain sample is
reproducible and needs none.
"""

from __future__ import annotations

import training.runtime  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

# isort: split
import itertools
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import cli
from training.checkpoint import RunError
from training.cli import help_meta
from training.config import TrainConfig
from training.data.splits import DataError, load_schema
from training.integrity import atomic_write
from training.model.config import MODEL_SETTINGS
from training.recipes import resolve_settings
from training.train import train

# Each key is a setting `training.train --config` accepts; values are the choices sampled.
SPACE: dict[str, list[Any]] = {
    "memory": [True, False],
    "memory_lr": [3e-3, 1e-2, 3e-2],
    "objective": ["clm", "mlm"],
    "lr": [5e-4, 1e-3, 2e-3],
    "weight_decay": [0.0, 0.1],
    "dropout": [0.3, 0.5],
    "label_smoothing": [0.0, 0.1],
    "train_on": ["cumulative", "window"],
}
MODEL_KEYS = MODEL_SETTINGS  # the settable ModelConfig fields: "model" settings of a --config file


@dataclass
class TuneConfig:
    data: str = field(metadata=help_meta("DATA folder written by `python -m training.prepare`"))
    out: str = field(metadata=help_meta("JSON file for the best settings (training.train --config)"))
    trials: int = field(default=6, metadata=help_meta("number of settings sampled from the search space"))
    seed: int = field(default=0, metadata=help_meta("seed of the sample and of every trial"))
    start_window: int = field(default=1, metadata=help_meta("first training window"))
    end_window: int = field(default=8, metadata=help_meta("train on windows start..END-1"))
    holdout: float = field(default=0.1, metadata=help_meta("held-back fraction of each training window"))
    patience: int = field(default=2, metadata=help_meta("early-stopping patience (epochs)"))
    max_epochs: int = field(default=20, metadata=help_meta("max epochs per window"))
    threads: int = field(default=0, metadata=help_meta("torch CPU threads (0 = all cores)"))


def sample_trials(n: int, seed: int, space: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """n distinct settings drawn at random from the grid `space` (all of it if n >= its size)."""
    space = space or SPACE
    keys = list(space)
    grid = [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]
    random.Random(seed).shuffle(grid)
    return grid[: max(1, n)]


def _params(trial: dict[str, Any], cfg: TuneConfig) -> dict[str, Any]:
    """A trial as a --config object: top-level train settings, "model" overrides."""
    out: dict[str, Any] = {k: v for k, v in trial.items() if k not in MODEL_KEYS}
    out["model"] = {k: v for k, v in trial.items() if k in MODEL_KEYS}
    if out["model"].get("objective") == "mlm":
        out["model"].setdefault("mask_prob", 0.3)  # loss on more positions than the reference 0.15
    if "d_model" in out["model"]:
        out["model"].setdefault("embedding_dim", out["model"]["d_model"])  # no head projection
        out["model"].setdefault("d_inner", 4 * out["model"]["d_model"])
    out.update(recipe="real", holdout=cfg.holdout, patience=cfg.patience, epochs=cfg.max_epochs)
    return out


def selection_score(result: dict[str, Any]) -> float:
    """Mean over the trained windows of the best held-back NDCG@20 (training data only)."""
    best = [
        max(r["holdout_ndcg20_per_epoch"]) for r in result["windows"] if r.get("holdout_ndcg20_per_epoch")
    ]
    return float(np.mean(best)) if best else float("-inf")


def tune(cfg: TuneConfig) -> dict[str, Any]:
    schema = load_schema(cfg.data)
    trials = sample_trials(cfg.trials, cfg.seed)
    done: list[dict[str, Any]] = []
    for i, trial in enumerate(trials):
        params = _params(trial, cfg)
        settings = resolve_settings(schema, "real", params)
        with tempfile.TemporaryDirectory(prefix="tune-") as run_dir:
            t0 = time.perf_counter()
            result = train(
                TrainConfig(
                    data=cfg.data,
                    out=run_dir,
                    start_window=cfg.start_window,
                    end_window=cfg.end_window,
                    seed=cfg.seed,
                    threads=cfg.threads,
                    baselines=False,
                    progress=False,
                    evaluate=False,
                    **settings,
                )
            )
        score = selection_score(result)
        done.append({"params": params, "score": score, "seconds": time.perf_counter() - t0})
        print(f"[tune] trial {i + 1}/{len(trials)} held-back ndcg@20={score:.4f} {trial}", file=sys.stderr)
    best = max(done, key=lambda r: r["score"])
    out = {
        "params": best["params"],
        "score": best["score"],
        "selection": "mean over training windows of the best NDCG@20 on a held-back "
        f"{cfg.holdout:.0%} slice of the window's training sessions; evaluation windows never read",
        "data": cfg.data,
        "seed": cfg.seed,
        "trials": done,
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(cfg.out), json.dumps(out, indent=2).encode())
    print(f"[tune] best held-back ndcg@20={best['score']:.4f}: wrote {cfg.out}", file=sys.stderr)
    return out


# one flag per TuneConfig field (training/cli.py); defaults < --config FILE < explicit flags
parse_args = cli.command_line(TuneConfig, "python -m training.tune", __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        tune(cfg)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
