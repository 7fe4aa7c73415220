"""The training state of a run and the steps of a window (the protocol: training/train.py).

`Trainer(cfg, dist)` holds everything a window needs on `self`: the config,
the process's place in a torchrun job, the device and AMP dtype, the schema,
the model, optimizer, gradient scaler, the (DDP-wrapped) training step, the
baselines' counts, the TensorBoard writer and the metrics rows so far.
Evaluation is training/evaluate.py, what a run reports training/report.py.

A fresh start and a resume share their set-up (torchtune's recipe): `__init__`
finds the checkpoint to continue (`_resume_point`), builds the model at its size
once (`_setup_model`) and its optimizers (`_setup_optimizers`); `restore` then
only loads their states.

Large catalogues (loss "sampled", training/model/sampled.py): the item table's gradient
is sparse, so it gets its own torch.optim.SparseAdam (lr, no weight decay;
lazy: only the rows a step touched move, but its two moment buffers are dense,
2 x the table) beside the AdamW of every other parameter; gradients are clipped
over the dense parameters only; both optimizers and schedules step together and
both states are in optim.pt. The negatives are drawn from a per-window, per-rank
seeded generator (exact --resume) with the item counts of the sessions trained
on (`set_sample_counts`; the item memory's `pop` table when it is on).
`run()` is the whole protocol; its steps are the methods:

    restore()        --resume: weights, optimizer and rows of the last finished window
    run_window(t)    grow the tables to window t's vocabulary, load window t, fill the item memory,
                     fit, evaluate on t+1 -> metrics row
    fit(t, st, held) the epoch loop (early stopping on `held`, head selection, stacking: stacking.py)
    evaluate(t, row) model, baselines and the count blend on window t+1's --eval-split (valid),
                     with only what was known after window t (training/evaluate.py)
    save(t, row)     checkpoint + metrics.json after window t (metrics.png once, at the end of `run`)
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.baselines import BaselineCounts
from training.checkpoint import (
    META_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    WINDOWS_DIR,
    RunError,
    check_writable,
    read_meta,
    recover_checkpoint,
    save_checkpoint,
)
from training.config import TrainConfig, check_model
from training.data.splits import (
    SessionTensors,
    available_windows,
    concat_sessions,
    load_schema,
    load_split,
    newest,
    split_path,
)
from training.evaluate import (
    differs_from_exact,
    evaluate_sessions,
    score_held,
    split_holdout,
)
from training.forward_check import (
    ForwardCheck,
    GuardCheck,
    check_next_window,
    hold_curve,
    resume_stacked,
    serve_blend,
)
from training.history import WindowHistory, set_memory, set_sample_counts  # noqa: F401 (set_memory: tests)
from training.integrity import atomic_write
from training.item_init import init_item_rows
from training.model import ModelConfig, PackedSessions, SessionModel, pack_sessions
from training.model.choice import explain
from training.model.repeats import set_revisit_prior
from training.names import AGE_COL, FIRST_REAL_ID, RANKS_DIR, list_col
from training.optim import RowSparseAdam, pad_optimizer_state
from training.report import METRICS_FILE, PLOT_FILE, plot_metrics, print_table, summarise, window_line
from training.runtime import Dist, amp_dtype, barrier, check_replicas_in_sync, resolve_device, set_threads
from training.schema import Schema
from training.scorer_fit import ScorerState, fit_scorer
from training.stacking import blend_guard, guard_sessions, stack_choice, stack_memory

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
    """forward = training loss of packed rows, so that DistributedDataParallel can wrap it.

    generator: the sampled loss's negatives (per window and rank, as the masking); unused by the full loss.
    """

    def __init__(self, model: SessionModel, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, packed: PackedSessions, generator: torch.Generator | None = None) -> Tensor:
        return self.model.packed_loss(packed, self.label_smoothing, generator)


# -----------------------------------------------------------------------------
# The run
# -----------------------------------------------------------------------------


class Trainer:
    """A run's training state (see the module docstring); `run()` trains windows start..end-1."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.dist = cfg, d
        self.device = resolve_device(cfg.device, d)
        set_threads(self.device, cfg.threads, d)
        if cfg.end_window <= cfg.start_window:
            raise ValueError(
                f"--end-window ({cfg.end_window}) must be greater than --start-window ({cfg.start_window})"
            )
        self.amp_dtype = amp_dtype(self.device)
        self.out, self.data = Path(cfg.out), Path(cfg.data)
        self.schema = load_schema(self.data)
        self.vocab = Schema.of(self.schema)  # typed view: vocabulary sizes per window
        full = cfg.model.with_schema(self.schema)  # resolves loss="auto" on the whole vocabulary
        check_model(full, cfg.label_smoothing, cfg.repeat_reweight)
        self.choices = explain(cfg.model, full)  # loss / rank "auto": what was picked and why (meta.json)
        self.n_items_all = full.n_items  # the baselines' count tables span every id
        age = list_col(AGE_COL)
        # the item age derived by the workflow (real logs): 0 for an item the served workflow does not know
        self.age_feature = age if age in full.continuous and AGE_COL not in self.vocab.raw_inputs else None
        if d.main:
            check_writable(self.out)
            recover_checkpoint(self.out)
        barrier(d)
        # the tables start at the vocabulary known after the first window trained and grow window by
        # window; a resumed run starts at its checkpoint's
        mcfg = self._config_at(full, self.known_sizes(cfg.start_window))
        self.resume_meta = self._resume_point(mcfg)
        if self.resume_meta is not None:
            mcfg = replace(mcfg, categorical=self.resume_meta["model_config"]["categorical"])
        self.rows: list[dict] = []  # metrics row of every finished window
        self.first = cfg.start_window  # first window still to train
        self.scheduler_state: dict[str, Any] = {}  # the last window's LR schedule, saved to optim.pt
        self.counts: BaselineCounts | None = None
        # earlier windows' training splits, read once, and the item memory's running counts
        keep = full.memory or cfg.train_on == "cumulative"
        self.history = WindowHistory(
            self.data, self.schema, full.item_feature, self.age_feature, full.n_items, keep,
            decay=full.memory_window_decay,
        )  # fmt: skip
        self.writer: Any = None
        # forward checks (forward_check.py): the curve's and the guard's so far, the stacking not loaded in
        # the last fit, and the stacked combiner set aside while the count blend serves (a fallback); the
        # candidate scorer's pool of forward sessions and check (scorer_fit.py)
        self.check, self.other_combiner, self.guard, self.guard_combiner = ForwardCheck(), None, GuardCheck(), None
        self.scorer = ScorerState()
        torch.manual_seed(cfg.seed)
        self._setup_model(mcfg)
        self._setup_optimizers()

    # --- set-up: shared by a fresh start and --resume ---------------------------------

    def _setup_model(self, mcfg: ModelConfig) -> None:
        """The model with `mcfg` on the device, and its training step (DDP wraps it in `run`)."""
        self.mcfg = mcfg
        self.model = SessionModel(mcfg).to(self.device)
        self.step_module: nn.Module = _TrainStep(self.model, self.cfg.label_smoothing)

    def _setup_optimizers(self) -> None:
        """AdamW over the dense parameters (`SessionModel.param_groups`): the network (lr,
        weight_decay) and the item memory's gates (memory_lr, no decay); SparseAdam over the item
        table when its gradient is sparse (loss "sampled"; lr, no weight decay: it has none; its
        two moment buffers are dense, 2 x the table: 512 MB at 1M x 64); the gradient scaler."""
        cfg, model = self.cfg, self.model
        dense, sparse = model.param_groups()
        mem_params = [p for n, p in dense.items() if n.startswith("item_memory.")]
        mem_ids = {id(p) for p in mem_params}
        groups = [
            {
                "params": [p for p in dense.values() if id(p) not in mem_ids],
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
            }
        ]
        if mem_params:  # a handful of gate weights: their own (higher) learning rate, no decay
            groups.append({"params": mem_params, "lr": cfg.memory_lr or cfg.lr, "weight_decay": 0.0})
        for g in groups:
            g["base_lr"] = g["lr"]
        # fused: one kernel for all parameters (measured 0.3 ms vs 2.1 ms per CPU step for the for-loop default)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
        self.sparse_optimizer: torch.optim.Optimizer | None = None
        if sparse:
            self.sparse_optimizer = RowSparseAdam(list(sparse.values()), lr=cfg.lr)  # SparseAdam on rows
            for g in self.sparse_optimizer.param_groups:
                g["base_lr"] = g["lr"]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _resume_point(self, mcfg: ModelConfig) -> dict[str, Any] | None:
        """meta.json of the checkpoint in `out` to continue (--resume), None for a fresh start.

        A checkpoint without --resume is an error, and so is one whose model config differs from
        `mcfg` other than by its tables' sizes (grown to a later window's vocabulary)."""
        cfg, out = self.cfg, self.out
        has_ckpt = (out / META_FILE).exists()
        if has_ckpt and not cfg.resume:
            raise RunError(
                f"{out} already holds a checkpoint ({META_FILE}); pass --resume to continue it or choose another --out"
            )
        if not has_ckpt:
            return None
        meta = read_meta(out, recover=self.dist.main)
        # as configs: a meta.json written before a field existed takes its default (from_dict)
        saved = ModelConfig.from_dict(meta["model_config"])
        mine = mcfg
        if set(saved.categorical) == set(mcfg.categorical):
            mine = replace(mcfg, categorical=saved.categorical)
        if saved != mine:
            raise RunError(
                f"--resume: the model config in {out / META_FILE} differs from this run's "
                f"({meta['model_config']} vs {mine.to_dict()}); use the same --data and model flags"
            )
        return meta

    def restore(self) -> None:
        """--resume: weights, optimizer state and metrics rows of the last finished window in `out`
        (the model and optimizers were built at the checkpoint's size: `_resume_point`)."""
        meta, out, main = self.resume_meta, self.out, self.dist.main
        if meta is None:
            if self.cfg.resume and main:
                print(
                    f"[train] --resume: no checkpoint in {out} yet, starting from window {self.first}",
                    file=sys.stderr,
                )
            return
        self.model.load_state_dict(torch.load(out / MODEL_FILE, map_location=self.device, weights_only=True))
        ostate = torch.load(out / OPTIM_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(ostate["optimizer"])
        if self.sparse_optimizer is not None:
            if "sparse_optimizer" not in ostate:
                raise RunError(
                    f"--resume: {out / OPTIM_FILE} has no SparseAdam state for the item table "
                    "(written by a full-loss run?); use the same --loss as the run being resumed"
                )
            self.sparse_optimizer.load_state_dict(ostate["sparse_optimizer"])
        if "scaler" in ostate and self.scaler.is_enabled():
            self.scaler.load_state_dict(ostate["scaler"])
        self.rows = list(meta["metrics"]["windows"])
        self.check, self.guard = ForwardCheck.from_rows(self.rows), GuardCheck.from_rows(self.rows)
        self.scorer = ScorerState.restore(out, self.rows)
        self.guard_combiner = ostate.get("guard_combiner")
        self.first = int(meta["window"]) + 1
        if main:
            print(f"[train] resuming {out} after window {meta['window']}", file=sys.stderr)

    # --- the vocabulary known after window t (issue 12) ------------------------------

    def known_sizes(self, t: int) -> dict[str, int]:
        """Ids known after window t per categorical feature (special ids included)."""
        return self.vocab.known_sizes(t)

    @staticmethod
    def _config_at(cfg: ModelConfig, sizes: dict[str, int]) -> ModelConfig:
        """`cfg` with tables of `sizes` rows (the item table keeps at least one real id, which
        no input holds while nothing is known: ModelConfig needs one)."""
        sizes = dict(sizes)
        sizes[cfg.item_feature] = max(sizes[cfg.item_feature], FIRST_REAL_ID + 1)
        return replace(cfg, categorical=sizes)

    def grow(self, t: int) -> None:
        """Grow every categorical table (and the memory's tables) to the vocabulary known after
        window t; new rows drawn from a generator seeded by (seed, t), AdamW state padded."""
        target = self._config_at(self.mcfg, self.known_sizes(t)).categorical
        sizes = {k: max(n, self.mcfg.categorical[k]) for k, n in target.items()}
        if sizes == self.mcfg.categorical:
            return
        gen = torch.Generator().manual_seed(_seed(self.cfg.seed, t, 5))
        self.model.grow(sizes, gen)
        self.mcfg = self.model.cfg
        for opt in self._optimizers():
            pad_optimizer_state(opt, self.model)
        if self.dist.world > 1:  # DDP's buckets were laid out for the old sizes
            self.step_module = _TrainStep(self.model, self.cfg.label_smoothing)
            self._wrap_ddp()

    # --- the run -----------------------------------------------------------------

    def _wrap_ddp(self) -> None:
        if self.dist.world > 1:
            # broadcast_buffers off: the only buffers are the item memory's count tables (tens of MB),
            # which every rank builds identically from the same data (`set_memory`); broadcasting
            # them before every step would cost more than the step
            dev = self.device
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                broadcast_buffers=False,
            )

    def _count_earlier_windows(self) -> None:
        """The baselines' counts: training sessions of every window before the first one trained here."""
        if not (self.cfg.baselines and self.dist.main):
            return
        self.counts = BaselineCounts(self.n_items_all)
        for w in [w for w in available_windows(self.data, self.schema) if w < self.first]:
            st = self.history.raw(w)
            if len(st):
                self.counts.add_sessions(st.feats[self.mcfg.item_feature].numpy(), st.lengths.numpy())

    def _open_writer(self) -> None:
        if self.cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RunError(
                    "--tensorboard needs the `tensorboard` package (pip install tensorboard)"
                ) from e
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def run(self) -> dict[str, Any]:
        """Every window from the first unfinished one; returns the metrics.json content."""
        self.restore()
        if self.dist.main:
            for name, c in self.choices.items():
                print(f"[train] {name} {c['value']}: {c['reason']}", file=sys.stderr)
        self._wrap_ddp()
        self._count_earlier_windows()
        self._open_writer()
        for t in range(self.first, self.cfg.end_window):
            row = self.run_window(t)
            if self.dist.world > 1:
                check_replicas_in_sync(self.model, self.dist)
            self.rows.append(row)
            if self.dist.main:
                self.save(t, row)
            barrier(self.dist)
        if self.writer is not None:
            self.writer.close()
        result = self.result()
        if self.dist.main:
            # once per run, not per window (matplotlib: ~1 s to import, 0.3-0.5 s per figure)
            plot_metrics(self.rows, self.out / PLOT_FILE)
            print_table(self.rows)
        return result

    def result(self) -> dict[str, Any]:
        return {"windows": self.rows, "summary": summarise(self.rows), "train_config": self.cfg.to_dict()}

    def run_window(self, t: int) -> dict[str, Any]:
        """Train on window t (and, cumulative, the earlier ones), evaluate on t+1: the metrics row."""
        # the item rows trained before this window (cfg.item_init starts the others); none before the first
        trained = any(r.get("sessions_trained") for r in self.rows)
        old_items = self.mcfg.n_items if trained else FIRST_REAL_ID
        resume_stacked(self)  # a window whose model served as the count blend: training goes on from its own
        self.grow(t)  # the tables hold the vocabulary known after window t
        cfg, data, schema, model = self.cfg, self.data, self.schema, self.model
        self.scheduler_state = {}
        train_path = split_path(data, t, "train")
        known = self.known_sizes(t)
        item_f = model.cfg.item_feature
        history = self.history
        # ids follow first appearance, so window <= t sessions hold known ids only; values that
        # reach --freq-threshold later are OOV until then (no-op without a threshold)
        train_st = history.known(history.raw(t), known)
        row: dict[str, Any] = {
            "train_window": t,
            "eval_window": t + 1,
            "train_sessions": len(train_st),
            "epochs": cfg.epochs,
            "items_known": known[item_f],  # vocabulary after window t, special ids included
        }
        item = model.cfg.item_feature
        fit_st, held_st = split_holdout(train_st, cfg.holdout, _seed(cfg.seed, t, 4))
        before = [w for w in available_windows(data, schema) if w < t]
        if model.item_memory is not None and len(train_st):
            # counts of every earlier window's training sessions + the sessions fitted now, not the
            # held-back ones (early stopping scores them as unseen sessions); after training the
            # held-back ones are counted too (below)
            history.fill_memory(model, t, before, known, fit_st)
            if cfg.item_init == "cooc":
                row["item_rows_from_counts"] = init_item_rows(model, old_items, _seed(cfg.seed, t, 7))
        windows = [w for w in before if w >= cfg.start_window]
        pool, pooled = None, cfg.stack_pool > 0 and cfg.stack > 0 and cfg.holdout > 0
        if pooled:  # earlier windows' held-back slices stay out of the network
            earlier_fit, pool = self._split_earlier(windows, known)
            row["stack_pool_sessions"] = 0 if pool is None else len(pool)
        if cfg.train_on == "cumulative" and len(fit_st):
            earlier = earlier_fit if pooled else list(history.sessions(windows, known).values())
            fit_st = concat_sessions(newest([*earlier, fit_st], cfg.train_budget))
        row.update(fit_sessions=len(fit_st), holdout_sessions=len(held_st))
        set_sample_counts(model, fit_st)
        if cfg.repeat_reweight and len(fit_st):  # the fit's target weights (training.model.repeats)
            row.update(set_revisit_prior(model, fit_st, torch.Generator().manual_seed(_seed(cfg.seed, t, 9))))

        if len(train_st) == 0:
            warnings.warn(
                f"window {t}: {train_path} has no sessions; skipping training on window {t}", stacklevel=2
            )
            row.update(sessions_trained=0, train_seconds=0.0, skipped=f"no sessions in {train_path}")
        else:
            # TrainConfig.stack_lag: the earlier windows' counts, counted when stacking starts
            lag = (lambda: history.counts_of(before, t, known)) if cfg.stack_lag and before else None
            row.update(self.fit(t, fit_st, held_st, pool, lag))
        if self.counts is not None and len(train_st):
            self.counts.add_sessions(train_st.feats[item].numpy(), train_st.lengths.numpy())
        if model.item_memory is not None and len(train_st):
            history.fill_memory(model, t, before, known, held_st)  # every training session of windows <= t
        history.close_window(t)
        row.update(fit_scorer(self, t))  # the candidate scorer on the forward sessions so far ({} without)

        if self.dist.main and cfg.evaluate:
            self.evaluate(t, row)
        row.update(check_next_window(self, t, row))  # after the evaluation; {} where nothing to check
        return row

    def _split_earlier(
        self, windows: list[int], known: dict[str, int]
    ) -> tuple[list[SessionTensors], SessionTensors | None]:
        """TrainConfig.stack_pool: the earlier `windows`' fitted parts, oldest first, and the
        newest stack_pool of their held-back parts (`WindowHistory.held_apart`)."""
        cfg = self.cfg
        fits, helds = self.history.held_apart(windows, known, cfg.holdout, lambda w: _seed(cfg.seed, w, 4))
        helds = [h for h in helds if len(h)]
        if not helds:  # no earlier window held any session back
            return fits, None
        pool = concat_sessions(helds)
        if len(pool) > cfg.stack_pool:  # the newest ones (a split's rows follow time, see `newest`)
            pool = pool.select(torch.arange(len(pool) - cfg.stack_pool, len(pool)))
        return fits, pool

    def fit(
        self,
        t: int,
        st: SessionTensors,
        held: SessionTensors | None = None,
        pool: SessionTensors | None = None,
        lag: Callable[[], BaselineCounts] | None = None,
    ) -> dict[str, Any]:
        """Train on `st` for cfg.epochs epochs, or fewer with early stopping on `held`; `lag`: builds
        the counts stacking reads (TrainConfig.stack_lag), called only if stacking runs.

        With cfg.patience > 0 and a non-empty `held` (sessions of the training window
        that are not in `st`), the model is scored after every epoch on `held` with
        the evaluation protocol (NDCG@20 of the last item); training stops after
        `patience` epochs without improvement and the best epoch's weights are kept.
        The LR schedule's final state is left in `self.scheduler_state` (optim.pt).
        """
        from tqdm import tqdm

        cfg, d, model, device = self.cfg, self.dist, self.model, self.device
        optimizers = self._optimizers()
        n = len(st)
        # Every rank shuffles identically (same seed) and takes its share of each global batch.
        shuffle_gen = torch.Generator().manual_seed(_seed(cfg.seed, t, 1))
        mask_gen = torch.Generator().manual_seed(_seed(cfg.seed, t, 2, d.rank))
        torch.manual_seed(_seed(cfg.seed, t, 3, d.rank))  # dropout
        # the sampled loss's negatives: on the CPU like the masking, so the same on any device
        neg_gen = (
            torch.Generator().manual_seed(_seed(cfg.seed, t, 5, d.rank))
            if model.cfg.loss == "sampled"
            else None
        )
        bounds = list(range(0, n, cfg.batch_size))
        if len(bounds) > 1 and n - bounds[-1] < d.world:  # every rank needs >= 1 session per step
            bounds.pop()
        bounds.append(n)
        steps_per_epoch = len(bounds) - 1
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps > 0:
            total = min(total, cfg.max_steps)
        schedulers = self._schedulers(optimizers, total)
        params = list(model.param_groups()[0].values())  # dense: clip_grad_norm_ raises on sparse grads
        item = model.cfg.item_feature
        mlm = model.cfg.objective == "mlm"
        amp = self.amp_dtype
        model.train()
        bar = tqdm(
            total=total,
            desc=f"window {t}",
            disable=not (cfg.progress and d.main),
            leave=False,
            file=sys.stderr,
        )
        loss_sum = torch.zeros((), device=device)
        early = cfg.patience > 0 and held is not None and len(held) > 0
        best_score, best_epoch, best_state, best_scale = -1.0, -1, None, 1.0
        select_head = early and cfg.head_selection and model.item_memory is not None
        held_no_head: list[float] = []
        if model.item_memory is not None:
            model.item_memory.head_scale.fill_(1.0)  # training always uses the head; chosen again below
        held_scores: list[float] = []
        # a model served in two stages scores the held-back sessions as served; where both can run,
        # also exactly, to record which epoch exact ranking would have kept
        held_exact: list[float] | None = (
            []
            if early and differs_from_exact(model) and model.cfg.n_items <= cfg.exact_eval_max_items
            else None
        )
        epochs_run = steps_run = sessions_run = 0
        t0 = time.perf_counter()
        model.hold_ranking_index(True)  # a two-stage index: built once per window by early stopping
        hold_curve(model, cfg.cooc_curve_fit != "joint")  # the curve learned in stacking only
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=shuffle_gen)
            loss_sum.zero_()
            epoch_steps = 0
            for b in range(steps_per_epoch):
                if cfg.max_steps > 0 and steps_run >= cfg.max_steps:
                    break
                idx = perm[bounds[b] : bounds[b + 1]][d.rank :: d.world]
                feats, lengths = st.batch(idx)  # CPU, (b, max length in the batch)
                masked = None
                if mlm:  # drawn on the CPU generator: the same on any device, exact on resume
                    masked = model.draw_masks(feats[item], lengths, mask_gen).masked
                # several sessions per row, no compute on padding
                packed = pack_sessions(feats, lengths, masked)
                if device.type != "cpu":
                    packed = packed.to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = self.step_module(packed, neg_gen)
                self._step(loss, optimizers, schedulers, params)
                loss_sum += loss.detach()
                bar.update(1)
                epoch_steps += 1
                steps_run += 1
                sessions_run += bounds[b + 1] - bounds[b]
            epochs_run = epoch + 1
            bar.set_postfix(loss=f"{float(loss_sum) / max(1, epoch_steps):.3f}")
            if early:  # every rank scores the same held-back sessions: the same decision everywhere
                assert held is not None
                score, scale, without = score_held(model, held, device, cfg.eval_batch_size, select_head)
                if without is not None:
                    held_no_head.append(without)
                if held_exact is not None:
                    exact = score_held(model, held, device, cfg.eval_batch_size, select_head, exact=True)
                    held_exact.append(exact.ndcg20)
                model.train()
                held_scores.append(score)
                if score > best_score:
                    best_score, best_epoch, best_scale = score, epoch, scale
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                elif epoch - best_epoch >= cfg.patience:
                    break
            if cfg.max_steps > 0 and steps_run >= cfg.max_steps:
                break
        model.hold_ranking_index(False)
        hold_curve(model, False)
        if early and best_state is not None:
            model.load_state_dict(best_state)
            if select_head:
                assert model.item_memory is not None
                model.item_memory.head_scale.fill_(best_scale)
        stacked = {}
        if early and cfg.stack > 0 and model.item_memory is not None:  # the combiner on held-back sessions
            assert held is not None
            # early stopping's best score is these weights' score unless a two-stage index changed since
            before = best_score if best_state is not None and not differs_from_exact(model) else None
            counts = None if lag is None else lag()
            # stack(before): stacking on the held-back sessions, the window's seed
            stack = partial(stack_memory, model, held, cfg, _seed(cfg.seed, t, 6), device, amp, pool, lag=counts)
            if cfg.cooc_curve_fit == "choose" and model.item_memory.cooc_curve is not None:  # forward_check.py
                stacked, self.other_combiner = stack_choice(model, self.check, stack, before)
            else:
                stacked = stack(before)
        if early and cfg.blend_guard and model.item_memory is not None:  # the count blend as a floor
            assert held is not None
            if cfg.guard_split == "next":  # the forward check's choice (forward_check.py)
                stacked.update(serve_blend(self))
            else:
                guard_st, miss, known = guard_sessions(self, t, held)
                stacked.update(blend_guard(model, guard_st, device, cfg.eval_batch_size, miss, known))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        bar.close()
        # restarted every window; kept for inspection
        self.scheduler_state = schedulers[0].state_dict()
        if len(schedulers) > 1:
            self.scheduler_state = {**self.scheduler_state, "sparse": schedulers[1].state_dict()}
        out = {
            "sessions_trained": sessions_run, "train_seconds": seconds, "train_sessions_per_second": sessions_run / seconds,
            "train_loss_last_epoch": float(loss_sum) / max(1, epoch_steps), "steps": steps_run, "epochs_run": epochs_run,
        }  # fmt: skip
        if early:
            out.update(best_epoch=best_epoch + 1, holdout_ndcg20_per_epoch=held_scores)
        if held_exact:
            best_exact = max(range(len(held_exact)), key=held_exact.__getitem__)  # the first best
            out.update(best_epoch_exact=best_exact + 1, holdout_ndcg20_exact_per_epoch=held_exact)
        if select_head:
            out.update(head_scale=best_scale, holdout_ndcg20_without_head_per_epoch=held_no_head)
        return {**out, **stacked}

    # --- optimizer step (dense AdamW + the item table's SparseAdam under the sampled loss) ------------

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW over the dense parameters, then SparseAdam over the item table if the loss is sampled."""
        return [self.optimizer] + ([self.sparse_optimizer] if self.sparse_optimizer is not None else [])

    def _schedulers(self, optimizers: list[torch.optim.Optimizer], total: int) -> list[Any]:
        """One cosine LambdaLR per optimizer over `total` steps, every group from its base_lr."""
        cfg = self.cfg
        out = []
        for opt in optimizers:
            for group in opt.param_groups:
                # base_lr: this group's learning rate (absent in optimizer states written before the memory)
                group["lr"] = group["initial_lr"] = group.get("base_lr", cfg.lr)
            out.append(
                torch.optim.lr_scheduler.LambdaLR(
                    opt, cosine_lambda(total, cfg.cycles_per_epoch * cfg.epochs)
                )
            )
        return out

    def _step(
        self,
        loss: Tensor,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        dense: list[Tensor],
    ) -> None:
        """Backward, clip the dense gradients (the sparse item table's are not clipped), step every
        optimizer and its schedule."""
        scaler = self.scaler
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.cfg.max_grad_norm > 0:
            scaler.unscale_(optimizers[0])
            nn.utils.clip_grad_norm_(dense, self.cfg.max_grad_norm)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for sch in schedulers:
            sch.step()

    def evaluate(
        self, t: int, row: dict[str, Any], model: nn.Module | None = None, out: Path | None = None
    ) -> None:
        """Model, baselines and count blend on window t+1's --eval-split, into `row`.

        Only what was known after window t: unknown ids in the inputs are OOV
        (`known_inputs`) and a target unknown at t is a miss for every method.
        model, out: another model than this run's and the run its ranks go to (training/members.py).
        """
        model, out = self.model if model is None else model, self.out if out is None else out
        split = self.cfg.eval_split
        eval_path = split_path(self.data, t + 1, split)
        eval_st = load_split(eval_path, self.schema)
        row["eval_sessions"] = len(eval_st)
        row["eval_split"] = split
        if len(eval_st) == 0:
            warnings.warn(
                f"window {t + 1}: {eval_path} has no sessions; window {t} is not evaluated", stacklevel=2
            )
            return
        known = self.known_sizes(t)
        ranks: dict[str, np.ndarray] | None = {} if self.cfg.save_ranks else None
        row.update(
            evaluate_sessions(
                model,
                eval_st,
                known,
                self.counts,
                self.device,
                self.cfg.eval_batch_size,
                self.age_feature,
                self.cfg.exact_eval_max_items,
                ranks_out=ranks,
                fuse_blend=self.cfg.fuse_blend,
            )
        )
        if ranks:  # per-session ranks beside the metrics (bench.paired); written whole or not at all
            (out / RANKS_DIR).mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, session_id=eval_st.session_id.numpy(), **ranks)
            atomic_write(out / RANKS_DIR / f"window_{t + 1}.npz", buf.getvalue())
        print(window_line(row), file=sys.stderr)

    def save(self, t: int, row: dict[str, Any]) -> None:
        """Checkpoint (model.pt, optim.pt, meta.json) and metrics.json after window t."""
        cfg, out, mcfg = self.cfg, self.out, self.mcfg
        result = self.result()
        meta = {
            "window": t,
            "model_config": mcfg.to_dict(),
            "vocabulary_sizes": dict(mcfg.categorical),  # the tables' rows after window t (they grow)
            "schema": self.schema,
            "workflow_sha256": self.schema.get("workflow_sha256", {}),
            "train_config": cfg.to_dict(),
            "choices": self.choices,
            "metrics": {"windows": self.rows},
        }
        ostate = {
            "optimizer": self.optimizer.state_dict(),
            **(
                {"sparse_optimizer": self.sparse_optimizer.state_dict()}
                if self.sparse_optimizer is not None
                else {}
            ),
            "scheduler": self.scheduler_state,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            **({"guard_combiner": self.guard_combiner} if self.guard_combiner is not None else {}),
            # shuffling/masking/dropout are reseeded from (seed, window) every window,
            # which is what makes --resume exact; the global states are kept for the record
            "rng": {"torch": torch.get_rng_state()}
            | ({"cuda": torch.cuda.get_rng_state_all()} if self.device.type == "cuda" else {}),
        }
        save_checkpoint(out, self.model.state_dict(), ostate, meta)
        if cfg.keep_windows:  # the state after window t, loadable with load_run(RUN/windows/<t>)
            (out / WINDOWS_DIR / str(t)).mkdir(parents=True, exist_ok=True)
            save_checkpoint(out / WINDOWS_DIR / str(t), self.model.state_dict(), {}, meta)
        atomic_write(out / METRICS_FILE, json.dumps(result, indent=2).encode())
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"model/{k}", v, t + 1)
