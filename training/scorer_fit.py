"""The candidate scorer's fit and its forward check (ModelConfig.scorer_hidden, training/model/scorer.py).

The scorer re-ranks the combiner's best candidates with an MLP over their count features. It is
fitted on *forward* sessions only, as serving meets them: after window t (its evaluation made), the
newest TrainConfig.forward_check_sessions of window t+1's training split are scored by the model as it
stands, with the counts of windows <= t (`training.forward_check.check_next_window`), and the scorer's
inputs there (the combiner's best candidates, their features, where the target is among them) join a
pool kept per window in RUN/scorer_pool/w<window>.pt. Before window t's evaluation, the MLP is fitted afresh
(seeded by the run's seed and t) on the newest POOL_SESSIONS of the pool's windows <= t: sessions of
windows the model has trained on, but each scored by a model and counts that had not seen it.
TrainConfig.scorer_prefixes adds, per check, some of the checked sessions' shorter prefixes
(`shorter_prefixes`, scored apart from the check) to the pool: more rows where windows are small.

    out["scorer_check"] = trainer.scorer.add_window(model, seen, t + 1, ...)   # check_next_window
    row.update(fit_scorer(trainer, t))                                          # run_window

The forward check: before a window's sessions join the pool, the scorer fitted so far and the plain
combiner rank them; the per-session NDCG@20 differences of the newest RECENT checks are pooled, and
the scorer serves (`CandidateScorer.on`) from the next fit on while their mean is positive at
z > 1.645, the co-occurrence curve's bar (forward_check.py). Only the newest checks: each window's
scorer is a new fit on a larger pool, and on DIGINETICA the first fits, on a few hundred sessions,
lost to the plain combiner where the later ones won (every check's differences are pooled too, in
the metrics row, for the record). Where the count blend serves (the blend guard),
the scorer is off with it and comes back with the stacked combiner.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.data.splits import SessionTensors, eval_inputs_targets
from training.evaluate import EVAL_PRODUCT_ITEMS, eval_rows
from training.forward_check import Z_SWITCH, Pooled
from training.integrity import atomic_write
from training.model import SessionModel
from training.model.scorer import FEATURES, CandidateScorer, tapping
from training.names import OOV_ID

if TYPE_CHECKING:
    from training.trainer import Trainer

POOL_DIR = "scorer_pool"  # RUN/scorer_pool/w<window>.pt: one file per pooled window, written once
LEGACY_POOL_FILE = "scorer_pool.pt"  # the whole pool in one file, rewritten each window (before 2026-12-07)
POOL_SESSIONS = 40_000  # the newest forward sessions (with the target among the candidates) a fit reads
MIN_SESSIONS = 200  # fewer in the pool: no fit yet
STEPS, BATCH, LR = 400, 256, 3e-3  # Adam steps of BATCH sessions drawn from the pool
EPOCHS = 8  # at most this many passes over a small pool (more overfit it: the forward check saw it)
TOP_K = 20  # the check's metric: NDCG@20
RECENT = 3  # the scorer serves while its newest checks, pooled, find it better (each fit is a new scorer)


def ndcg_at(scores: Tensor, ok: Tensor, y: Tensor) -> Tensor:
    """(S, N) scores of the re-ranked slots, which hold candidates, target slot y (-1: not among them)
    -> (S,) NDCG@20 per session, ties counted against the target (as the evaluation ranks)."""
    s = scores.masked_fill(~ok, float("-inf"))
    target = s.gather(1, y.clamp(min=0)[:, None])
    rank = (s >= target).sum(1).float()
    hit = (y >= 0) & (rank <= TOP_K) & torch.isfinite(target.squeeze(1))
    return torch.where(hit, 1.0 / torch.log2(rank + 1), 0.0)


@torch.no_grad()
def collect(
    model: SessionModel, st: SessionTensors, device: torch.device, batch: int, tap: list | None = None
) -> tuple[Tensor, ...]:
    """`st` scored by the model as it stands -> the scorer's inputs there: (x (S, N, F) float32 features of
    the combiner's N best candidates, ok (S, N) which are candidates, y (S,) the target's slot, -1 if
    it is not among them). tap: what `tapping` kept while the evaluation's pass scored `st` (the forward
    check's, `check_next_window`), read instead of scoring the sessions a second time; None: scored here,
    in the evaluation's batches."""
    mem = model.item_memory
    assert mem is not None and mem.scorer is not None, "the candidate scorer needs the item memory"
    feats, lengths, targets = eval_inputs_targets(st, model.cfg.item_feature)
    if tap is None:
        tap = []
        product = device.type == "cpu" and model.cfg.n_items <= EVAL_PRODUCT_ITEMS  # as the evaluation
        if product:  # a (B, V) product per batch: as many sessions as the evaluation scores at once
            batch = eval_rows(model.cfg.n_items, batch)
        was_training = model.training
        model.eval()
        try:
            with tapping(mem, tap):
                for i in range(0, len(targets), batch):
                    f = {k: v[i : i + batch].to(device) for k, v in feats.items()}
                    model.candidate_scores(f, lengths[i : i + batch].to(device), product)
        finally:
            model.train(was_training)
    xs, oks, ids = [], [], []
    for x, at, ok, cand in tap:  # the batches in the order of st
        ids.append(F.pad(cand, (0, mem.scorer.top), value=-1).gather(1, at).cpu())  # `inputs`' empty slots
        pad = mem.scorer.top - x.shape[1]  # fewer candidates than slots (a tiny catalogue): empty slots
        xs.append(F.pad(x.cpu(), (0, 0, 0, pad))), oks.append(F.pad(ok.cpu(), (0, pad)))
        ids[-1] = F.pad(ids[-1], (0, pad), value=-1)
    if not xs:
        return empty(mem.scorer.top, mem.scorer.mu.shape[0])
    x, ok, slot_ids = torch.cat(xs), torch.cat(oks), torch.cat(ids)
    if len(slot_ids) != len(targets):
        raise ValueError(f"scorer tap: {len(slot_ids)} sessions scored, expected {len(targets)} (the sessions of st)")
    hit = (slot_ids == targets[:, None]) & ok
    return x, ok, torch.where(hit.any(1), hit.float().argmax(1), -1)


