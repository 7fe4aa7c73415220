"""Ablation of the real recipe and its learning curve (issue 17), on held-out choices only.

    python -m bench.ablation --data data/diginetica --out bench_results/ablation_dg.json
    python -m bench.ablation --data data/np --out np.json --rows recipe head_off --seeds 0 1 2

Every row is `python -m training.train` with the recipe the data selects plus the row's
flags, for every seed (`--par` at once, one thread each), evaluated on the **valid** split of
each window t+1 (`--eval-split valid`: the test split is read only by `bench.quality`), with the
vocabulary known after t. A row's score is the mean over the evaluation windows that follow
some training data; its spread is the standard deviation over seeds. The effect of a row is
its difference to the `recipe` row, per seed (same seeds, same sessions: a paired
difference), given as mean and standard deviation over seeds. Where the runs made forward checks,
the same paired effect is given on the checks' sessions too (`forward_scores`: the newest training
sessions of each next window, as the model stood after the window before; on NowPlaying1M about
35,000 against about 6,000 valid sessions), a quieter sample that holds no evaluation split.

The learning curve comes for free: window t is trained on every window <= t (the real
recipe's `train_on: cumulative`), so the per-window rows of the `recipe` row give the model,
its count blend and V-SKNN against the number of training sessions seen so far
(`learning_curve` in the JSON, and a PNG next to it).

Runs are kept under --work (default: next to --out) and reused when finished (same flags), unless
the settings this code resolves for their command differ from the ones they ran with (a recipe
default changed since): then the ablation stops and names them (`changed_settings`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import PROJECT_ROOT

METRICS = ("ndcg@20", "recall@20", "mrr@20")
REFERENCE_ROW = "recipe"

# name -> (flags on top of the data's recipe, what the row asks)
ROWS: dict[str, tuple[list[str], str]] = {
    "recipe": ([], "the real recipe as shipped"),
    "no_stack": (["--stack", "0"], "no combiner fit on held-back sessions"),
    "no_rerank": (["--no-rerank"], "the head scores the whole catalogue, not the memory's candidates"),
    "no_head_gate": (["--no-head-gate"], "no per-session weight on the head's logits"),
    "no_head_repeats": (
        ["--no-head-repeats"],
        "the network's logits left out at the session's own items: re-visits scored by the counts alone",
    ),
    "head_off": (["--no-head-logits"], "no network item logits at all: gated counts only"),
    "patience_1": (
        ["--patience", "1"],
        "early stopping after 1 epoch without a better held-back score (2 in the recipe)",
    ),
    "frozen_net": (["--lr", "1e-12"], "network frozen at init: a learned count blend without a network"),
    "lr_5e-4": (["--lr", "5e-4"], "learning rate 5e-4 instead of 1e-3"),
    "lr_2e-3": (["--lr", "2e-3"], "learning rate 2e-3 instead of 1e-3"),
    "mlm": (["--objective", "mlm", "--mask-prob", "0.3"], "masked LM (T4Rec's best masking 0.3)"),
    "dense_table": (
        ["--loss", "full"],
        "dense item table (AdamW) instead of the sparse one (SparseAdam) that loss auto picks from 4,096 ids; "
        "under re-ranking the softmax runs over the candidates either way",
    ),
    "sampled_catalogue": (
        ["--no-rerank", "--loss", "sampled"],
        "no re-ranking: sampled softmax over the catalogue, 2,048 negatives, logQ",
    ),
    "full_catalogue": (
        ["--no-rerank", "--loss", "full"],
        "no re-ranking: the full softmax over the whole catalogue (SASRec's full cross-entropy)",
    ),
    "gbce": (["--loss-fn", "gbce"], "gBCE over the re-ranked candidates (t = 0.75) instead of the softmax"),
    "label_smoothing": (["--label-smoothing", "0.3"], "label smoothing 0.3 (T4Rec best 0.6 on YOOCHOOSE)"),
    "dropout_0.3": (["--dropout", "0.3"], "dropout 0.3 instead of 0.5"),
    "wide": (["--d-model", "128", "--d-inner", "512"], "width 128"),
    "one_layer": (["--n-layer", "1"], "depth 1"),
    "no_side": (["--no-side-features"], "continuous side features zeroed"),
    "feature_norm": (["--feature-norm"], "LayerNorm per input feature before merging (T4Rec)"),
    "fn_cont_log": (
        ["--feature-norm", "--continuous-log"],
        "LayerNorm per feature, continuous inputs as sign(x) log1p(|x|)",
    ),
    "fn_no_side": (["--feature-norm", "--no-side-features"], "LayerNorm per feature, side features zeroed"),
    "side_norm": (
        ["--feature-norm", "--no-item-norm"],
        "LayerNorm on the side features only (the item embedding unnormalised)",
    ),
    "holdout_0.2": (
        ["--holdout", "0.2"],
        "20% of window t held back for early stopping and stacking (10% in the recipe)",
    ),
    "stack_pool": (
        ["--stack-pool", "2000"],
        "earlier windows' held-back slices kept out of the network for good; stacking reads the newest 2,000 "
        "of them too (their own counts left out), not window t's slice alone",
    ),
    "guard_valid": (
        ["--blend-guard", "--guard-split", "valid"],
        "the blend guard on, scoring window t's valid split (never trained, fitted or counted)",
    ),
    "p1_stack_10": (["--patience", "1", "--stack", "10"], "patience 1 and 10 stacking epochs together"),
    "p1_budget_5k": (
        ["--patience", "1", "--train-budget", "5000"],
        "patience 1 and a window trains on at most the newest 5,000 sessions (20,000 in the recipe)",
    ),
    "budget_20k": (
        ["--train-budget", "20000"],
        "a window trains on up to its newest 20,000 sessions (5,000 in the recipe): more data for the network",
    ),
    "budget_2k": (
        ["--train-budget", "2000"],
        "a window trains on up to its newest 2,000 sessions (5,000 in the recipe): the network nearer the "
        "evaluation window, in less time",
    ),
    "window_decay_0.9": (
        ["--memory-window-decay", "0.9"],
        "the item memory's counts of window w weigh 0.9 ** (t - w) after window t (1 in the recipe): recency",
    ),
    "window_decay_0.8": (
        ["--memory-window-decay", "0.8"],
        "the item memory's counts of window w weigh 0.8 ** (t - w) after window t (1 in the recipe): recency",
    ),
    "repeat_feature": (
        ["--repeat-feature"],
        "an input per position: how often its item occurs elsewhere in the session (0-3+)",
    ),
    "memory_masked_context": (
        ["--memory-masked-context"],
        "mlm: a masked target's count terms read every earlier item of its session, masked or not (as served)",
    ),
    "repeat_reweight": (
        ["--repeat-reweight"],
        "training targets weighted so that their re-visit share is the last item's (label shift)",
    ),
    "pop_prior": (
        ["--pop-prior", "10"],
        "the item memory's popularity term gets a learned function of log1p(pop), any sign, 10 knots",
    ),
    "cooc_curve": (
        ["--cooc-curve", "8", "--cooc-curve-fit", "joint"],
        "the co-occurrence term reads a learned curve of log1p(count), 8 knots, not log1p(count), always",
    ),
    "cooc_curve_3": (
        ["--cooc-curve", "3", "--cooc-curve-fit", "joint"],
        "the co-occurrence curve with 3 knots (two slopes, one up to a single co-occurrence and one beyond), always",
    ),
    "cooc_curve_stack": (
        ["--cooc-curve", "3", "--cooc-curve-fit", "stack"],
        "the co-occurrence curve (3 knots) learned in stacking only, the fit reads it as it stands",
    ),
    "no_curve_choice": (
        ["--cooc-curve", "0", "--cooc-curve-fit", "joint"],
        "no co-occurrence curve and no forward check (the recipe before 2026-12-06, seventh session)",
    ),
    "curve_choice": (
        ["--cooc-curve", "3", "--cooc-curve-fit", "choose"],
        "stacking with and without the curve (3 knots); a forward check on the next window's training "
        "sessions picks which serves (z > 1.645)",
    ),
    "forward_guard": (
        ["--blend-guard", "--guard-split", "next"],
        "the count blend serves from the window after a forward check finds it better on NDCG@20 or "
        "Recall@20 (z > 1.645, next window's training sessions); the model trains on",
    ),
    "stack_lag": (
        ["--stack-lag"],
        "stacking scores window t's held-back sessions with the counts of the windows before t (a window later)",
    ),
    "fuse_blend": (
        ["--fuse-blend", "0.25,0.5,1,2"],
        "the recipe, also scored with the count blend's weights added at 0.25, 0.5, 1, 2 (baselines fused_B)",
    ),
    "cooc_init": (
        ["--item-init", "cooc"],
        "new item rows start from the co-occurrence counts' singular vectors, not noise",
    ),
    "stack_10": (["--stack", "10"], "10 epochs of the combiner on the held-back sessions (5 in the recipe)"),
    "stack_2": (["--stack", "2"], "2 epochs of the combiner on the held-back sessions (5 in the recipe)"),
    "batch_256": (["--batch-size", "256"], "batch 256 instead of 128 (fewer, larger steps)"),
    "batch_384": (["--batch-size", "384"], "batch 384 instead of 128 (T4Rec's best on YOOCHOOSE)"),
    "mlm_0.15": (["--objective", "mlm", "--mask-prob", "0.15"], "masked LM, masking 0.15"),
    "mlm_0.5": (["--objective", "mlm", "--mask-prob", "0.5"], "masked LM, masking 0.5"),
    "mask_last_0.25": (
        ["--mask-last", "0.25"],
        "a quarter of each batch's sessions masked at their last item only (BERT4Rec's next-item samples)",
    ),
    "mask_last_0.5": (
        ["--mask-last", "0.5"],
        "half of each batch's sessions masked at their last item only (BERT4Rec's next-item samples)",
    ),
    "hop2_0.3": (
        ["--memory-hop2", "0.3"],
        "co-occurrence rows with free slots filled with two-hop items, pseudo-count up to 0.3",
    ),
    "hop2_0.6": (
        ["--memory-hop2", "0.6"],
        "co-occurrence rows with free slots filled with two-hop items, pseudo-count up to 0.6",
    ),
    "mlm_hop2_0.6": (
        ["--objective", "mlm", "--mask-prob", "0.3", "--memory-hop2", "0.6"],
        "masked LM (masking 0.3) and the two-hop fill up to 0.6 together",
    ),
    "clm": (["--objective", "clm"], "causal LM: a loss on every next item (the objective until 2026-12-05)"),
    "no_hop2": (["--memory-hop2", "0"], "no two-hop fill of the co-occurrence rows"),
    "stack_last": (
        ["--stack-last"],
        "stacking fits the held-back sessions' last items only (the evaluation's task)",
    ),
    "memory_k_200": (
        ["--memory-k", "200"],
        "200 co-occurrence and successor entries per item instead of 100 (more reach, more candidates)",
    ),
    "memory_k_50": (["--memory-k", "50"], "50 co-occurrence and successor entries per item instead of 100"),
    "stack_prefixes": (
        ["--stack-prefixes"],
        "stacking fits every prefix of the held-back sessions, masked at its last item (the evaluation's task "
        "at every position)",
    ),
    "members_3": (
        ["--members", "3"],
        "an ensemble of 3 models (each its own seed, held-back slice, stacking and checks) ranking by the mean "
        "of their log-softmax over the shared candidates",
    ),
    "scorer_64": (
        ["--scorer-hidden", "64"],
        "an MLP (2 x 64) over the count features and the combiner's score re-ranks the 128 best candidates, "
        "fitted on forward sessions, served once the forward check finds it better (training/scorer_fit.py)",
    ),
    "scorer_64_top512": (
        ["--scorer-hidden", "64", "--scorer-top", "512"],
        "scorer_64 re-ranking the 512 best candidates (NowPlaying1M: 39 % of the known targets are among the "
        "128 best by the combiner's score, 52 % among the 512 best, 53 % among all)",
    ),
    "forward_10k": (
        ["--forward-check-sessions", "10000"],
        "the forward checks and the scorer's pool read the newest 10,000 of the next window's training "
        "sessions instead of 5,000 (the scorer fitted on half its pool scores 1.5 % lower on later forward "
        "sessions)",
    ),
    "no_scorer": (["--scorer-hidden", "0"], "without the candidate scorer (the recipe before 2026-12-06's tenth session)"),
    "scorer_prefixes_1": (
        ["--scorer-prefixes", "1"],
        "the scorer's pool also takes, per forward check, as many shorter prefixes of the checked sessions "
        "as it checks (each prefix's last item its target): more rows to fit on where windows are small "
        "(up to 5,000 per check instead, at 29e4e74: DIGINETICA +0.6 % +/- 0.7, NowPlaying1M -0.8 % +/- 0.7)",
    ),
    "scorer_members_1": (
        ["--scorer-members", "1"],
        "the scorer is one MLP instead of the mean of three fitted with different seeds on the same pool (the "
        "recipe before 2026-12-07's thirteenth session; docs/results/*_scorer_members3_* ran it the other way "
        "round, as the row scorer_members_3 on top of that recipe)",
    ),
    "scorer_recent_5k": (
        ["--scorer-recent", "5000"],
        "one more input of the scorer: each candidate's log1p count in the newest 5,000 training sessions "
        "(the network's train_budget), how popular it is now beside its count over every window",
    ),
    "scorer_64_network": (
        ["--scorer-hidden", "64", "--scorer-network"],
        "scorer_64 with the network's own signals among its inputs: each candidate's item logit from the "
        "network (ungated) and the session's gates",
    ),
}


def train_args(data: Path, run: Path, flags: list[str], seed: int) -> list[str]:
    """`python -m training.train`'s arguments for one row's seed."""
    return [
        "--data", str(data), "--out", str(run), "--no-progress", "--threads", "1", "--seed", str(seed),
        "--eval-split", "valid", *flags,
    ]  # fmt: skip


def changed_settings(data: Path, run: Path, flags: list[str], seed: int) -> list[str]:
    """The settings in which a finished run differs from what this code resolves for the same command
    (a recipe default changed since it ran: its flags alone no longer say what it is); [] for none."""
    from training.config import TrainConfig, parse_args
    from training.model import ModelConfig

    old = json.loads((run / "metrics.json").read_text()).get("train_config", {})
    now = json.loads(json.dumps(parse_args(train_args(data, run, flags, seed), "ablation", "").to_dict()))

    def differ(o: dict, n: dict, cls: type, skip: tuple[str, ...]) -> list[str]:
        # a setting added since the run, at its default, is what the run did (new options default off)
        new_at_default = {k for k, v in _defaults(cls).items() if k not in o and n.get(k) == v}
        keys = sorted((set(o) | set(n)) - set(skip) - new_at_default)
        return [k for k in keys if o.get(k) != n.get(k)]

    # where the run is kept and whether it was resumed are not what it computes
    out = differ(old, now, TrainConfig, ("model", "resume", "out"))
    return out + [f"model.{k}" for k in differ(old.get("model", {}), now["model"], ModelConfig, ())]


def _defaults(cls: type) -> dict[str, Any]:
    """The dataclass's field defaults, as JSON gives them back."""
    return json.loads(json.dumps({f.name: f.default for f in fields(cls) if f.default is not MISSING}))


