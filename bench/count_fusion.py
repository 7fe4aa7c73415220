"""What one more count term adds to the count blend, at fixed weights (issue 17; no network, no training).

The count blend is the item memory untrained (training/evaluate.py `count_blend_ranks`): the recipe's
count tables of every training session of windows <= t, scored with the combiner's initial weights.
This adds a term to its scores, score = blend + alpha * term, for each alpha, and evaluates every
window t+1 of the split as the training protocol does (only the ids known after window t; a target
unknown then is a miss). Terms:

    vsknn      V-SKNN's item scores (training/baselines.py, the baseline's own neighbours) over their
               row maximum, in [0, 1]: what a session-kNN term in the item memory would bring
    recent_R   the blend of the counts of the last R training windows only (windows t-R+1..t):
               recent co-listening and popularity beside the counts of the whole history
    decay_G    not added but in place of the blend: the blend of counts in which window w's sessions
               weigh G ** (t - w) (G in (0, 1]; decay_1 is the blend), reported once, as decay_G@0:
               recency inside the tables themselves, the count blend of a model
               trained with --memory-window-decay G (tested)

A gate the model learns per session starts from such a fixed mix; a term that adds little at its best
fixed weight on held-out sessions is a weak candidate for the memory. Choose on `valid`.

    python -m bench.count_fusion --data DATA --out fusion.json [--terms vsknn recent_3] [--end-window 19]

The count tables are those of the recipe the data selects (`--train-flags` adds training.train flags:
memory k, two-hop fill, ...); window t+1's blend equals the `count_blend` a training run reports for
it (tested).
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

from training import config
from training.baselines import BaselineCounts, memory_tables
from training.data.splits import available_windows, eval_inputs_targets, load_schema, load_split, split_path
from training.evaluate import blend_memory, known_inputs
from training.history import WindowHistory
from training.integrity import atomic_write
from training.metrics import metrics_from_ranks, pessimistic_ranks
from training.model import ItemMemory, ModelConfig
from training.names import AGE_COL, FIRST_REAL_ID, list_col
from training.schema import Schema

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0)
BLEND = "blend"  # the count blend alone: every ratio's reference
METRICS = ("ndcg@20", "recall@20")


def parse_term(name: str) -> tuple[str, float]:
    """'vsknn' -> ('vsknn', 0); 'recent_R' -> ('recent', R >= 1); 'decay_G' -> ('decay', G in (0, 1]);
    anything else: ValueError."""
    if name == "vsknn":
        return name, 0
    kind, _, r = name.partition("_")
    if kind == "recent" and r.isdigit() and int(r) >= 1:
        return kind, int(r)
    if kind == "decay":
        try:
            g = float(r)
        except ValueError:
            g = -1.0
        if 0 < g <= 1:
            return kind, g
    raise ValueError(
        f"term {name!r}: expected 'vsknn', 'recent_R' with R >= 1 windows or 'decay_G' with 0 < G <= 1"
    )


def _memory(tables: dict[str, np.ndarray], V: int, cfg: ModelConfig) -> ItemMemory:
    """The count blend (`blend_memory`) holding the first V rows of `tables`."""
    return blend_memory({k: torch.from_numpy(v[:V]) for k, v in tables.items()}, cfg)


@torch.no_grad()
def fuse_window(
    blend: ItemMemory,
    terms: dict[str, Any],
    items: Tensor,
    lengths: Tensor,
    targets: Tensor,
    known: int,
    d_model: int,
    alphas: tuple[float, ...],
    *,
    batch: int = 256,
) -> dict[str, Tensor]:
    """Ranks of the targets under blend + alpha * term, for every term and alpha: {'term@alpha': (N,)},
    and under the blend alone ({BLEND: (N,)}).
    terms: name -> an ItemMemory (recent_R) or a BaselineCounts (vsknn)."""
    out: dict[str, list[Tensor]] = {}
    for i in range(0, len(targets), batch):
        it, ln, tg = items[i : i + batch], lengths[i : i + batch], targets[i : i + batch]
        h = torch.zeros(len(ln), d_model)  # the untrained gates do not read h
        base = blend.next_item_scores(h, it, ln)
        V = base.shape[1]
        plain = base.clone()
        plain[:, :FIRST_REAL_ID] = float("-inf")
        plain[:, known:] = float("-inf")
        out.setdefault(BLEND, []).append(pessimistic_ranks(plain, tg))
        for name, src in terms.items():
            if isinstance(src, tuple):  # ("replace", ItemMemory): in place of the blend, alpha unused
                s = src[1].next_item_scores(h, it, ln)
                s[:, :FIRST_REAL_ID] = float("-inf")
                s[:, known:] = float("-inf")
                out.setdefault(f"{name}@0", []).append(pessimistic_ranks(s, tg))  # once: no alpha
                continue
            if isinstance(src, ItemMemory):
                add = src.next_item_scores(h, it, ln)
            else:
                raw = src.vsknn_scores(it.numpy(), ln.numpy()).toarray()[:, :V]
                top = raw.max(1, keepdims=True)
                add = torch.from_numpy(raw / np.where(top > 0, top, 1.0)).float()
            for a in alphas:
                s = base + a * add if a else base.clone()
                s[:, :FIRST_REAL_ID] = float("-inf")
                s[:, known:] = float("-inf")
                out.setdefault(f"{name}@{a:g}", []).append(pessimistic_ranks(s, tg))
    return {k: torch.cat(v) for k, v in out.items()}


def run(
    data: Path,
    term_names: list[str],
    alphas: tuple[float, ...],
    split: str = "valid",
    start_window: int | None = None,
    end_window: int | None = None,
    recipe_args: list[str] | None = None,
) -> dict[str, Any]:
    """Every evaluated window's metrics for every term and alpha, and their mean over windows."""
    for n in term_names:
        parse_term(n)
    if any(a < 0 for a in alphas):
        raise ValueError(f"alphas {list(alphas)}: expected weights >= 0")
    cfg = config.parse_args(["--data", str(data), "--out", "-", *(recipe_args or [])], "count_fusion", "")
    schema = load_schema(data)
    vocab = Schema.of(schema)
    mcfg = cfg.model.with_schema(schema)
    if not mcfg.memory:
        raise ValueError("count_fusion: the recipe has no item memory (--memory): there is no count blend")
    item, n_all = mcfg.item_feature, mcfg.n_items
    age = list_col(AGE_COL)
    age_f = age if age in mcfg.continuous and AGE_COL not in vocab.raw_inputs else None
    windows = available_windows(data, schema)
    first = cfg.start_window if start_window is None else start_window
    end = cfg.end_window if end_window is None else end_window
    history = WindowHistory(data, schema, item, age_f, n_all)  # the Trainer's counting (decay per call)
    vsknn_counts = BaselineCounts(n_all)  # as the Trainer's baselines: each window added as known then
    for w in windows:
        if w < first:
            st = history.raw(w)  # as stored, as the Trainer counts them
            if len(st):
                vsknn_counts.add_sessions(st.feats[item].numpy(), st.lengths.numpy())
    rows = []
    for t in [w for w in windows if first <= w < end]:
        t0 = time.perf_counter()
        known = vocab.known_sizes(t)
        now = history.known(history.raw(t), known)
        if len(now):
            vsknn_counts.add_sessions(now.feats[item].numpy(), now.lengths.numpy())
        eval_path = split_path(data, t + 1, split)
        if not eval_path.exists():
            continue
        ev = load_split(eval_path, schema)
        if len(ev) == 0:
            continue
        upto = [w for w in windows if w <= t]
        if not any(len(history.raw(w)) for w in upto):  # nothing counted yet: no blend to add to
            continue
        V = max(known[item], FIRST_REAL_ID + 1)

        def memory(ws: list[int], decay: float = 1.0) -> ItemMemory:
            counts = history.counts_of(ws, t, known, decay)  # noqa: B023 (used at once)
            return _memory(memory_tables(counts, mcfg.memory_k, mcfg.memory_hop2), V, mcfg)  # noqa: B023

        blend = memory(upto)
        terms: dict[str, Any] = {}
        for n in term_names:
            kind, r = parse_term(n)
            if kind == "vsknn":
                terms[n] = vsknn_counts
            elif kind == "recent":
                terms[n] = memory([w for w in upto if w > t - r])
            else:
                terms[n] = ("replace", memory(upto, r))
        st, miss = known_inputs(ev, known, item, age_f)
        feats, lengths, targets = eval_inputs_targets(st, item)
        ranks = fuse_window(blend, terms, feats[item], lengths, targets, known[item], mcfg.d_model, alphas)
        row: dict[str, Any] = {"eval_window": t + 1, "sessions": len(targets)}
        for k, r in ranks.items():
            m = metrics_from_ranks(r.masked_fill(miss, float("inf")))
            row[k] = {x: m[x] for x in METRICS}
        rows.append(row)
        base = row[BLEND]
        best = max((k for k in ranks), key=lambda k: row[k]["ndcg@20"])
        print(
            f"[count_fusion] window {t + 1}: {len(targets)} sessions, blend NDCG@20 {base['ndcg@20']:.4f}, "
            f"best {best} {row[best]['ndcg@20']:.4f} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if not rows:
        raise ValueError(
            f"count_fusion: no window in [{first}, {end}) has a non-empty {split} split after it"
        )
    keys = [k for k in rows[0] if k == BLEND or "@" in k]
    mean = {k: {x: float(np.mean([r[k][x] for r in rows])) for x in METRICS} for k in keys}
    ref = mean[BLEND]
    ratio = {k: {x: v[x] / ref[x] if ref[x] > 0 else None for x in METRICS} for k, v in mean.items()}
    return {"data": str(data), "split": split, "alphas": list(alphas), "terms": term_names,
            "windows": rows, "mean": mean, "ratio_to_blend": ratio}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.count_fusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the JSON written")
    p.add_argument(
        "--terms", nargs="+", default=["vsknn", "recent_3"], help="vsknn, recent_R (R windows), decay_G"
    )
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--start-window", type=int)
    p.add_argument("--end-window", type=int)
    p.add_argument(
        "--train-flags",
        default="",
        help="training.train flags whose memory settings apply (e.g. '--recipe real')",
    )
    a = p.parse_args(argv)
    try:
        res = run(
            a.data, a.terms, tuple(a.alphas), a.split, a.start_window, a.end_window, a.train_flags.split()
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write(a.out, (json.dumps(res, indent=1) + "\n").encode())
    print(f"{'term@alpha':<16} {'NDCG@20':>8} {'Recall@20':>9}   x blend")
    for k, v in res["mean"].items():
        r = res["ratio_to_blend"][k]
        print(
            f"{k:<16} {v['ndcg@20']:8.4f} {v['recall@20']:9.4f}   {r['ndcg@20']:.3f} / {r['recall@20']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