def shorter_prefixes(st: SessionTensors, n: int, seed: int, item_feature: str) -> SessionTensors:
    """At most n of the sessions' shorter prefixes: 2 items or more, the whole session left out (it is
    a pool row of its own), the prefix's last item (its target) not OOV; drawn at random with a
    generator seeded by `seed`, in session order, shortest first; positions past a prefix are zeroed."""
    rows, lengths = st.prefix_rows(whole=False)
    pick = (st.feats[item_feature][rows, lengths - 1] != OOV_ID).nonzero().flatten()
    if len(pick) > n:
        g = torch.Generator().manual_seed(seed)
        pick = pick[torch.randperm(len(pick), generator=g)[:n]].sort().values
    return st.heads(rows[pick], lengths[pick])  # only the drawn ones materialised


def empty(slots: int, width: int = len(FEATURES)) -> tuple[Tensor, Tensor, Tensor]:
    """No sessions: x (0, slots, width), ok (0, slots), y (0,)."""
    return torch.zeros(0, slots, width), torch.zeros(0, slots, dtype=torch.bool), torch.zeros(0, dtype=torch.int64)


def weights_of(scorer: CandidateScorer) -> dict[str, Tensor]:
    return {k: getattr(scorer, k) for k in CandidateScorer.PARAMS}


