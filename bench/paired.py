"""Paired bootstrap of the model against a baseline, session by session, over runs trained with
`--save-ranks` (their OUT/ranks/window_T.npz; `make bench-quality` writes them).

The statistic is the protocol's (docs/quality.md): per seed, each evaluation window's mean metric,
averaged over the windows; then the mean over seeds. Also the pooled one (every session weighted
alike). A resample draws each window's sessions with replacement, the same draw for the model and
the baseline and for every seed (the seeds score the same sessions), and recomputes both: the
intervals of model / baseline and model - baseline are percentiles of the resamples, and
`p_below` is the share of resamples in which the model scores below the baseline.

    python -m bench.paired RUN [RUN ...] [--against count_blend] [--out X.json] [--by-repeat DATA]

--by-repeat DATA also splits the sessions by whether the target repeats an item of its session
(repeat consumption), pooled: where model and baseline differ. --by-frequency DATA splits them by
how often the target occurs in the training sessions before its window: where the network pays.

--reach K [K ...] also gives every saved method's Recall@K at each cutoff, pooled over windows and
runs, and the share of targets it ranks at all (a finite rank): how far down each method's list
the targets are, and the ceiling a re-ranking model's candidates put on its recall.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from training.integrity import atomic_write
from training.metrics import per_session
from training.names import RANKS_DIR

DEFAULT_METRICS = ("ndcg@20", "recall@20", "mrr@20")


class PairedError(ValueError):
    pass


def load_windows(run: Path) -> dict[int, dict[str, np.ndarray]]:
    """{evaluation window: {method: (N,) ranks, "session_id": (N,)}} of one run."""
    files = sorted((run / RANKS_DIR).glob("window_*.npz"))
    if not files:
        raise PairedError(f"{run}: no {RANKS_DIR}/window_*.npz (train with --save-ranks)")
    out = {}
    for f in files:
        with np.load(f) as z:
            out[int(f.stem.split("_")[1])] = {k: z[k] for k in z.files}
    return out


def _common(loaded: list[dict[int, Any]], runs: list[Path], windows: list[int] | None) -> list[int]:
    """The evaluation windows every run has; `windows` (None: all of them) must all be there."""
    common = sorted(set.intersection(*(set(w) for w in loaded)))
    if windows is not None:
        missing = sorted(set(windows) - set(common))
        if missing:
            raise PairedError(
                f"windows {missing} asked for are not in every run's ranks ({[str(r) for r in runs]})"
            )
        common = [w for w in common if w in set(windows)]
    if not common:
        raise PairedError(f"no evaluation window common to {len(runs)} runs")
    return common


def repeat_targets(data: Path, split: str, window: int, session_id: np.ndarray) -> np.ndarray:
    """(N,) bool, in `session_id`'s order: the session's target (its last item) is an item that
    occurs earlier in the same session (repeat consumption), from DATA's `split` of `window`."""
    from training.data.splits import load_schema, load_split, split_path

    schema = load_schema(data)
    st = load_split(split_path(data, window, split), schema)
    items, lengths = st.feats[schema["item_list"]].numpy(), st.lengths.numpy()
    if not np.array_equal(st.session_id.numpy(), session_id):
        raise PairedError(f"{split_path(data, window, split)} holds other sessions than the saved ranks")
    last = items[np.arange(len(lengths)), lengths - 1]
    before = np.arange(items.shape[1])[None, :] < (lengths - 1)[:, None]
    return ((items == last[:, None]) & before).any(1)


def target_frequency(data: Path, split: str, window: int, session_id: np.ndarray) -> np.ndarray:
    """(N,) int, in `session_id`'s order: how often the session's target (its last item) occurs in
    the training sessions of windows <= window - 1, the sessions the counts and the network had."""
    from training.data.splits import available_windows, load_schema, load_split, split_path

    schema = load_schema(data)
    item = schema["item_list"]
    st = load_split(split_path(data, window, split), schema)
    if not np.array_equal(st.session_id.numpy(), session_id):
        raise PairedError(f"{split_path(data, window, split)} holds other sessions than the saved ranks")
    lengths = st.lengths.numpy()
    target = st.feats[item].numpy()[np.arange(len(lengths)), lengths - 1]
    counts = np.zeros(int(target.max()) + 1, dtype=np.int64)
    for w in available_windows(data, schema):
        if w >= window:
            continue
        tr = load_split(split_path(data, w, "train"), schema)
        ids = tr.feats[item].numpy()[np.arange(tr.feats[item].shape[1])[None, :] < tr.lengths.numpy()[:, None]]
        ids = ids[ids < len(counts)]
        counts += np.bincount(ids, minlength=len(counts))
    return counts[target]


