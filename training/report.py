"""What a run reports: metrics.json's summary, metrics.png and the tables printed to stderr.

summarise(rows)          mean of every metric over the evaluated windows, throughput
plot_metrics(rows, path) NDCG / Recall / MRR @20 per window, model and every reported baseline
window_line(row)         one window's result line; print_table(rows) the final table
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import REPORTED
from training.integrity import atomic_write

METRICS_FILE = "metrics.json"
PLOT_FILE = "metrics.png"


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Mean of every metric over the evaluated windows, and training throughput."""
    done = [r for r in rows if r.get("eval_sessions", 0) > 0]
    keys = [k for k in (rows[0] if rows else {}) if "@" in k]
    out: dict[str, Any] = {"windows_evaluated": len(done)}
    for k in keys:
        out[k] = float(np.mean([r[k] for r in done])) if done else None
    for name in REPORTED:
        with_b = [r["baselines"][name] for r in done if name in r.get("baselines", {})]
        if with_b:
            out.setdefault("baselines", {})[name] = {
                k: float(np.mean([b[k] for b in with_b])) for k in with_b[0]
            }
    for name in ("exact", "served_agreement"):  # a model served in two stages (training/evaluate.py)
        with_e = [r[name] for r in done if name in r]
        if with_e:
            out[name] = {k: float(np.mean([e[k] for e in with_e])) for k in with_e[0]}
    chose = [r for r in rows if "best_epoch_exact" in r]
    if chose:  # early stopping on the served ranking vs the exact one
        out["best_epoch_same_as_exact"] = sum(r["best_epoch"] == r["best_epoch_exact"] for r in chose) / len(
            chose
        )
    with_known = [r for r in done if "unseen_targets" in r]
    if with_known:  # issue 12: share of evaluation targets unknown after the training window
        out["unseen_targets"] = float(np.mean([r["unseen_targets"] for r in with_known]))
    seconds = sum(r.get("train_seconds", 0.0) for r in rows)
    trained = sum(r.get("sessions_trained", 0) for r in rows)
    out["train_seconds"] = seconds
    out["sessions_trained"] = trained
    out["sessions_per_second"] = trained / seconds if seconds > 0 else None
    return out


def plot_metrics(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("eval_sessions", 0) > 0]
    metrics = ["ndcg@20", "recall@20", "mrr@20"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    x = [r["eval_window"] for r in done]
    for ax, m in zip(axes, metrics):
        ax.plot(x, [r[m] for r in done], "o-", label="model", linewidth=2)
        for name in REPORTED:
            if done and name in done[0].get("baselines", {}):
                ax.plot(x, [r["baselines"][name][m] for r in done], "s--", label=name, alpha=0.8)
        ax.set_xlabel("evaluation window")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def window_line(row: dict[str, Any]) -> str:
    """'[train] window t->t+1 (split): ndcg@20=... | baselines' for an evaluated metrics row."""
    msg = " ".join(f"{k}={row[k]:.4f}" for k in ("ndcg@20", "recall@20", "mrr@20"))
    msg += f" (items known {row['items_known']}, unseen targets {row['unseen_targets']:.3f})"
    if "baselines" in row:
        msg += " | " + " ".join(f"{b}:ndcg@20={row['baselines'][b]['ndcg@20']:.4f}" for b in REPORTED)
    return f"[train] window {row['train_window']}->{row['eval_window']} ({row['eval_split']}): {msg}"


def print_table(rows: list[dict]) -> None:
    """Every window's model and reported-baseline metrics, to stderr."""
    head = (
        f"{'window':>9} {'items_known':>11} {'unseen':>6} {'ndcg@20':>8} {'recall@20':>9} {'mrr@20':>7} "
        + " ".join(f"{b + ' ndcg@20':>22}" for b in REPORTED)
    )
    print(head, file=sys.stderr)
    for r in rows:
        if r.get("eval_sessions", 0) == 0:
            print(f"{r['train_window']:>4}->{r['eval_window']:<4} (skipped)", file=sys.stderr)
            continue
        line = (
            f"{r['train_window']:>4}->{r['eval_window']:<4} {r.get('items_known', -1):>11} "
            f"{r.get('unseen_targets', float('nan')):6.3f} {r['ndcg@20']:8.4f} {r['recall@20']:9.4f} {r['mrr@20']:7.4f} "
        )
        line += " ".join(
            f"{r['baselines'][b]['ndcg@20']:22.4f}" if b in r.get("baselines", {}) else f"{'-':>22}"
            for b in REPORTED
        )
        print(line, file=sys.stderr)
