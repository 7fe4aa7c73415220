"""Train the next-item model window by window (the Transformers4Rec protocol).

    python -m training.train --data data/synthetic --out runs/synthetic
    python -m training.train --data data/synthetic --out runs/synthetic --resume
    torchrun --nproc_per_node 2 -m training.train --data data/synthetic --out runs/ddp

For t = start .. end-1: train on DATA/sessions_by_day/<t>/train.parquet for
`epochs` epochs (AdamW, cosine schedule with `cycles_per_epoch` cycles per
epoch, restarted every window, weights and optimizer state carried on), then
evaluate on <t+1>/valid.parquet: the input is every item but the last and the
target is the last item, ranked over the full catalogue (training/metrics.py).
The baselines of training/baselines.py are evaluated on the same sessions.

Defaults come from a recipe (`RECIPES`, docs/quality.md): "reference" (the
protocol above) for synthetic data, "real" for a click log prepared from
--input (every window <= t, causal objective, the item memory, early stopping
on a held-back slice of window t's training sessions); `--recipe` forces one, `--config FILE`
(e.g. from `python -m training.tune`) overrides it, explicit flags win.

Writes to RUN/ after every window (each file atomically, see `save_checkpoint`):
model.pt (state_dict), optim.pt (optimizer/scheduler/RNG state), meta.json
(model config, schema, workflow sha256, last finished window, metrics),
metrics.json and metrics.png. `--resume` continues after the last finished
window and ends with exactly the metrics of an uninterrupted run: every window
draws its shuffling, masking and dropout randomness from generators seeded by
(seed, window[, rank]).

Under torchrun the same script runs DistributedDataParallel (gloo on CPU,
nccl on GPU): every rank takes its share of each global batch; rank 0 alone
evaluates and writes.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# Set before torch loads OpenMP: idle OpenMP threads then sleep instead of
# spinning. Where the cores are shared with other jobs, spinning threads made
# a 2-thread training step 2-8x slower here (passive: 40-62 ms, default:
# 128-500 ms, 1 thread: 37-59 ms per step, same load). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from training.baselines import BASELINES, BaselineCounts, evaluate_baselines, memory_tables
from training.data import (
    DataError,
    SessionTensors,
    available_windows,
    eval_inputs_targets,
    load_schema,
    load_split,
    split_path,
)
from training.metrics import metrics_from_ranks, pessimistic_ranks
from training.model import (
    META_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    ModelConfig,
    PackedSessions,
    RunError,
    SessionModel,
    atomic_write,
    mask_positions,
    pack_sessions,
    read_meta,
    recover_checkpoint,
    save_checkpoint,
)
from training.model import (
    load_run as load_run,  # re-exported: training.train.load_run
)

METRICS_FILE = "metrics.json"
PLOT_FILE = "metrics.png"


@dataclass
class TrainConfig:
    data: str
    out: str
    start_window: int = 1  # first window trained on
    end_window: int = 8  # windows start..end-1 are trained on; the last evaluation window is `end`
    epochs: int = 5
    batch_size: int = 128  # global batch (split across DDP ranks)
    eval_batch_size: int = 1024
    lr: float = 5e-4
    weight_decay: float = 0.0  # HF Trainer default, as the reference (not applied to the item memory)
    memory_lr: float = 0.0  # learning rate of the item memory's gates and weights (0 = lr)
    head_selection: bool = False  # early stopping also tries the memory model without the head's own logits
    cycles_per_epoch: float = 1.5  # cosine cycles per epoch (num_cycles = this * epochs)
    max_grad_norm: float = 1.0  # HF Trainer default; 0 disables clipping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch threads per process; 0 = cores / local processes
    resume: bool = False
    baselines: bool = True
    tensorboard: bool = False
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (objective, mask_prob, ...)
    # --- recipe settings (see RECIPES; the reference protocol's values as defaults) ---
    recipe: str = "reference"  # the recipe these settings came from (reference | real | custom)
    train_on: str = "window"  # window: train on window t only; cumulative: on every window <= t
    holdout: float = 0.0  # fraction of window t's training sessions held back for early stopping
    patience: int = 0  # early stopping: epochs without a better held-back NDCG@20 (0 = off)
    label_smoothing: float = 0.0
    evaluate: bool = True  # False: no evaluation on window t+1 (training.tune selects on held-back data only)

    def __post_init__(self) -> None:
        if self.head_selection and not (self.patience > 0 and self.model.get("memory")):
            raise ValueError(
                "head_selection needs early stopping (patience > 0, holdout > 0) and the item memory "
                "(--memory): it chooses on the held-back sessions whether the head's own logits help"
            )
        if self.memory_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"memory_lr and weight_decay must be >= 0, got {self.memory_lr} and {self.weight_decay}"
            )
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.patience > 0 and self.holdout <= 0.0:
            raise ValueError("early stopping (patience > 0) needs a held-back slice: set holdout > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


TRAIN_ON = ("window", "cumulative")

# Defaults per recipe. "reference": the Transformers4Rec getting-started protocol
# (synthetic data keeps it). "real": the recipe for real click logs (docs/quality.md
# gives the measurements and the reason for each setting):
#   train_on cumulative  every window <= t: a real log's windows are small (~1.5k
#                        sessions a day here) and the item vocabulary is large, so
#                        forgetting earlier windows throws away most item evidence
#                        (the baselines count over windows <= t as well);
#   objective clm        a loss term on every next item of a session (~4x the
#                        positions of mlm at 15%), the same task as the evaluation;
#   epochs 20 + early    at most 20 epochs per window, stopping after `patience` 2
#   stopping             epochs without a better NDCG@20 on a 10% slice of window
#                        t's TRAINING sessions (never the evaluation window); the
#                        best epoch's weights are kept;
#   lr 1e-3, constant    (cycles_per_epoch 0) the cosine restarts of the reference
#                        fight early stopping; 1e-3 is AdamW's usual default.
#   memory on            the ItemMemory (training/model.py): co-occurrence,
#                        successor, repeat and popularity counts of the training
#                        sessions added to the logits through gates computed from
#                        XLNet's hidden state. Without it the network alone stayed
#                        below most-popular on DIGINETICA (21k items, ~1.5k
#                        sessions a day: too few clicks per item for embeddings);
#   memory_lr 1e-2       the gates are a handful of weights facing a strong signal;
#   weight_decay 0.1,    the network's own item logits memorise training sessions
#   dropout 0.5,         and add noise to the counts on new sessions: regularised,
#   embedding_init_std 0 and starting from zero item logits (the counts alone).
RECIPES: dict[str, dict[str, Any]] = {
    "reference": dict(
        epochs=5,
        lr=5e-4,
        cycles_per_epoch=1.5,
        train_on="window",
        holdout=0.0,
        patience=0,
        label_smoothing=0.0,
        weight_decay=0.0,
        memory_lr=0.0,
        head_selection=False,
        model={"objective": "mlm", "mask_prob": 0.15},
    ),
    "real": dict(
        epochs=20,
        lr=1e-3,
        cycles_per_epoch=0.0,
        train_on="cumulative",
        holdout=0.1,
        patience=2,
        label_smoothing=0.0,
        weight_decay=0.1,
        memory_lr=1e-2,
        head_selection=False,
        model={"objective": "clm", "memory": True, "dropout": 0.5, "embedding_init_std": 0.0},
    ),
}


def default_recipe(schema: dict[str, Any]) -> str:
    """The recipe for a DATA folder: reference for synthetic data (schema source "synthetic"), else real."""
    return "reference" if str(schema.get("source", "")) == "synthetic" else "real"


# -----------------------------------------------------------------------------
# Metrics file and plot
# -----------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Mean of every metric over the evaluated windows, and training throughput."""
    done = [r for r in rows if r.get("eval_sessions", 0) > 0]
    keys = [k for k in (rows[0] if rows else {}) if "@" in k]
    out: dict[str, Any] = {"windows_evaluated": len(done)}
    for k in keys:
        out[k] = float(np.mean([r[k] for r in done])) if done else None
    for name in BASELINES:
        with_b = [r["baselines"][name] for r in done if "baselines" in r]
        if with_b:
            out.setdefault("baselines", {})[name] = {
                k: float(np.mean([b[k] for b in with_b])) for k in with_b[0]
            }
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
        for name in BASELINES:
            if done and "baselines" in done[0]:
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


