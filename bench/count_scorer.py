"""How far a learned scorer over the item memory's count features gets, with no network (a probe).

    python -m bench.count_scorer --data DATA --model-config RUN --fit-last 14 --out count_scorer.json

Every session of window w's TRAINING split (w >= 3) is scored with the count tables of the windows
before it (`memory_tables` of windows < w, as the model's item memory holds them after window w-1) and
ranked among the item memory's re-ranking candidates (`ItemMemory.session_candidates`): the forward
sessions of the recipe's checks, never an evaluation split. Each candidate gets the count features the
combiner reads (per distance bin of the context position, 0, 1, 2, 3-5, 6+: the summed log1p
co-occurrence counts, how many context items co-occur with it, how often it is in the context; the
last item's log1p successor count; log1p popularity; the session's log1p length). Scorers are fitted
(softmax cross-entropy over the candidates) on the sessions of windows <= --fit-last and scored on the
later ones:

* `blend`: the count blend (the item memory's combiner at its initial values) re-ranking the same
  candidates, nothing fitted (the evaluation's `count_blend` ranks the whole catalogue instead, where
  items outside the candidates can outrank a target or be hit by popularity alone: within 1 % of it on
  DIGINETICA's window 8);
* `linear`: one weight per feature, the same for every session;
* `mlp`: two hidden layers of 64 over the same features (interactions between them).

NDCG@20 / Recall@20 per window count a target unknown before its window as a miss, as the evaluation
does. --model-config names a run whose meta.json gives the memory's settings (memory_k, memory_hop2,
max_len); nothing of its weights is read. The JSON holds every window's figures per method and seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model.scorer import COUNT_FEATURES, count_features, not_candidates

FEATURES = COUNT_FEATURES  # the served scorer's count features (training/model/scorer.py)
METHODS = ("linear", "mlp")


@torch.no_grad()
def candidate_features(mem: Any, items: Tensor, lengths: Tensor, known: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L) sessions -> (features (B, C, len(FEATURES)), not-a-candidate (B, C) bool, candidates (B, C))
    with `mem` (an ItemMemory holding the tables of the whole vocabulary); ids >= `known` (not known yet:
    the served model's tables do not hold them) are not candidates."""
    cand = mem.session_candidates(items, lengths)
    context, lists = mem._session_view(items, lengths)
    return count_features(mem.pop, context, lists, cand, lengths), not_candidates(cand) | (cand >= known), cand


class Window:
    """One window's forward sessions as batches: features (half), masks, target columns (-1: not a
    candidate), the count blend's scores, and the number of sessions (unknown targets included)."""

    def __init__(self, w: int, sessions: int):
        self.w, self.sessions = w, sessions
        self.x: list[Tensor] = []
        self.bad: list[Tensor] = []
        self.y: list[Tensor] = []
        self.blend: list[Tensor] = []


def forward_splits(data: Path, schema: Any, item: str) -> Iterator[tuple[Any, int, Any, int, dict[str, int]]]:
    """For each window w after the first, in order: (window w-1's training split as stored, w, w's
    training sessions whose target is known after w-1 or None where w < 3 or w has none, how many
    were left out, the known sizes after w-1). Every earlier split comes before a window's sessions."""
    from training.data.splits import load_split, split_path
    from training.evaluate import known_inputs

    st = None  # the window read last: the next window's "before" (each split is read once)
    for prev, w in zip(schema.windows, schema.windows[1:]):
        st_prev = st if st is not None else load_split(split_path(data, prev, "train"), schema)
        st = load_split(split_path(data, w, "train"), schema)
        if w < 3 or not len(st):
            yield st_prev, w, None, 0, {}
            continue
        known = schema.known_sizes(prev)
        seen, unknown = known_inputs(st, known, item)
        yield st_prev, w, seen.select((~unknown).nonzero().squeeze(1)), int(unknown.sum()), known


def forward_windows(data: Path, cfg: Any, batch: int = 256) -> list[Window]:
    """Every window w >= 3 with training sessions, featurised with the tables of the windows before it."""
    from training.baselines import BaselineCounts, memory_tables
    from training.data.splits import eval_inputs_targets
    from training.evaluate import blend_memory
    from training.schema import Schema

    schema = Schema.load(data)
    item = cfg.item_feature
    counts = BaselineCounts(schema.categorical[item])
    out = []
    for st_prev, w, st, unknown, known in forward_splits(data, schema, item):
        if len(st_prev):
            counts.add_sessions(st_prev.feats[item].numpy(), st_prev.lengths.numpy())
        if st is None:
            continue
        tables = {
            k: torch.from_numpy(v) for k, v in memory_tables(counts, cfg.memory_k, cfg.memory_hop2).items()
        }
        mem = blend_memory(tables, cfg)
        feats, lengths, targets = eval_inputs_targets(st, item)
        win = Window(w, len(targets) + unknown)
        for i in range(0, len(targets), batch):
            items, n, t = feats[item][i : i + batch], lengths[i : i + batch], targets[i : i + batch]
            x, bad, cand = candidate_features(mem, items, n, known[item])
            hit = (cand == t[:, None]) & ~bad
            with torch.no_grad():
                blend = mem.candidate_scores(torch.zeros(len(t), cfg.d_model), items, n, cand, None)
            (
                win.x.append(x.half()),
                win.bad.append(bad),
                win.y.append(torch.where(hit.any(1), hit.float().argmax(1), -1)),
            )
            win.blend.append(blend.masked_fill(bad, float("-inf")))
        share = float(torch.cat(win.y).ge(0).float().sum()) / max(win.sessions, 1)
        print(
            f"[count_scorer] window {w}: {win.sessions} sessions, target a candidate in {share:.3f}",
            file=sys.stderr,
        )
        out.append(win)
    return out


