"""Would recent counts help the candidate scorer? A probe with no network (docs/quality.md, twelfth session).

    python -m bench.scorer_probe --data DATA --model-config RUN --recent 5000 --from-window 4 --out X.json

Every window w >= --from-window: its TRAINING sessions (the forward sessions of the recipe's checks, never
an evaluation split) are featurised with the count tables of the windows before it and ranked among the
count blend's --top best candidates, as the served scorer ranks the combiner's (`training/model/scorer.py`):
the count features, the blend's log-softmax over the candidates and log1p of its rank. Two inputs are
added from the newest --recent training sessions of the windows before w (the last of them whole; a
count of sessions, not of windows, which mean a day on one log and a month on another), and each variant
reads its own columns:

* `base`: the served scorer's inputs;
* `pop_recent`: + each candidate's log1p count in those sessions (`--scorer-recent`, one (V,) table);
* `recent_all`: + every count feature again, from those sessions' own tables.

For each window an MLP of 2 x 64 (`bench.count_scorer`'s) is fitted per variant and seed on the newest
--pool sessions of the windows before it, then scored on it (rolling, as the served scorer is fitted
between windows). NDCG@20 / Recall@20 per window count a target unknown before its window as a miss.
--model-config names a run whose meta.json gives the memory's settings; nothing of its weights is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.count_scorer import Window, feature_norm, fit, forward_splits, score
from training.model.scorer import COUNT_FEATURES, count_features, not_candidates

NB = len(COUNT_FEATURES)
# columns of a probe row: COUNT_FEATURES, the same from the recent tables (pop first), z's two
Z_COLS = [2 * NB, 2 * NB + 1]
VARIANTS = {
    "base": [*range(NB), *Z_COLS],
    "pop_recent": [*range(NB), NB + COUNT_FEATURES.index("log1p_pop"), *Z_COLS],
    "recent_all": [*range(2 * NB), *Z_COLS],
}


def newest_sessions(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The newest `n` sessions of `parts` ((items, lengths) per window, oldest first; rows in time order),
    the last part whole even beyond n."""
    out, left = [], n
    for k, (items, lengths) in enumerate(reversed(parts)):
        if left <= 0:
            break
        take = len(lengths) if k == 0 else min(left, len(lengths))
        out.insert(0, (items[len(items) - take :], lengths[len(lengths) - take :]))
        left -= take
    return out


@torch.no_grad()
def window_rows(mem: Any, rmem: Any, items: Tensor, lengths: Tensor, targets: Tensor, known: int, top: int, d_model: int):
    """One batch: (x (B, top, 2 x NB + 2) half, not-a-candidate (B, top), target column (B,) or -1, the
    blend's scores (B, top), the candidates' ids (B, top)) among the blend's `top` best candidates (ids
    >= `known` are not candidates)."""
    cand = mem.session_candidates(items, lengths)
    x = count_features(mem.pop, *mem._session_view(items, lengths), cand, lengths)
    xr = count_features(rmem.pop, *rmem._session_view(items, lengths), cand, lengths)
    bad = not_candidates(cand) | (cand >= known)
    z = mem.candidate_scores(torch.zeros(len(targets), d_model), items, lengths, cand, None)
    zv, at = z.masked_fill(bad, float("-inf")).topk(min(top, z.shape[1]), 1)
    both = torch.cat([x, xr], 2)
    both = both.gather(1, at[..., None].expand(-1, -1, both.shape[2]))
    ls = torch.log_softmax(zv, 1).nan_to_num(-50.0).clamp(min=-50.0)
    rank = torch.log1p(torch.arange(at.shape[1]).float())[None].expand_as(ls)
    bad, cand = bad.gather(1, at), cand.gather(1, at)
    hit = (cand == targets[:, None]) & ~bad
    y = torch.where(hit.any(1), hit.float().argmax(1), -1)
    x = torch.cat([both, ls[..., None], rank[..., None]], 2).half()
    return x, bad, y, zv.masked_fill(bad, float("-inf")), cand