# -----------------------------------------------------------------------------
# Training pieces
# -----------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from (seed, window, purpose, rank)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1)
    )


def cosine_lambda(total_steps: int, num_cycles: float):
    """HF get_cosine_schedule_with_warmup without warmup: 0.5 * (1 + cos(2 pi cycles progress))."""

    def f(step: int) -> float:
        progress = step / max(1, total_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))

    return f


class _TrainStep(nn.Module):
    """forward = training loss of packed rows, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: SessionModel, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, packed: PackedSessions) -> Tensor:
        return self.model.packed_loss(packed, self.label_smoothing)


@torch.no_grad()
def evaluate_model(
    model: SessionModel, st: SessionTensors, device: torch.device, batch_size: int
) -> dict[str, float]:
    """Metrics of the model on every session of `st` (input: all but the last item).

    Always in float32, also on a GPU: reduced-precision logits would create
    ties, which the pessimistic ranking counts against the target.
    """
    feats, lengths, targets = eval_inputs_targets(st, model.cfg.item_feature)
    was_training = model.training
    model.eval()
    ranks = []
    for i in range(0, len(targets), batch_size):
        f = {k: v[i : i + batch_size].to(device) for k, v in feats.items()}
        scores = model.next_item_scores(f, lengths[i : i + batch_size].to(device))
        ranks.append(pessimistic_ranks(scores, targets[i : i + batch_size].to(device)).cpu())
    model.train(was_training)
    return metrics_from_ranks(torch.cat(ranks))


def _to_device(p: PackedSessions, device: torch.device) -> PackedSessions:
    return PackedSessions(
        {k: v.to(device, non_blocking=True) for k, v in p.feats.items()},
        p.segment.to(device, non_blocking=True),
        None if p.masked is None else p.masked.to(device, non_blocking=True),
    )


def _batch(st: SessionTensors, idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Rows `idx`, trimmed to their longest session (padding never changes the result)."""
    lengths = st.lengths[idx]
    width = int(lengths.max())
    return {k: v[idx, :width] for k, v in st.feats.items()}, lengths