def metrics(scores: Tensor, bad: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per session NDCG@20 and Recall@20 of the target column y (-1: a miss), pessimistic ties (the
    served scorer's forward check, `training.scorer_fit.ndcg_at`: a hit is a positive NDCG)."""
    from training.scorer_fit import ndcg_at

    nd = ndcg_at(scores, ~bad, y)
    return nd, (nd > 0).float()


def scorer(method: str, n_features: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if method == "linear":
        return nn.Linear(n_features, 1)
    return nn.Sequential(nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def fit(
    method: str,
    windows: list[Window],
    norm: tuple[Tensor, Tensor],
    seed: int,
    epochs: int,
    cols: list[int] | None = None,
) -> nn.Module:
    """The scorer fitted by softmax cross-entropy over each session's candidates (targets outside them
    left out), Adam 3e-3, batches in a seeded random order; cols: the features it reads (default: all,
    `FEATURES`; `norm` covers every column of x)."""
    cols = list(range(len(FEATURES))) if cols is None else cols
    mu, sd = norm[0][cols], norm[1][cols]
    m = scorer(method, len(cols), seed)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    batches = [(x, b, y) for win in windows for x, b, y in zip(win.x, win.bad, win.y)]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for k in torch.randperm(len(batches), generator=g).tolist():
            x, bad, y = batches[k]
            ok = y >= 0
            if not ok.any():
                continue
            s = m((x[ok][..., cols].float() - mu) / sd).squeeze(2).masked_fill(bad[ok], float("-inf"))
            loss = F.cross_entropy(s, y[ok])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


def score(windows: list[Window], fn) -> dict[int, dict[str, float]]:
    """{window: {"ndcg@20", "recall@20"}} of scores fn(x, blend) -> (B, C), over every session."""
    out = {}
    for win in windows:
        nd = rc = 0.0
        with torch.no_grad():
            for x, bad, y, blend in zip(win.x, win.bad, win.y, win.blend):
                n, r = metrics(fn(x, blend), bad, y)
                nd, rc = nd + float(n.sum()), rc + float(r.sum())
        out[win.w] = {"ndcg@20": nd / win.sessions, "recall@20": rc / win.sessions}
    return out


def feature_norm(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The features' mean and standard deviation over every candidate of `batches` ((B, C, F) each),
    summed batch by batch in float64 (one float32 copy of them all would be ~4 GB on NowPlaying1M)."""
    width = batches[0].shape[-1]
    n, s1, s2 = 0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    for x in batches:
        x = x.reshape(-1, width).double()
        n, s1, s2 = n + x.shape[0], s1 + x.sum(0), s2 + (x * x).sum(0)
    mean = s1 / n
    sd = ((s2 - n * mean * mean) / max(n - 1, 1)).clamp(min=0).sqrt()
    return mean.float(), sd.float() + 1e-6


def run(data: Path, model_config: Path, fit_last: int, seeds: list[int], epochs: int) -> dict[str, Any]:
    from training.model import ModelConfig

    cfg = ModelConfig.from_dict(json.loads((model_config / "meta.json").read_text())["model_config"])
    t0 = time.time()
    windows = forward_windows(data, cfg)
    train = [w for w in windows if w.w <= fit_last]
    held = [w for w in windows if w.w > fit_last]
    if not train or not held:
        raise SystemExit(
            f"error: --fit-last {fit_last} must leave windows on both sides (forward windows "
            f"{[w.w for w in windows]})"
        )
    norm = feature_norm([x for w in train for x in w.x])
    result: dict[str, Any] = {
        "data": str(data), "features": FEATURES, "fit_windows": [w.w for w in train],
        "scored_windows": [w.w for w in held], "sessions": {w.w: w.sessions for w in windows},
        "methods": {"blend": {"windows": score(held, lambda x, blend: blend)}},
    }  # fmt: skip
    for method in METHODS:
        for seed in seeds:
            m = fit(method, train, norm, seed, epochs)
            result["methods"][f"{method}_s{seed}"] = {
                "windows": score(held, lambda x, blend, m=m: m((x.float() - norm[0]) / norm[1]).squeeze(2))
            }
    base = result["methods"]["blend"]
    for entry in result["methods"].values():
        for k in ("ndcg@20", "recall@20"):
            entry[k] = float(np.mean([v[k] for v in entry["windows"].values()]))
            entry[f"{k}_vs_blend"] = entry[k] / base[k] if base[k] else None
    result["wall_s"] = time.time() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.count_scorer", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="DATA folder of `python -m training.prepare`")
    p.add_argument(
        "--model-config", type=Path, required=True, help="a RUN whose meta.json gives the memory's settings"
    )
    p.add_argument("--fit-last", type=int, required=True, help="fit on windows <= this, score the later ones")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = run(a.data, a.model_config, a.fit_last, a.seeds, a.epochs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for name, entry in result["methods"].items():
        print(
            f"{name:10s} NDCG@20 {entry['ndcg@20']:.4f} ({entry['ndcg@20_vs_blend']:.3f}x the blend)  "
            f"Recall@20 {entry['recall@20']:.4f} ({entry['recall@20_vs_blend']:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