def run_seed(data: Path, run: Path, flags: list[str], seed: int, log: Path) -> subprocess.Popen:
    """Start one row's seed; a run an earlier, interrupted ablation left behind is resumed after its
    last finished window (`--resume`: the same metrics as an uninterrupted run)."""
    resume = ["--resume"] if (run / "meta.json").is_file() else []
    cmd = [sys.executable, "-m", "training.train", *train_args(data, run, flags, seed), *resume]
    return subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, stdout=log.open("a" if resume else "w"), stderr=subprocess.STDOUT
    )


def settle(proc: subprocess.Popen, run: Path, flags: list[str]) -> bool:
    """A finished run is marked DONE at once (with its flags), so that an ablation stopped later
    reuses it; False: it failed."""
    if proc.returncode != 0:
        print(f"[ablation] failed: {run} (see {run.parent}/{run.name}.log)", file=sys.stderr)
        return False
    result = json.loads((run / "metrics.json").read_text())
    result["ablation_flags"] = flags
    (run / "metrics.json").write_text(json.dumps(result))
    (run / "DONE").write_text("")
    return True


def finished(run: Path, flags: list[str]) -> bool:
    path = run / "metrics.json"
    if not path.is_file():
        return False
    done = json.loads(path.read_text())
    return (
        bool(done.get("windows")) and done.get("ablation_flags", flags) == flags and (run / "DONE").exists()
    )