# -----------------------------------------------------------------------------
# The run
# -----------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    d = _Dist(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if not dist.is_initialized():
        use_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d


def _check_replicas_in_sync(model: nn.Module, d: _Dist) -> None:
    """Every rank must hold the same weights and buffers (the item memory's tables, built on
    every rank, not broadcast) after a window (DDP averaged the gradients every step)."""
    with torch.no_grad():
        mine = torch.stack([p.double().sum() for p in [*model.parameters(), *model.buffers()]])  # (P,)
        every = [torch.empty_like(mine) for _ in range(d.world)]
        dist.all_gather(every, mine)
    if not all(torch.allclose(e, every[0], rtol=1e-9, atol=0) for e in every):
        raise RuntimeError(
            "DDP ranks hold different weights or memory tables after a window: not synchronised"
        )


def _resolve_device(arg: str, d: _Dist) -> torch.device:
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"--device {arg}: torch.cuda is not available here (use --device cpu or auto)")
        dev = torch.device(f"cuda:{d.local_rank}") if arg == "cuda" and d.world > 1 else torch.device(arg)
        torch.cuda.set_device(dev)
        return dev
    if arg != "cpu":
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {arg!r}")
    return torch.device("cpu")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunError(
            f"cannot write to the output folder {out} ({e.strerror or e}); choose another --out"
        ) from e


