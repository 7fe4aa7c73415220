"""Ways to fit the candidate scorer, compared offline on finished runs' pools (docs/quality.md, thirteenth session).

    python -m bench.scorer_fits RUN [RUN ...] --variants m1 m3 m5 avg3 cos3 --seeds 0 1 2 --out X.json

A run with the scorer keeps its pool of forward sessions in RUN/scorer_pool/: each window's newest training
sessions, scored by the model of the window before, with the scorer's inputs (training/scorer_fit.py). For
every window t whose next window t+1 is pooled too, each variant is fitted on the pool's windows <= t, as
`fit_scorer` fits before window t's evaluation, and scores window t+1's pooled sessions, as the forward
check does. The measure is NDCG@20 pooled over those sessions, against the plain combiner's ranking of the
same slots. Nothing of an evaluation split is read, so a variant may be chosen on it.

Variants: `mK` is the mean of K fits (`--scorer-members K`), `avgK` the same with each fit's weights
averaged over its last half of the steps, `cosK` with a cosine learning-rate decay. A variant's fits are
seeded by the run's window and --seeds, so two variants share their first fits.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training.integrity import atomic_write
from training.model.scorer import FEATURES, CandidateScorer
from training.scorer_fit import MIN_SESSIONS, ScorerState, fit_mlp, fold, load_pool, ndcg_at

VARIANT = re.compile(r"^(m|avg|cos)([1-9])$")
KINDS = {"m": {}, "avg": {"average_tail": 0.5}, "cos": {"cosine": True}}


def parse_variant(name: str) -> tuple[dict[str, Any], int]:
    m = VARIANT.match(name)
    if m is None:
        raise ValueError(f"--variants: {name!r} is not a variant; expected mK, avgK or cosK with K fits (1-9)")
    return KINDS[m.group(1)], int(m.group(2))


def fit_variant(name: str, x, ok, y, hidden: int, seed: int) -> dict[str, Any]:
    kind, k = parse_variant(name)
    return fold([fit_mlp(x, ok, y, hidden, seed * 10 + j, **kind) for j in range(k)])


def run_scores(run: Path, variants: list[str], seeds: list[int], hidden: int) -> dict[str, Any]:
    """One run's pool: per variant, NDCG@20 pooled over the checked sessions (each seed's fits score the
    same sessions), and the plain combiner's."""
    state = ScorerState(pool=load_pool(run))
    if not state.pool:
        raise ValueError(f"{run}: no scorer pool (RUN/scorer_pool/): the run was trained without the scorer")
    width = next(iter(state.pool.values()))[0].shape[2]
    if width != len(FEATURES):  # --scorer-network / --scorer-recent append inputs: not compared here
        raise ValueError(f"{run}: the pool holds {width} inputs per slot, expected {len(FEATURES)} (a run without --scorer-network or --scorer-recent)")
    z = FEATURES.index("z_log_softmax")
    got: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    plain, windows = [], []
    for t in sorted(state.pool):
        x, ok, y = state.sessions(t)
        if t + 1 not in state.pool or len(y) < MIN_SESSIONS:
            continue
        xt, okt, yt = state.pool[t + 1]
        xt = xt.float()
        windows.append(t + 1)
        for s in seeds:
            plain.append(ndcg_at(xt[:, :, z], okt, yt))
            for v in variants:
                fit = fit_variant(v, x, ok, y, hidden, 1000 * t + s)
                got[v].append(ndcg_at(CandidateScorer.mlp((xt - fit["mu"]) / fit["sd"], fit["weights"]), okt, yt))
    if not windows:
        raise ValueError(f"{run}: no window with {MIN_SESSIONS}+ pooled sessions before a pooled next window")
    base = float(torch.cat(plain).mean())
    return {
        "run": str(run),
        "checked_windows": windows,
        "sessions": len(torch.cat(plain)) // len(seeds),
        "plain ndcg@20": base,
        "ndcg@20": {v: float(torch.cat(got[v]).mean()) for v in variants},
        "ratio_to_plain": {v: float(torch.cat(got[v]).mean()) / base if base > 0 else None for v in variants},
    }


def markdown(results: list[dict[str, Any]], variants: list[str]) -> str:
    lines = ["| variant / plain combiner | " + " | ".join(Path(r["run"]).name for r in results) + " |"]
    lines.append("|---|" + "---|" * len(results))
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(f"{r['ratio_to_plain'][v]:.4f}" for r in results) + " |")
    lines.append("| sessions | " + " | ".join(f"{r['sessions']:,}" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scorer_fits", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="finished runs trained with the scorer (RUN/scorer_pool/)")
    p.add_argument("--variants", nargs="+", default=["m1", "m3"], help="mK, avgK, cosK (K fits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--hidden", type=int, default=64, help="each fit's width (--scorer-hidden)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    a = p.parse_args(argv)
    try:
        for v in a.variants:
            parse_variant(v)
        torch.set_num_threads(a.threads)
        t0 = time.time()
        results = []
        for run in a.runs:
            results.append(run_scores(run, a.variants, a.seeds, a.hidden))
            print(f"[scorer_fits] {run}: {json.dumps(results[-1]['ratio_to_plain'])}", file=sys.stderr, flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"variants": a.variants, "seeds": a.seeds, "hidden": a.hidden, "runs": results, "wall_s": time.time() - t0}
    summary["markdown"] = markdown(results, a.variants)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, json.dumps(summary, indent=1).encode())
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