def scored_windows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The windows that follow some training data and have evaluation sessions."""
    rows, seen = [], 0
    for r in result["windows"]:
        seen += r.get("train_sessions", 0)
        if r.get("eval_sessions", 0) and seen:
            rows.append({**r, "trained_sessions": seen})
    return rows


FORWARD_METRICS = ("ndcg@20", "recall@20")


def forward_scores(result: dict[str, Any]) -> dict[str, float] | None:
    """The model as each window left it (stacked, its scorer as it serves) on the next window's forward
    sessions: the newest training sessions of window t+1 that the forward checks score (`guard_check`,
    training/forward_check.py), pooled over sessions; no evaluation split. None where no check ran."""
    checks = [g for r in result["windows"] if (g := r.get("guard_check")) and g.get("sessions")]
    if not checks:
        return None
    n = sum(g["sessions"] for g in checks)
    return {"sessions": n, **{m: sum(g["model"][m] * g["sessions"] for g in checks) / n for m in FORWARD_METRICS}}


def seed_scores(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = scored_windows(result)
    out = {"model": {m: float(np.mean([r[m] for r in rows])) for m in METRICS}}
    for b in ("count_blend", "vsknn"):
        out[b] = {m: float(np.mean([r["baselines"][b][m] for r in rows])) for m in METRICS}
    forward = forward_scores(result)
    if forward is not None:
        out["forward"] = forward
    return out


def paired_effect(
    row: dict[Any, Any], ref: dict[Any, Any], seeds: list[Any], metrics: tuple[str, ...], key: str = "model"
) -> dict[str, tuple[float, float]]:
    """A row's effect: its per-seed difference to the reference row's `key` score (seed -> {key:
    {metric: score}}, same seeds, same sessions), as (mean, standard deviation) over `seeds`."""
    out = {}
    for m in metrics:
        d = [row[s][key][m] / ref[s][key][m] - 1.0 for s in seeds]
        out[m] = (float(np.mean(d)), float(np.std(d)))
    return out


def learning_curve(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluation window, mean over seeds: training sessions so far and NDCG/Recall@20."""
    per = [scored_windows(r) for r in results]
    curve = []
    for i, r in enumerate(per[0]):
        point = {"eval_window": r["eval_window"], "trained_sessions": r["trained_sessions"]}
        for k in ("model", "count_blend", "vsknn"):
            for m in ("ndcg@20", "recall@20"):
                vals = [(p[i][m] if k == "model" else p[i]["baselines"][k][m]) for p in per]
                point[f"{k} {m}"] = float(np.mean(vals))
        curve.append(point)
    return curve