def _model_config(cfg: TrainConfig, schema: dict) -> ModelConfig:
    return ModelConfig.from_schema(schema, **cfg.model)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the protocol of the module docstring; returns the metrics.json content."""
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist) -> dict[str, Any]:
    device = _resolve_device(cfg.device, d)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.end_window <= cfg.start_window:
        raise ValueError(
            f"--end-window ({cfg.end_window}) must be greater than --start-window ({cfg.start_window})"
        )
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    out = Path(cfg.out)
    data = Path(cfg.data)
    schema = load_schema(data)
    mcfg = _model_config(cfg, schema)
    if d.main:
        _check_writable(out)
        recover_checkpoint(out)
    if d.world > 1:
        dist.barrier()

    torch.manual_seed(cfg.seed)
    model = SessionModel(mcfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (measured 0.3 ms vs 2.1 ms per CPU step for the for-loop default)
    mem_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("item_memory.")]
    mem_ids = {id(p) for p in mem_params}
    groups = [
        {"params": [p for p in params if id(p) not in mem_ids], "lr": cfg.lr, "weight_decay": cfg.weight_decay}
    ]
    if mem_params:  # a handful of gate weights: their own (higher) learning rate, no decay
        groups.append({"params": mem_params, "lr": cfg.memory_lr or cfg.lr, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    rows: list[dict] = []
    first = cfg.start_window
    has_ckpt = (out / META_FILE).exists()
    if has_ckpt and not cfg.resume:
        raise RunError(
            f"{out} already holds a checkpoint ({META_FILE}); pass --resume to continue it or choose another --out"
        )
    if has_ckpt and cfg.resume:
        meta = read_meta(out, recover=d.main)
        if meta["model_config"] != mcfg.to_dict():
            raise RunError(
                f"--resume: the model config in {out / META_FILE} differs from this run's "
                f"({meta['model_config']} vs {mcfg.to_dict()}); use the same --data and model flags"
            )
        model.load_state_dict(torch.load(out / MODEL_FILE, map_location=device, weights_only=True))
        ostate = torch.load(out / OPTIM_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(ostate["optimizer"])
        if "scaler" in ostate and scaler.is_enabled():
            scaler.load_state_dict(ostate["scaler"])
        rows = list(meta["metrics"]["windows"])
        first = int(meta["window"]) + 1
        if d.main:
            print(f"[train] resuming {out} after window {meta['window']}", file=sys.stderr)
    elif cfg.resume and d.main:
        print(f"[train] --resume: no checkpoint in {out} yet, starting from window {first}", file=sys.stderr)

    ddp_step: nn.Module = _TrainStep(model, cfg.label_smoothing)
    if d.world > 1:
        # broadcast_buffers off: the only buffers are the item memory's count tables (tens of MB),
        # which every rank builds identically from the same data (`set_memory`); broadcasting
        # them before every step would cost more than the step
        ddp_step = nn.parallel.DistributedDataParallel(
            ddp_step, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    counts: BaselineCounts | None = None
    if cfg.baselines and d.main:
        counts = BaselineCounts(mcfg.n_items)
        windows = [w for w in available_windows(data, schema) if w < first]
        for w in windows:  # training sessions of every window before the first one trained here
            st = load_split(split_path(data, w, "train"), schema)
            if len(st):
                counts.add_sessions(st.feats[mcfg.item_feature].numpy(), st.lengths.numpy())

    writer = None
    if cfg.tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RunError("--tensorboard needs the `tensorboard` package (pip install tensorboard)") from e
        writer = SummaryWriter(str(out / "tensorboard"))

    for t in range(first, cfg.end_window):
        row = _run_window(
            cfg, d, t, schema, model, ddp_step, optimizer, scaler, device, amp_dtype, counts, writer
        )
        if d.world > 1:
            _check_replicas_in_sync(model, d)
        scheduler_state = row.pop("_scheduler", {})  # restarted every window; kept for inspection
        rows.append(row)
        if d.main:
            result = {"windows": rows, "summary": summarise(rows), "train_config": asdict(cfg)}
            meta = {
                "window": t,
                "model_config": mcfg.to_dict(),
                "vocabulary_sizes": dict(mcfg.categorical),
                "schema": schema,
                "workflow_sha256": schema.get("workflow_sha256", {}),
                "train_config": asdict(cfg),
                "metrics": {"windows": rows},
            }
            ostate = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler_state,
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                # shuffling/masking/dropout are reseeded from (seed, window) every window,
                # which is what makes --resume exact; the global states are kept for the record
                "rng": {"torch": torch.get_rng_state()}
                | ({"cuda": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {}),
            }
            save_checkpoint(out, model.state_dict(), ostate, meta)
            atomic_write(out / METRICS_FILE, json.dumps(result, indent=2).encode())
            plot_metrics(rows, out / PLOT_FILE)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"model/{k}", v, t + 1)
        if d.world > 1:
            dist.barrier()

    if writer is not None:
        writer.close()
    result = {"windows": rows, "summary": summarise(rows), "train_config": asdict(cfg)}
    if d.main:
        _print_table(rows)
    return result


def _run_window(
    cfg: TrainConfig,
    d: _Dist,
    t: int,
    schema: dict,
    model: SessionModel,
    step_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    counts: BaselineCounts | None,
    writer: Any,
) -> dict:
    data = Path(cfg.data)
    train_path, eval_path = split_path(data, t, "train"), split_path(data, t + 1, "valid")
    train_st = load_split(train_path, schema)
    row: dict[str, Any] = {
        "train_window": t,
        "eval_window": t + 1,
        "train_sessions": len(train_st),
        "epochs": cfg.epochs,
    }
    item = model.cfg.item_feature
    fit_st, held_st = split_holdout(train_st, cfg.holdout, _seed(cfg.seed, t, 4))
    before = [w for w in available_windows(data, schema) if w < t]
    need_earlier = model.item_memory is not None or cfg.train_on == "cumulative"
    earlier = {w: load_split(split_path(data, w, "train"), schema) for w in before} if need_earlier else {}
    if model.item_memory is not None and len(train_st):
        # counts of every earlier window's training sessions + the sessions fitted now, not the
        # held-back ones (early stopping scores them as unseen sessions); after training the
        # held-back ones are counted too (below)
        set_memory(model, [*earlier.values(), fit_st])
    if cfg.train_on == "cumulative" and len(fit_st):
        fit_st = concat_sessions([*(earlier[w] for w in before if w >= cfg.start_window), fit_st])
    row.update(fit_sessions=len(fit_st), holdout_sessions=len(held_st))

    if len(train_st) == 0:
        warnings.warn(
            f"window {t}: {train_path} has no sessions; skipping training on window {t}", stacklevel=2
        )
        row.update(sessions_trained=0, train_seconds=0.0, skipped=f"no sessions in {train_path}")
    else:
        row.update(
            _train_window(
                cfg, d, t, fit_st, model, step_module, optimizer, scaler, device, amp_dtype, held_st
            )
        )
    if counts is not None and len(train_st):
        counts.add_sessions(train_st.feats[item].numpy(), train_st.lengths.numpy())
    if model.item_memory is not None and len(train_st):
        set_memory(model, [*earlier.values(), train_st])  # every training session of windows <= t

    if d.main and cfg.evaluate:
        eval_st = load_split(eval_path, schema)
        row["eval_sessions"] = len(eval_st)
        if len(eval_st) == 0:
            warnings.warn(
                f"window {t + 1}: {eval_path} has no sessions; window {t} is not evaluated", stacklevel=2
            )
        else:
            t0 = time.perf_counter()
            row.update(evaluate_model(model, eval_st, device, cfg.eval_batch_size))
            row["eval_seconds"] = time.perf_counter() - t0
            if counts is not None:
                feats, lengths, targets = eval_inputs_targets(eval_st, item)
                row["baselines"] = evaluate_baselines(
                    counts, feats[item].numpy(), lengths.numpy(), targets.numpy()
                )
            msg = " ".join(f"{k}={row[k]:.4f}" for k in ("ndcg@20", "recall@20", "mrr@20"))
            if "baselines" in row:
                msg += " | " + " ".join(
                    f"{b}:ndcg@20={row['baselines'][b]['ndcg@20']:.4f}" for b in BASELINES
                )
            print(f"[train] window {t}->{t + 1}: {msg}", file=sys.stderr)
    return row


def _train_window(
    cfg: TrainConfig,
    d: _Dist,
    t: int,
    st: SessionTensors,
    model: SessionModel,
    step_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    held: SessionTensors | None = None,
) -> dict:
    """Train on `st` for cfg.epochs epochs, or fewer with early stopping on `held`.

    With cfg.patience > 0 and a non-empty `held` (sessions of the training window
    that are not in `st`), the model is scored after every epoch on `held` with
    the evaluation protocol (NDCG@20 of the last item); training stops after
    `patience` epochs without improvement and the best epoch's weights are kept.
    """
    from tqdm import tqdm

    n = len(st)
    # Every rank shuffles identically (same seed) and takes its share of each global batch.
    shuffle_gen = torch.Generator().manual_seed(_seed(cfg.seed, t, 1))
    mask_gen = torch.Generator().manual_seed(_seed(cfg.seed, t, 2, d.rank))
    torch.manual_seed(_seed(cfg.seed, t, 3, d.rank))  # dropout
    bounds = list(range(0, n, cfg.batch_size))
    if len(bounds) > 1 and n - bounds[-1] < d.world:  # every rank needs >= 1 session per step
        bounds.pop()
    bounds.append(n)
    steps_per_epoch = len(bounds) - 1
    total = steps_per_epoch * cfg.epochs
    for group in optimizer.param_groups:
        # base_lr: this group's learning rate (absent in optimizer states written before the memory)
        group["lr"] = group["initial_lr"] = group.get("base_lr", cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(total, cfg.cycles_per_epoch * cfg.epochs)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    item = model.cfg.item_feature
    mlm = model.cfg.objective == "mlm"
    model.train()
    bar = tqdm(
        total=total, desc=f"window {t}", disable=not (cfg.progress and d.main), leave=False, file=sys.stderr
    )
    loss_sum = torch.zeros((), device=device)
    early = cfg.patience > 0 and held is not None and len(held) > 0
    best_score, best_epoch, best_state, best_scale = -1.0, -1, None, 1.0
    select_head = early and cfg.head_selection and model.item_memory is not None
    held_no_head: list[float] = []
    if model.item_memory is not None:
        model.item_memory.head_scale.fill_(1.0)  # training always uses the head; chosen again below
    held_scores: list[float] = []
    epochs_run = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=shuffle_gen)
        loss_sum.zero_()
        for b in range(steps_per_epoch):
            idx = perm[bounds[b] : bounds[b + 1]][d.rank :: d.world]
            feats, lengths = _batch(st, idx)  # CPU, (b, max length in the batch)
            masked = None
            if mlm:  # drawn on the CPU generator: the same on any device, exact on resume
                masked = mask_positions(feats[item], lengths, model.cfg.mask_prob, mask_gen).masked
            packed = pack_sessions(feats, lengths, masked)  # several sessions per row, no compute on padding
            if device.type != "cpu":
                packed = _to_device(packed, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = step_module(packed)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach()
            bar.update(1)
        epochs_run = epoch + 1
        bar.set_postfix(loss=f"{float(loss_sum) / steps_per_epoch:.3f}")
        if early:  # every rank scores the same held-back sessions: the same decision everywhere
            score = evaluate_model(model, held, device, cfg.eval_batch_size)["ndcg@20"]
            scale = 1.0
            if select_head:  # the same weights without the head's own item logits (gated counts only)
                assert model.item_memory is not None
                model.item_memory.head_scale.fill_(0.0)
                without = evaluate_model(model, held, device, cfg.eval_batch_size)["ndcg@20"]
                model.item_memory.head_scale.fill_(1.0)
                held_no_head.append(without)
                if without > score:
                    score, scale = without, 0.0
            model.train()
            held_scores.append(score)
            if score > best_score:
                best_score, best_epoch, best_scale = score, epoch, scale
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= cfg.patience:
                break
    if early and best_state is not None:
        model.load_state_dict(best_state)
        if select_head:
            assert model.item_memory is not None
            model.item_memory.head_scale.fill_(best_scale)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    bar.close()
    out = {
        "sessions_trained": n * epochs_run,
        "train_seconds": seconds,
        "train_sessions_per_second": n * epochs_run / seconds,
        "train_loss_last_epoch": float(loss_sum) / steps_per_epoch,
        "steps": steps_per_epoch * epochs_run,
        "epochs_run": epochs_run,
        "_scheduler": scheduler.state_dict(),  # popped into optim.pt, not a metric
    }
    if early:
        out.update(best_epoch=best_epoch + 1, holdout_ndcg20_per_epoch=held_scores)
    if select_head:
        out.update(head_scale=best_scale, holdout_ndcg20_without_head_per_epoch=held_no_head)
    return out


def set_memory(model: SessionModel, sessions: list[SessionTensors]) -> None:
    """Fill the model's ItemMemory tables with the counts of `sessions` (the same counts as the baselines)."""
    assert model.item_memory is not None
    counts = BaselineCounts(model.cfg.n_items)
    item = model.cfg.item_feature
    for st in sessions:
        if len(st):
            counts.add_sessions(st.feats[item].numpy(), st.lengths.numpy())
    dev = model.item_memory.pop.device
    tables = memory_tables(counts, model.cfg.memory_k)
    model.item_memory.set_tables(**{k: torch.from_numpy(v).to(dev) for k, v in tables.items()})