def forward_windows(data: Path, cfg: Any, recent: int, top: int, batch: int = 256) -> list[Window]:
    """Every window w >= 3 with training sessions, as `window_rows`, with the tables of the windows
    before it and of their newest `recent` sessions."""
    from training.baselines import BaselineCounts, memory_tables
    from training.data.splits import eval_inputs_targets
    from training.evaluate import blend_memory
    from training.schema import Schema

    schema = Schema.load(data)
    item = cfg.item_feature
    V = schema.categorical[item]
    counts = BaselineCounts(V)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    out = []

    def memory(c: BaselineCounts) -> Any:
        return blend_memory({k: torch.from_numpy(v) for k, v in memory_tables(c, cfg.memory_k, cfg.memory_hop2).items()}, cfg)

    for st_prev, w, st, unknown, known in forward_splits(data, schema, item):
        if len(st_prev):
            parts.append((st_prev.feats[item].numpy(), st_prev.lengths.numpy()))
            counts.add_sessions(*parts[-1])
        if st is None:
            continue
        rc = BaselineCounts(V)
        for items, lengths in newest_sessions(parts, recent):
            rc.add_sessions(items, lengths)
        mem, rmem = memory(counts), memory(rc)
        feats, lengths, targets = eval_inputs_targets(st, item)
        win = Window(w, len(targets) + unknown)
        win.cand = []  # type: ignore[attr-defined]  # the slots' ids, for the tests
        for i in range(0, len(targets), batch):
            x, bad, y, blend, cand = window_rows(
                mem, rmem, feats[item][i : i + batch], lengths[i : i + batch], targets[i : i + batch],
                known[item], top, cfg.d_model,
            )  # fmt: skip
            win.x.append(x), win.bad.append(bad), win.y.append(y), win.blend.append(blend), win.cand.append(cand)
        print(f"[scorer_probe] window {w}: {win.sessions} sessions", file=sys.stderr, flush=True)
        out.append(win)
    return out


def newest_windows(windows: list[Window], pool: int) -> list[Window]:
    """The newest windows of `windows` holding `pool` sessions (the oldest of them whole)."""
    keep, n = [], 0
    for win in reversed(windows):
        keep.insert(0, win)
        n += win.sessions
        if n >= pool:
            break
    return keep


def run(data: Path, model_config: Path, recent: int, first: int, seeds: list[int], top: int, pool: int, epochs: int) -> dict[str, Any]:
    from training.model import ModelConfig

    cfg = ModelConfig.from_dict(json.loads((model_config / "meta.json").read_text())["model_config"])
    t0 = time.time()
    windows = forward_windows(data, cfg, recent, top)
    scored = [w for w in windows if w.w >= first]
    if not scored or scored[0] is windows[0]:
        raise SystemExit(
            f"error: --from-window {first} must leave forward windows before it and from it (forward windows "
            f"{[w.w for w in windows]})"
        )
    result: dict[str, Any] = {
        "data": str(data), "recent_sessions": recent, "top": top, "pool": pool, "seeds": seeds,
        "sessions": {w.w: w.sessions for w in windows}, "variants": {v: {} for v in VARIANTS},
    }  # fmt: skip
    for win in scored:
        train = newest_windows([w for w in windows if w.w < win.w], pool)
        norm = feature_norm([x for w in train for x in w.x])
        line = {}
        for name, cols in VARIANTS.items():
            per_seed = []
            for seed in seeds:
                m = fit("mlp", train, norm, seed, epochs, cols)
                got = score([win], lambda x, blend, m=m, c=cols, mu=norm[0], sd=norm[1]: m((x[..., c].float() - mu[c]) / sd[c]).squeeze(2))
                per_seed.append(got[win.w])
            result["variants"][name][win.w] = per_seed
            line[name] = float(np.mean([r["ndcg@20"] for r in per_seed]))
        print(f"[scorer_probe] window {win.w}: NDCG@20 " + ", ".join(f"{k} {v:.4f}" for k, v in line.items()), file=sys.stderr, flush=True)
    base = result["variants"]["base"]
    for name, per_window in result["variants"].items():
        entry = {}
        for k in ("ndcg@20", "recall@20"):
            mean = float(np.mean([r[k] for rows in per_window.values() for r in rows]))
            ref = float(np.mean([r[k] for rows in base.values() for r in rows]))
            entry[k], entry[f"{k}_vs_base"] = mean, mean / ref if ref else None
        result[name] = entry
    result["wall_s"] = time.time() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scorer_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="DATA folder of `python -m training.prepare`")
    p.add_argument("--model-config", type=Path, required=True, help="a RUN whose meta.json gives the memory's settings")
    p.add_argument("--recent", type=int, default=5000, help="the newest this many training sessions make the recent tables")
    p.add_argument("--from-window", type=int, default=4, help="score the forward sessions of windows >= this")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--top", type=int, default=128, help="the blend's best candidates re-ranked (the scorer's --scorer-top)")
    p.add_argument("--pool", type=int, default=40_000, help="each fit reads the newest windows holding this many sessions")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    a = p.parse_args(argv)
    if a.recent < 1 or a.top < 1 or a.pool < 1:
        p.error(f"--recent, --top and --pool must be >= 1, got {a.recent}, {a.top}, {a.pool}")
    torch.set_num_threads(a.threads)
    result = run(a.data, a.model_config, a.recent, a.from_window, a.seeds, a.top, a.pool, a.epochs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for name in VARIANTS:
        e = result[name]
        print(
            f"{name:10s} NDCG@20 {e['ndcg@20']:.4f} ({e['ndcg@20_vs_base']:.3f}x base)  "
            f"Recall@20 {e['recall@20']:.4f} ({e['recall@20_vs_base']:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