def leads_from(curve: list[dict[str, Any]], against: str, metric: str) -> int | None:
    """The fewest training sessions from which the model leads `against` on `metric` at every later
    point of `learning_curve` (None: it does not lead at the last point). Each point is one window's
    evaluation slice: on small slices read it with the paired bootstrap's intervals beside it."""
    since = None
    for p in reversed(curve):
        if p[f"model {metric}"] <= p[f"{against} {metric}"]:
            break
        since = p["trained_sessions"]
    return since


def curve_markdown(curve: list[dict[str, Any]]) -> str:
    """The learning curve as a table: per evaluation window, training sessions so far, each method's
    NDCG@20 / Recall@20 and the model's ratio to the count blend and V-SKNN, then where the leads start."""
    lines = [
        "| eval window | training sessions so far | model NDCG@20 / Recall@20 | count blend | V-SKNN "
        "| model / blend | model / V-SKNN |",
        "|---|---:|---|---|---|---|---|",
    ]
    for p in curve:
        cells = [f"{p[f'{k} ndcg@20']:.4f} / {p[f'{k} recall@20']:.4f}" for k in ("model", "count_blend", "vsknn")]
        ratios = [
            " / ".join(f"{p[f'model {m}'] / p[f'{k} {m}']:.3f}x" if p[f"{k} {m}"] > 0 else "-" for m in ("ndcg@20", "recall@20"))
            for k in ("count_blend", "vsknn")
        ]  # fmt: skip
        lines.append(f"| {p['eval_window']} | {p['trained_sessions']:,} | " + " | ".join(cells + ratios) + " |")
    lines.append("")
    for k in ("count_blend", "vsknn"):
        since = {m: leads_from(curve, k, m) for m in ("ndcg@20", "recall@20")}
        said = ", ".join(
            f"{m} from {v:,} training sessions on" if v is not None else f"{m} not at the last window"
            for m, v in since.items()
        )
        lines.append(f"The model leads {k} in every later window: {said}.")
    return "\n".join(lines)