def split_holdout(st: SessionTensors, fraction: float, seed: int) -> tuple[SessionTensors, SessionTensors]:
    """(fit, held): a random `fraction` of the sessions held back (at least 1 when fraction > 0 and N >= 2)."""
    n = len(st)
    k = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return st.select(perm[k:].sort().values), st.select(perm[:k].sort().values)


def concat_sessions(parts: list[SessionTensors]) -> SessionTensors:
    """Sessions of several splits in one SessionTensors (padded to the widest)."""
    parts = [p for p in parts if len(p)]
    width = max(next(iter(p.feats.values())).shape[1] for p in parts)

    def pad(v: Tensor) -> Tensor:
        return nn.functional.pad(v, (0, width - v.shape[1]))

    return SessionTensors(
        {k: torch.cat([pad(p.feats[k]) for p in parts]) for k in parts[0].feats},
        torch.cat([p.lengths for p in parts]),
        torch.cat([p.session_id for p in parts]),
        parts[-1].source,
    )


def _print_table(rows: list[dict]) -> None:
    head = f"{'window':>9} {'ndcg@20':>8} {'recall@20':>9} {'mrr@20':>7} " + " ".join(
        f"{b + ' ndcg@20':>22}" for b in BASELINES
    )
    print(head, file=sys.stderr)
    for r in rows:
        if r.get("eval_sessions", 0) == 0:
            print(f"{r['train_window']:>4}->{r['eval_window']:<4} (skipped)", file=sys.stderr)
            continue
        line = f"{r['train_window']:>4}->{r['eval_window']:<4} {r['ndcg@20']:8.4f} {r['recall@20']:9.4f} {r['mrr@20']:7.4f} "
        if "baselines" in r:
            line += " ".join(f"{r['baselines'][b]['ndcg@20']:22.4f}" for b in BASELINES)
        print(line, file=sys.stderr)


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