def fit_mlp(
    x: Tensor, ok: Tensor, y: Tensor, hidden: int, seed: int, steps: int = STEPS, *, average_tail: float = 0.0, cosine: bool = False
) -> dict[str, Any]:
    """The MLP fitted by softmax cross-entropy over each session's re-ranked slots (Adam, `steps` batches
    of BATCH sessions drawn with a generator seeded by `seed`); x (S, N, F) any float dtype, every y >= 0.
    -> {"weights": PARAMS by name, "mu", "sd": the features' normalisation, "loss": the last 50 steps'}
    Variants measured offline (`bench.scorer_fits`, not served): average_tail, the weights averaged over
    that last share of the steps; cosine, the learning rate decayed to 0 along a cosine."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[2]
    rows = x[ok].double()
    mu = rows.mean(0).float()
    sd = rows.std(0).float().nan_to_num(0.0) + 1e-6
    w = {
        "w1": torch.randn(n, hidden, generator=g) * math.sqrt(2.0 / n),
        "b1": torch.zeros(hidden),
        "w2": torch.randn(hidden, hidden, generator=g) * math.sqrt(2.0 / hidden),
        "b2": torch.zeros(hidden),
        "w3": torch.randn(hidden, generator=g) * math.sqrt(1.0 / hidden),
        "b3": torch.zeros(()),
    }
    for v in w.values():
        v.requires_grad_(True)
    opt = torch.optim.Adam(list(w.values()), lr=LR)
    total = min(steps, math.ceil(EPOCHS * x.shape[0] / BATCH))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if cosine else None
    losses, avg, n_avg = [], None, 0
    for i in range(total):
        idx = torch.randint(x.shape[0], (min(BATCH, x.shape[0]),), generator=g)
        s = CandidateScorer.mlp((x[idx].float() - mu) / sd, w).masked_fill(~ok[idx], float("-inf"))
        loss = F.cross_entropy(s, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if sched is not None:
            sched.step()
        if average_tail > 0 and i >= total * (1 - average_tail):
            n_avg += 1
            with torch.no_grad():
                avg = {k: v.detach().clone() if avg is None else avg[k] + (v.detach() - avg[k]) / n_avg for k, v in w.items()}
    weights = avg if avg is not None else {k: v.detach() for k, v in w.items()}
    return {"weights": weights, "mu": mu, "sd": sd, "loss": float(np.mean(losses[-50:]))}


def fold(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """`fit_mlp` results on the same pool (the same mu, sd) -> one fit whose MLP scores their mean: the
    hidden units side by side, the second layer block-diagonal (one fit: itself)."""
    if len(fits) == 1:
        return fits[0]
    w = [f["weights"] for f in fits]
    weights = {
        "w1": torch.cat([v["w1"] for v in w], 1),
        "b1": torch.cat([v["b1"] for v in w]),
        "w2": torch.block_diag(*[v["w2"] for v in w]),
        "b2": torch.cat([v["b2"] for v in w]),
        "w3": torch.cat([v["w3"] for v in w]) / len(w),
        "b3": torch.stack([v["b3"] for v in w]).mean(),
    }
    return {"weights": weights, "mu": fits[0]["mu"], "sd": fits[0]["sd"], "loss": float(np.mean([f["loss"] for f in fits]))}


@dataclass
class ScorerState:
    """A run's pool of forward sessions per window (x half, ok, y) and the pooled forward check."""

    pool: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    check: Pooled = field(default_factory=Pooled)
    recent: list[list[float]] = field(default_factory=list)  # the newest RECENT checks' [n, total, squares]
    use: bool = False

    @classmethod
    def restore(cls, out: Path, rows: list[dict[str, Any]]) -> ScorerState:
        """--resume: the pool saved in `out` and the newest check of the metrics rows."""
        state = cls(pool=load_pool(out))
        for row in rows:
            if c := row.get("scorer_check"):
                state.check = Pooled(int(c["pooled_sessions"]), c["pooled_total"], c["pooled_squares"])
                state.use = bool(c["use_scorer_next"])
                state.recent = [list(e) for e in c.get("recent", [])]
        return state

    def sessions(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """The newest POOL_SESSIONS pooled sessions of windows <= t whose target is among the slots."""
        xs, oks, ys, n = [], [], [], 0
        for w in sorted((w for w in self.pool if w <= t), reverse=True):
            x, ok, y = self.pool[w]
            keep = (y >= 0).nonzero().flatten()[-(POOL_SESSIONS - n) :]
            xs.append(x[keep]), oks.append(ok[keep]), ys.append(y[keep])
            n += len(keep)
            if n >= POOL_SESSIONS:
                break
        if not xs:
            return empty(1)
        return torch.cat(xs[::-1]), torch.cat(oks[::-1]), torch.cat(ys[::-1])

    def add_window(
        self,
        model: SessionModel,
        st: SessionTensors,
        window: int,
        device: torch.device,
        batch: int,
        out: Path | None,
        tap: list | None = None,
        *,
        prefixes: int = 0,
        seed: int = 0,
    ) -> dict[str, Any]:
        """`st` (window `window`'s forward sessions, `forward_check.next_sessions`; tap: the scorer's inputs
        kept while they were scored, see `collect`): checked with the scorer as fitted so far (if it is),
        then pooled, with at most `prefixes` of their `shorter_prefixes` (drawn by `seed`; scored here, as
        the model stands), and saved to out/POOL_DIR (None: not saved). Returns the metrics row's entry."""
        mem = model.item_memory
        assert mem is not None and mem.scorer is not None
        t0 = time.perf_counter()
        x, ok, y = collect(model, st, device, batch, tap)
        entry: dict[str, Any] = {"window": window, "sessions": len(y), "target_in_top": float((y >= 0).float().mean()) if len(y) else 0.0}
        sc = mem.scorer
        if bool(sc.w1.any()) and len(y):  # fitted: the check
            with torch.no_grad():
                mine = ndcg_at(CandidateScorer.mlp((x - sc.mu.cpu()) / sc.sd.cpu(), {k: v.cpu() for k, v in weights_of(sc).items()}), ok, y)
            plain = ndcg_at(x[:, :, sc.names.index("z_log_softmax")], ok, y)
            diffs = (mine - plain).double().numpy()
            self.check.add(diffs)
            newest = Pooled()
            newest.add(diffs)
            self.recent = [*self.recent, newest.entry()][-RECENT:]
            recent = Pooled(*(sum(e[i] for e in self.recent) for i in range(3)))
            self.use = recent.z > Z_SWITCH
            entry.update({"ndcg@20_scorer": float(mine.mean()), "ndcg@20_plain": float(plain.mean()), "z_newest": newest.z, "z_recent": recent.z, "recent": self.recent})  # fmt: skip
        entry.update(pooled_sessions=self.check.n, pooled_total=self.check.total, pooled_squares=self.check.squares, z=self.check.z, use_scorer_next=self.use)  # fmt: skip
        if prefixes > 0 and len(y):  # before the sessions: a fit short of room drops them first
            pre = shorter_prefixes(st, prefixes, seed, model.cfg.item_feature)
            xp, okp, yp = collect(model, pre, device, batch)
            entry.update(prefix_sessions=len(yp), prefix_target_in_top=float((yp >= 0).float().mean()) if len(yp) else 0.0)  # fmt: skip
            x, ok, y = torch.cat([xp, x]), torch.cat([okp, ok]), torch.cat([yp, y])
        self.pool[window] = (x.half(), ok, y)
        self._trim(window)
        if out is not None:
            save_pool_window(out, window, self.pool)
        entry["seconds"] = time.perf_counter() - t0
        return entry

    def _trim(self, newest: int) -> None:
        """Drop the windows that neither the next fit nor a redo of the last one reads (--resume)."""
        n = 0
        for w in sorted((w for w in self.pool if w < newest), reverse=True):
            if n >= POOL_SESSIONS:
                del self.pool[w]
            else:
                n += int((self.pool[w][2] >= 0).sum())


def load_pool(out: Path) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """The pool a run saved in `out` ({} if none): its window files (a run of the code before them: the
    one file it rewrote each window)."""
    pool = torch.load(out / LEGACY_POOL_FILE, weights_only=True) if (out / LEGACY_POOL_FILE).exists() else {}
    for path in (out / POOL_DIR).glob("w*.pt"):
        if path.stem[1:].isdigit():
            pool[int(path.stem[1:])] = torch.load(path, weights_only=True)
    return pool


def save_pool_window(out: Path, window: int, pool: dict[int, tuple[Tensor, Tensor, Tensor]]) -> None:
    """Write `window`'s entry of the pool to out/POOL_DIR (atomically) and remove the files of the
    windows the pool no longer holds: a window's rows are written once, not the whole pool each window
    (a pool resumed from the legacy one file: every window it holds written, then that file removed)."""
    folder = out / POOL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    legacy = out / LEGACY_POOL_FILE
    for w in pool if legacy.exists() else [window]:
        buf = io.BytesIO()
        torch.save(pool[w], buf)
        atomic_write(folder / f"w{w}.pt", buf.getvalue())
    legacy.unlink(missing_ok=True)
    for path in folder.glob("w*.pt"):
        if path.stem[1:].isdigit() and int(path.stem[1:]) not in pool:
            path.unlink()


def fit_scorer(trainer: Trainer, t: int) -> dict[str, Any]:
    """Before window t's evaluation: the scorer fitted on the pool of windows <= t and served if the
    forward check says so (off while the count blend serves; back with the stacked combiner). Returns
    the metrics row's entry ({} without a scorer)."""
    from training.trainer import _seed

    mem = trainer.model.item_memory
    if mem is None or mem.scorer is None:
        return {}
    t0 = time.perf_counter()
    trainer.history.set_recent(trainer.model, t, trainer.known_sizes(t))  # ModelConfig.scorer_recent
    x, ok, y = trainer.scorer.sessions(t)
    entry: dict[str, Any] = {"fit_sessions": len(y), "fitted": False, "on": False}
    if len(y) >= MIN_SESSIONS:
        cfg = trainer.model.cfg
        seeds = [_seed(trainer.cfg.seed, t, 12, *([k] if k else [])) for k in range(cfg.scorer_members)]
        fit = fold([fit_mlp(x, ok, y, cfg.scorer_hidden, seed) for seed in seeds])
        with torch.no_grad():
            for k, v in {**fit["weights"], "mu": fit["mu"], "sd": fit["sd"]}.items():
                getattr(mem.scorer, k).copy_(v)
        on = trainer.scorer.use
        if trainer.guard_combiner is not None:  # the count blend serves: the scorer comes back with the stack
            trainer.guard_combiner["scorer_on"] = torch.tensor(float(on))
            on = False
        mem.scorer.on.fill_(float(on))
        entry.update(fitted=True, on=on, loss=fit["loss"])
    entry["seconds"] = time.perf_counter() - t0
    return {"scorer": entry}