def plot_curve(curve: list[dict[str, Any]], path: Path, title: str, split: str = "valid") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["trained_sessions"] for p in curve]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, m in zip(axes, ("ndcg@20", "recall@20")):
        for k, style in (("model", "o-"), ("count_blend", "s--"), ("vsknn", "^:")):
            ax.plot(x, [p[f"{k} {m}"] for p in curve], style, label=k)
        ax.set_xscale("log")
        ax.set_xlabel("training sessions seen (cumulative windows)")
        ax.set_ylabel(f"{m} ({split}, next window)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| row | what | model NDCG@20 | model Recall@20 | model MRR@20 | effect on NDCG@20 | effect on Recall@20 "
        "| / blend NDCG, Recall | effect on the forward sessions, NDCG@20 / Recall@20 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        m, e, f = row["mean"]["model"], row.get("effect", {}), row.get("forward_effect")
        blend = row["mean"]["count_blend"]
        cells = [f"{m[k][0]:.4f} ± {m[k][1]:.4f}" for k in METRICS]
        eff = [
            f"{100 * e[k][0]:+.1f}% ± {100 * e[k][1]:.1f}" if k in e else "-"
            for k in ("ndcg@20", "recall@20")
        ]
        ratio = (
            f"{m['ndcg@20'][0] / blend['ndcg@20'][0]:.3f}x, {m['recall@20'][0] / blend['recall@20'][0]:.3f}x"
        )
        fwd = " / ".join(f"{100 * f[k][0]:+.1f}% ± {100 * f[k][1]:.1f}" for k in FORWARD_METRICS) if f else "-"
        lines.append(f"| {name} | {row['what']} | " + " | ".join(cells + eff) + f" | {ratio} | {fwd} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a DATA folder prepared from a real click log")
    p.add_argument("--out", type=Path, required=True, help="JSON to write (the PNG of the curve beside it)")
    p.add_argument("--work", type=Path, default=None, help="where the runs go (default: OUT without .json)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--par", type=int, default=2, help="training processes at once (one thread each)")
    p.add_argument("--extra", default="", help="flags added to every row (e.g. '--end-window 9')")
    a = p.parse_args(argv)
    work = a.work or a.out.with_suffix("")
    rows = [REFERENCE_ROW] + [r for r in a.rows if r != REFERENCE_ROW]
    jobs, stale = [], []
    for name in rows:
        flags = ROWS[name][0] + a.extra.split()
        for seed in a.seeds:
            run = work / name / f"s{seed}"
            if not finished(run, flags):
                jobs.append((name, seed, run, flags))
            elif changed := changed_settings(a.data, run, flags, seed):
                stale.append(f"{run} ({', '.join(changed)})")
    if stale:  # reused, they would compare rows of another recipe; nothing is deleted here
        raise SystemExit(
            "[ablation] finished runs whose settings differ from what this code gives their command "
            f"(a default changed since they ran): {'; '.join(stale)}. Delete them (or use another --work) "
            "to run them again"
        )
    t0, running, ok = time.time(), [], True
    for name, seed, run, flags in jobs:
        while True:
            ok &= all([settle(*j) for j in running if j[0].poll() is not None])  # every one settled
            running = [j for j in running if j[0].returncode is None]
            if len(running) < a.par:
                break
            time.sleep(2)
        run.parent.mkdir(parents=True, exist_ok=True)
        print(f"[ablation] {name} seed {seed}: {' '.join(flags) or '(recipe)'}", file=sys.stderr)
        running.append((run_seed(a.data, run, flags, seed, run.parent / f"s{seed}.log"), run, flags))
    for proc, run, flags in running:
        proc.wait()
        ok &= settle(proc, run, flags)
    if not ok:
        return 1
    summary: dict[str, Any] = {"data": str(a.data), "seeds": a.seeds, "split": "valid", "rows": {}}
    ref = {
        s: seed_scores(json.loads((work / REFERENCE_ROW / f"s{s}" / "metrics.json").read_text()))
        for s in a.seeds
    }
    for name in rows:
        results = [json.loads((work / name / f"s{s}" / "metrics.json").read_text()) for s in a.seeds]
        per_seed = {s: seed_scores(r) for s, r in zip(a.seeds, results)}
        mean = {
            k: {m: (float(np.mean([per_seed[s][k][m] for s in a.seeds])), float(np.std([per_seed[s][k][m] for s in a.seeds]))) for m in METRICS}
            for k in ("model", "count_blend", "vsknn")
        }  # fmt: skip
        row: dict[str, Any] = {
            "what": ROWS[name][1],
            "flags": ROWS[name][0],
            "per_seed": per_seed,
            "mean": mean,
        }
        if name != REFERENCE_ROW:
            row["effect"] = paired_effect(per_seed, ref, a.seeds, METRICS)
            if all("forward" in per_seed[s] and "forward" in ref[s] for s in a.seeds):
                # the same sessions in both rows (their selection reads no model): a larger, quieter sample
                row["forward_effect"] = paired_effect(per_seed, ref, a.seeds, FORWARD_METRICS, key="forward")
        else:
            row["learning_curve"] = learning_curve(results)
            a.out.parent.mkdir(parents=True, exist_ok=True)  # the curve's PNG goes beside OUT
            plot_curve(row["learning_curve"], a.out.with_suffix(".png"), f"{a.data.name}: learning curve")
        summary["rows"][name] = row
    summary["wall_s"] = time.time() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