FREQUENCY_GROUPS = ((0, 0), (1, 4), (5, 19), (20, 99), (100, None))  # occurrences in training, inclusive


def _frequency_group(n: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) occurrences -> {"0": mask, "1-4": mask, ..., "100+": mask} (`FREQUENCY_GROUPS`)."""
    out = {}
    for lo, hi in FREQUENCY_GROUPS:
        name = f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"
        out[name] = (n >= lo) & (n <= (np.inf if hi is None else hi))
    return out


def by_group(
    runs: list[Path],
    groups_of,
    against: str = "count_blend",
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    windows: list[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per metric, model and baseline pooled over each group of sessions (the runs' common windows,
    or `windows`): groups_of(window, session_id) -> {group: (N,) bool}, the groups in order."""
    loaded = [load_windows(Path(r)) for r in runs]
    common = _common(loaded, runs, windows)
    sums: dict[str, dict[str, dict[str, float]]] = {m: {} for m in metrics}
    for w in common:
        groups = groups_of(w, loaded[0][w]["session_id"])
        for wins in loaded:
            for m in metrics:
                vals = {k: per_session(wins[w][k], m) for k in ("model", against)}
                for g, mask in groups.items():
                    acc = sums[m].setdefault(g, {"sessions": 0, "model": 0.0, against: 0.0})
                    acc["sessions"] += int(mask.sum())
                    for k, v in vals.items():
                        acc[k] += float(v[mask].sum())
    out = {}
    for m in metrics:
        total = max(1, sum(x["sessions"] for x in sums[m].values()))
        res: dict[str, Any] = {"metric": m, "against": against, "windows": common, "runs": len(runs)}
        for g, v in sums[m].items():
            n = max(1, v["sessions"])
            res[g] = {
                "share": v["sessions"] / total,
                "model": v["model"] / n,
                against: v[against] / n,
                "ratio": v["model"] / v[against] if v[against] > 0 else None,
            }
        out[m] = res
    return out


def _repeat_groups(data: Path, split: str, window: int, session_id: np.ndarray) -> dict[str, np.ndarray]:
    rep = repeat_targets(data, split, window, session_id)
    return {"repeat": rep, "new": ~rep}


def _frequency_groups(data: Path, split: str, window: int, session_id: np.ndarray) -> dict[str, np.ndarray]:
    return _frequency_group(target_frequency(data, split, window, session_id))


# --by-repeat: the sessions whose target repeats an item of the session, and the others (where model
# and baseline differ); --by-frequency: grouped by how often the target occurs in the training sessions
# before its window (`FREQUENCY_GROUPS`: whether the lead grows with the evidence about the item)
SPLITS = {"by_repeat": _repeat_groups, "by_frequency": _frequency_groups}