# flags whose default depends on the recipe (None = not given on the command line)
_RECIPE_FLAGS = (
    "epochs",
    "lr",
    "memory_lr",
    "head_selection",
    "weight_decay",
    "cycles_per_epoch",
    "train_on",
    "holdout",
    "patience",
    "label_smoothing",
)
# ModelConfig fields settable from the command line or a --config file
MODEL_FLAGS = (
    "objective",
    "memory",
    "memory_k",
    "mask_prob",
    "embedding_dim",
    "d_model",
    "n_head",
    "n_layer",
    "d_inner",
    "dropout",
)


def load_params(path: str | Path) -> dict[str, Any]:
    """A --config JSON file (as `python -m training.tune` writes): TrainConfig fields, "model" overrides.

    Accepts {"params": {...}} (tune's output) or a flat {...}; model fields may sit at
    the top level or under "model".
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"--config {path}: cannot read a JSON object ({e})") from e
    raw = raw.get("params", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise RunError(f"--config {path}: expected a JSON object of settings, got {type(raw).__name__}")
    out: dict[str, Any] = {"model": dict(raw.get("model", {}))}
    allowed = set(_RECIPE_FLAGS) | {"batch_size", "max_grad_norm", "recipe"}
    for k, v in raw.items():
        if k == "model":
            continue
        if k in MODEL_FLAGS:
            out["model"][k] = v
        elif k in allowed:
            out[k] = v
        else:
            raise RunError(
                f"--config {path}: unknown setting {k!r}; expected one of {sorted(allowed | set(MODEL_FLAGS))}"
            )
    return out


def resolve_settings(
    schema: dict[str, Any],
    recipe: str = "auto",
    params: dict[str, Any] | None = None,
    cli: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Recipe defaults < --config file < explicit command-line flags. Returns TrainConfig kwargs."""
    name = recipe
    if name == "auto":  # a config file names the recipe it was tuned on (training.tune: "real")
        name = str((params or {}).get("recipe") or default_recipe(schema))
    if name not in RECIPES:
        raise RunError(f"--recipe must be auto, {' or '.join(RECIPES)}, got {recipe!r}")
    out = {k: v for k, v in RECIPES[name].items() if k != "model"}
    model = dict(RECIPES[name]["model"])
    for layer in (params or {}, cli or {}):
        for k, v in layer.items():
            if k == "model":
                model.update({mk: mv for mk, mv in v.items() if mv is not None})
            elif v is not None and k != "recipe":
                out[k] = v
    out["model"] = model
    out["recipe"] = name if not params else f"{name}+config"
    return out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="DATA folder written by `python -m training.prepare`")
    p.add_argument("--out", required=True, help="RUN folder for checkpoints, metrics.json and metrics.png")
    p.add_argument("--start-window", type=int, default=1, help="first window to train on")
    p.add_argument(
        "--end-window", type=int, default=8, help="train on windows start..END-1, evaluating each t on t+1"
    )
    p.add_argument(
        "--recipe",
        choices=["auto", *RECIPES],
        default="auto",
        help="defaults of the recipe flags below: auto = reference for synthetic data "
        "(schema source 'synthetic'), real for a click log prepared from --input",
    )
    p.add_argument(
        "--config",
        "--params",
        dest="config",
        default=None,
        help="JSON of settings (as written by `python -m training.tune`); explicit flags win",
    )
    p.add_argument("--epochs", type=int, default=None, help="(max) epochs per window [reference 5, real 20]")
    p.add_argument(
        "--batch-size", type=int, default=128, help="global training batch size (split across ranks)"
    )
    p.add_argument("--eval-batch-size", type=int, default=1024, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate [reference 5e-4, real 1e-3]")
    p.add_argument(
        "--weight-decay", type=float, default=None, help="AdamW weight decay [reference 0, real 0.1]"
    )
    p.add_argument(
        "--memory-lr",
        type=float,
        default=None,
        help="learning rate of the item memory's gates (0 = --lr) [reference 0, real 1e-2]",
    )
    p.add_argument(
        "--cycles-per-epoch",
        type=float,
        default=None,
        help="cosine LR cycles per epoch, 0 = constant LR [reference 1.5, real 0]",
    )
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    p.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default=None,
        help="window: window t only; cumulative: every window <= t [reference window, real cumulative]",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=None,
        help="fraction of window t's training sessions held back for early stopping [reference 0, real 0.1]",
    )
    p.add_argument(
        "--early-stopping",
        "--patience",
        dest="patience",
        type=int,
        default=None,
        help="stop after N epochs without a better held-back NDCG@20, keep the best (0 = off) "
        "[reference 0, real 2]",
    )
    p.add_argument("--label-smoothing", type=float, default=None, help="label smoothing [both 0]")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation, shuffling, masking and dropout"
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N; cuda uses AMP"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads per process (0 = cores / local processes)"
    )
    p.add_argument("--resume", action="store_true", help="continue after the last finished window in --out")
    p.add_argument("--no-baselines", action="store_true", help="skip the popular / kNN baselines")
    p.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard logs to RUN/tensorboard"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument(
        "--objective",
        choices=["mlm", "clm"],
        default=None,
        help="masked LM or causal LM [reference mlm, real clm]",
    )
    p.add_argument("--mask-prob", type=float, default=None, help="mlm: probability that a position is masked")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="item memory: co-occurrence / successor / repeat / popularity counts of the training "
        "sessions added to the logits through learned gates (training/model.py ItemMemory) "
        "[reference off, real on]",
    )
    p.add_argument("--memory-k", type=int, default=None, help="item memory: neighbours kept per item [100]")
    p.add_argument(
        "--head-selection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="item memory + early stopping: per window, keep the head's own item logits only if the "
        "held-back training sessions score better with them than with the gated counts alone [off]",
    )
    for name, typ in (
        ("embedding-dim", int),
        ("d-model", int),
        ("n-head", int),
        ("n-layer", int),
        ("d-inner", int),
        ("dropout", float),
    ):
        p.add_argument(
            f"--{name}", type=typ, default=None, help=f"model {name.replace('-', '_')} (default: ModelConfig)"
        )
    a = p.parse_args(argv)
    try:
        schema = load_schema(a.data)
    except DataError:
        # no readable DATA/schema.json: nothing says it is a real log; `train` reports the
        # missing data itself, with its own message
        schema = {"source": "synthetic"}
    params = load_params(a.config) if a.config else None
    cli = {k: getattr(a, k) for k in _RECIPE_FLAGS}
    cli["model"] = {k: getattr(a, k) for k in MODEL_FLAGS}
    settings = resolve_settings(schema, a.recipe, params, cli)
    extra = {k: settings.pop(k) for k in ("batch_size", "max_grad_norm") if k in settings}
    return TrainConfig(
        data=a.data,
        out=a.out,
        start_window=a.start_window,
        end_window=a.end_window,
        batch_size=extra.get("batch_size", a.batch_size),
        eval_batch_size=a.eval_batch_size,
        max_grad_norm=extra.get("max_grad_norm", a.max_grad_norm),
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        resume=a.resume,
        baselines=not a.no_baselines,
        tensorboard=a.tensorboard,
        progress=not a.no_progress,
        **settings,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, output folder gone or read-only while training
        where = f": {e.filename}" if e.filename else ""
        print(
            f"error: cannot write the run ({e.strerror or e}{where}); the last finished window's checkpoint "
            "is intact: free space or fix the folder, then rerun with --resume",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