def split_sessions(
    kind: str,
    runs: list[Path],
    data: Path,
    split: str,
    against: str = "count_blend",
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    windows: list[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per metric, model and baseline pooled over each group of sessions of `SPLITS[kind]`, read
    from DATA's `split` of each of the runs' common windows (or `windows`)."""
    groups = SPLITS[kind]
    return by_group(runs, lambda w, sid: groups(data, split, w, sid), against, metrics, windows)


def reach(runs: list[Path], cutoffs: list[int], windows: list[int]) -> dict[str, dict[str, float]]:
    """{method: {"recall@K": share of targets ranked <= K, ..., "ranked": share with a finite rank}}
    pooled over `windows` and `runs`, for every method the ranks files hold."""
    ranks: dict[str, list[np.ndarray]] = {}
    for run in runs:
        wins = load_windows(Path(run))
        for w in windows:
            for k, v in wins[w].items():
                if k != "session_id":
                    ranks.setdefault(k, []).append(v)
    out = {}
    for k, parts in ranks.items():
        r = np.concatenate(parts)
        out[k] = {
            **{f"recall@{c}": float((r <= c).mean()) for c in cutoffs},
            "ranked": float(np.isfinite(r).mean()),
        }
    return out


def paired(
    runs: list[Path],
    against: str = "count_blend",
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    resamples: int = 2000,
    seed: int = 0,
    windows: list[int] | None = None,
) -> dict[str, Any]:
    """The paired bootstrap of `runs` (one per seed, the same evaluation sessions) for each metric."""
    loaded = [load_windows(Path(r)) for r in runs]
    common = _common(loaded, runs, windows)
    for w in common:
        ids = loaded[0][w]["session_id"]
        for run, wins in zip(runs, loaded):
            if against not in wins[w]:
                raise PairedError(f"{run}: window {w} has no ranks of {against!r} (have {sorted(wins[w])})")
            if not np.array_equal(wins[w]["session_id"], ids):
                raise PairedError(f"{run}: window {w} scores other sessions than {runs[0]}")
    sizes = np.array([len(loaded[0][w]["session_id"]) for w in common], dtype=np.float64)
    out: dict[str, Any] = {
        "runs": [str(r) for r in runs],
        "against": against,
        "windows": common,
        "sessions": int(sizes.sum()),
        "resamples": resamples,
        "metrics": {},
    }
    methods = ("model", against)
    # (metric, method) -> (seeds, windows) point means and (seeds, windows, resamples) resampled ones;
    # one window's draws at a time (resamples x its sessions), the same for every run, method and metric
    point = {(m, k): np.zeros((len(runs), len(common))) for m in metrics for k in methods}
    boot = {(m, k): np.zeros((len(runs), len(common), resamples)) for m in metrics for k in methods}
    gen = np.random.default_rng(seed)
    for j, w in enumerate(common):
        n = len(loaded[0][w]["session_id"])
        draw = gen.integers(0, n, (resamples, n))  # (resamples, n) session indices
        flat = (np.arange(resamples)[:, None] * n + draw).ravel()
        counts = (
            np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)
        )  # draws of each
        del draw, flat
        for i, wins in enumerate(loaded):
            for m in metrics:
                for k in methods:
                    v = per_session(wins[w][k], m)
                    point[m, k][i, j] = v.mean()
                    boot[m, k][i, j] = counts @ v / n
    for m in metrics:
        res = {}
        for name, weights in (("window_mean", np.ones_like(sizes)), ("pooled", sizes)):
            wt = weights / weights.sum()
            est = {k: float((point[m, k] @ wt).mean()) for k in methods}  # over windows, then seeds
            bs = {k: np.einsum("swr,w->r", boot[m, k], wt) / len(runs) for k in methods}
            ratio, diff = bs["model"] / bs[against], bs["model"] - bs[against]
            res[name] = {
                "model": est["model"],
                against: est[against],
                "ratio": est["model"] / est[against] if est[against] > 0 else None,
                "ratio_ci95": [float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))],
                "diff": est["model"] - est[against],
                "diff_ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                "p_below": float((diff < 0).mean()),
            }
        out["metrics"][m] = res
    return out


def markdown(result: dict[str, Any]) -> str:
    b = result["against"]
    lines = [
        f"Paired bootstrap, model against {b}: {len(result['runs'])} run(s), windows {result['windows'][0]}.."
        f"{result['windows'][-1]}, {result['sessions']} sessions, {result['resamples']} resamples",
        "",
        "| metric | statistic | model | " + b + " | model / " + b + " (95% interval) | P(model below) |",
        "|---|---|---|---|---|---|",
    ]
    for m, res in result["metrics"].items():
        for name, r in res.items():
            lo, hi = r["ratio_ci95"]
            ratio = f"{r['ratio']:.3f}x ({lo:.3f}-{hi:.3f})" if r["ratio"] is not None else "-"
            lines.append(f"| {m} | {name} | {r['model']:.4f} | {r[b]:.4f} | {ratio} | {r['p_below']:.3f} |")
    return "\n".join(lines)


def group_table(split: dict[str, dict[str, Any]], against: str, what: str) -> str:
    """A markdown table of `by_group`'s result: one row per group, model / baseline per metric."""
    metrics = list(split)
    # the groups that hold sessions (a small log may have no target seen 100 times)
    groups = [g for g, r in split[metrics[0]].items() if isinstance(r, dict) and r["share"] > 0]
    head = f"| {what} | share of sessions | " + " | ".join(
        f"model {m} | {against} {m} | ratio" for m in metrics
    ) + " |"
    lines = [head, "|---" * (2 + 3 * len(metrics)) + "|"]
    for g in groups:
        cells = []
        for m in metrics:
            r = split[m][g]
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"
            cells += [f"{r['model']:.4f}", f"{r[against]:.4f}", ratio]
        lines.append(f"| {g} | {split[metrics[0]][g]['share']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders trained with --save-ranks, one per seed")
    p.add_argument(
        "--against", default="count_blend", help="the baseline (count_blend, vsknn, cooc_knn, ...)"
    )
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--windows", type=int, nargs="+", default=None, help="evaluation windows (default: all common)"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON to write")
    p.add_argument(
        "--by-repeat",
        type=Path,
        default=None,
        metavar="DATA",
        help="also split each metric by whether the target repeats an item of its session, pooled "
        "(DATA: the runs' prepared data; the runs' eval split is read)",
    )
    p.add_argument(
        "--by-frequency",
        type=Path,
        default=None,
        metavar="DATA",
        help="also split each metric by how often the target occurs in the training sessions before "
        "its window (0, 1-4, 5-19, 20-99, 100+ times), pooled (DATA: the runs' prepared data)",
    )
    p.add_argument(
        "--reach",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="also every method's Recall@K at these cutoffs and its share of ranked targets, pooled",
    )
    a = p.parse_args(argv)
    if a.resamples < 1:
        p.error(f"--resamples {a.resamples}: expected >= 1")
    if a.reach is not None and min(a.reach) < 1:
        p.error(f"--reach {a.reach}: expected cutoffs >= 1")
    try:
        result = paired(a.runs, a.against, tuple(a.metrics), a.resamples, a.seed, a.windows)
    except PairedError as e:
        print(f"bench.paired: {e}", file=sys.stderr)
        return 2
    result["markdown"] = markdown(result)
    for key, data in (("by_repeat", a.by_repeat), ("by_frequency", a.by_frequency)):
        if data is None:
            continue
        try:
            split = json.loads((a.runs[0] / "metrics.json").read_text())["train_config"]["eval_split"]
            result[key] = split_sessions(key, a.runs, data, split, a.against, tuple(a.metrics), result["windows"])
        except (PairedError, OSError, ValueError, KeyError) as e:
            print(f"bench.paired: --{key.replace('_', '-')}: {e}", file=sys.stderr)
            return 2
    if "by_repeat" in result:
        result["markdown"] += "\n\n" + "\n".join(
            f"{g} targets ({rep[g]['share']:.1%} of sessions): model {rep['metric']} {rep[g]['model']:.4f}, "
            f"{a.against} {rep[g][a.against]:.4f} ({rep[g]['ratio']:.3f}x)"
            for rep in result["by_repeat"].values()
            for g in ("repeat", "new")
            if rep[g]["ratio"] is not None
        )
    if "by_frequency" in result:
        result["markdown"] += "\n\n" + group_table(result["by_frequency"], a.against, "target seen in training")
    if a.reach is not None:
        result["reach"] = reach(a.runs, sorted(set(a.reach)), result["windows"])
        cols = [f"recall@{c}" for c in sorted(set(a.reach))] + ["ranked"]
        result["markdown"] += "\n\n" + "\n".join(
            ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            + [
                f"| {k} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |"
                for k, v in result["reach"].items()
            ]
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(a.out, json.dumps(result, indent=2).encode())
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
