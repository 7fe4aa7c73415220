"""Stacking (TrainConfig.stack): after a window's fit, the item memory's combiner learns on held-back sessions.

Why: the network was fitted on the window's training sessions (early stopping chose
its epoch on the held-back slice), and the counts hold the fitted sessions but not the
held-back ones. On its own training sessions the network's item logits look better
than they are (it memorised them), so the combiner trained beside it learns to trust
them too much. The held-back sessions look to the model as new sessions do after
deployment: the network never trained on them and the counts lack them. Fitting only
the combiner there (count gates, head gate, position weights; the network frozen, in
eval mode) teaches it how far to trust the network's logits and each count on sessions
it did not memorise: stacked generalisation (Wolpert 1992). The held-back sessions are
not in the counts, so no leave-one-out correction (`packed_loss(leave_out=False)`).

    row.update(stack_memory(model, held, cfg, seed, device, pool=pool))   # per window, after the fit
    row.update(blend_guard(model, held, device, batch_size))  # --blend-guard, after stacking
    row.update(stack_choice(model, check, lambda b: stack_memory(..., b))[0])  # --cooc-curve-fit choose

Then the held-back sessions go into the counts with the rest of the window (trainer).

The blend guard (TrainConfig.blend_guard) is the floor under all of it: where the held-back
sessions score the untrained count blend better than the model on NDCG@20 or on Recall@20
(a small window, a network still learning), the window's model ranks as that blend
(`ItemMemory.reset_to_blend`). Its comparison reads the held-back sessions that stacking
fitted the combiner on (a few hundred weights), so it leans slightly towards the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.baselines import BaselineCounts
from training.config import TrainConfig
from training.data.splits import SessionTensors, eval_inputs_targets, load_split, split_path
from training.evaluate import count_blend_metrics, evaluate_model, known_inputs
from training.forward_check import ForwardCheck, combiner_state, load_combiner
from training.history import set_memory_counts
from training.model import ItemMemory, SessionModel, mask_positions, pack_sessions

if TYPE_CHECKING:
    from training.trainer import Trainer

GUARD_METRICS = ("ndcg@20", "recall@20")


def combiner_parameters(model: SessionModel) -> list[nn.Parameter]:
    """The item memory's trainable parameters: count gates, head gate, position weights."""
    assert model.item_memory is not None, "stacking needs the item memory"
    return [p for p in model.item_memory.parameters() if p.requires_grad]


def stack_memory(
    model: SessionModel,
    held: SessionTensors,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    pool: SessionTensors | None = None,
    before: float | None = None,
    *,
    lag: BaselineCounts | None = None,
) -> dict[str, Any]:
    """Train the combiner for cfg.stack epochs on `held` (Adam at memory_lr, or lr; batches of
    cfg.batch_size shuffled, and masked for mlm, by a generator seeded with `seed`); the rest of
    the model is frozen and in eval mode (no dropout), and left as it was.

    pool (TrainConfig.stack_pool): earlier windows' held-back sessions, which the network never
    trained on but the counts hold: their batches join every epoch's (in shuffled order), each
    session's own counts left out (`packed_loss(leave_out=True)`). None: `held` only.

    before: the model's held-back NDCG@20 as it stands (early stopping's best score, which
    scored these weights on `held`); None: scored here.

    lag (TrainConfig.stack_lag): counts of the windows before the held-back sessions' own; the
    memory holds their tables while stacking (both scores included) and its own tables afterwards.

    Returns the metrics row's entries: the held-back NDCG@20 before and after stacking and,
    with the head gate, its mean weight on the held-back sessions after it (how much the
    network's own logits are used; recorded per window, so it shows how that grows with the data).
    """
    if lag is not None:
        mem = model.item_memory
        assert mem is not None, "stacking needs the item memory"
        own = {name: v.clone() for name, v in mem.tables().items()}
        set_memory_counts(model, lag)
        try:
            return stack_memory(model, held, cfg, seed, device, amp, pool, None)
        finally:
            for name, v in own.items():
                mem.set_table(name, v)
    params = combiner_parameters(model)
    mine = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
    if before is None:
        before = evaluate_model(model, held, device, cfg.eval_batch_size)["ndcg@20"]
    out: dict[str, Any] = {"holdout_ndcg20_before_stack": before}
    opt = torch.optim.Adam(params, lr=cfg.memory_lr or cfg.lr)
    gen = torch.Generator().manual_seed(seed)  # shuffling, masking, sampled negatives: on the CPU
    item, mlm = model.cfg.item_feature, model.cfg.objective == "mlm"
    prefixes = mlm and cfg.stack_prefixes  # every prefix, masked at its last item (the evaluation's task)
    last = cfg.stack_last or prefixes
    held_fit = held.prefixes() if prefixes else held  # (TrainConfig refuses it with stack_pool)
    was_training = model.training
    model.eval()  # the network is fixed: no dropout
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(cfg.stack):
            perm = torch.randperm(len(held_fit), generator=gen)
            # (sessions, rows, leave_out): window t's held-back sessions are not in the counts
            batches = [
                (held_fit, perm[i : i + cfg.batch_size], False) for i in range(0, len(held_fit), cfg.batch_size)
            ]
            if pool is not None and len(pool):
                pperm = torch.randperm(len(pool), generator=gen)
                batches += [
                    (pool, pperm[i : i + cfg.batch_size], True) for i in range(0, len(pool), cfg.batch_size)
                ]
                batches = [batches[int(j)] for j in torch.randperm(len(batches), generator=gen)]
            for st, rows, leave_out in batches:
                feats, lengths = st.batch(rows)  # (b, width), (b,)
                masked = stack_masks(model, feats[item], lengths, gen, last) if mlm else None
                packed = pack_sessions(feats, lengths, masked).to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = model.packed_loss(
                        packed, cfg.label_smoothing, gen, leave_out=leave_out, last_only=cfg.stack_last and not mlm
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with torch.no_grad():  # every rank ran the same steps; rank 0's result rules (GPU round-off)
            for p in params:
                torch.distributed.broadcast(p.data, 0)
    out["holdout_ndcg20_after_stack"] = evaluate_model(model, held, device, cfg.eval_batch_size)["ndcg@20"]
    if model.item_memory is not None and model.item_memory.head_gate is not None:
        out["holdout_head_gate"] = mean_head_weight(model, held, device, cfg.eval_batch_size)
    return out


def stack_choice(
    model: SessionModel,
    check: ForwardCheck,
    stack: Callable[[float | None], dict[str, Any]],
    before: float | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """TrainConfig.cooc_curve_fit "choose": stack the combiner twice from the fitted model with
    `stack(before)` (`stack_memory` on the window's held-back sessions, its seed fixed, `before` the
    model's held-back score as early stopping left it or None), once with the co-occurrence curve
    reset to the identity and held there (plain log1p counts: the stacking of a model without the
    curve) and once with the curve learned from `check.slopes` (the curve's stacking of the window
    before, so that it goes on learning whichever serves; None: as the model holds it); load the
    curve's result if `check.use_curve` (the forward check's choice so far, training.forward_check),
    the identity's otherwise; `check.slopes` becomes the new curve. Returns (the metrics row's
    entries: the loaded stacking's, both held-back scores, the curve's slopes; the other stacking's
    combiner state, for the forward check)."""
    slopes, use_curve = check.slopes, check.use_curve
    mem = model.item_memory
    assert mem is not None and mem.cooc_curve is not None, "stack_choice needs the item memory's curve"
    curve_at = mem.cooc_curve.slopes
    start = combiner_state(mem)
    at_identity = bool((curve_at == 1.0).all())
    with torch.no_grad():
        curve_at.fill_(1.0)
    curve_at.requires_grad_(False)
    try:
        plain = stack(before if at_identity else None)
    finally:
        curve_at.requires_grad_(True)
    identity = combiner_state(mem)
    load_combiner(mem, start)
    if slopes is not None and not torch.equal(curve_at, torch.tensor(slopes, device=curve_at.device)):
        with torch.no_grad():
            curve_at.copy_(torch.tensor(slopes))
        before = None  # early stopping scored the curve the model held
    curved = stack(before)
    curve = combiner_state(mem)
    load_combiner(mem, curve if use_curve else identity)
    out = {
        **(curved if use_curve else plain),
        "cooc_curve_used": use_curve,
        "holdout_ndcg20_identity": plain["holdout_ndcg20_after_stack"],
        "holdout_ndcg20_curve": curved["holdout_ndcg20_after_stack"],
        "cooc_curve_slopes": [float(v) for v in curve["cooc_curve.slopes"]],
    }
    check.slopes = out["cooc_curve_slopes"]
    return out, identity if use_curve else curve


def stack_masks(
    model: SessionModel, items: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator, last: bool
) -> torch.Tensor:
    """mlm stacking's masked positions of (B, L) sessions: the model's own masking, or with `last`
    (TrainConfig.stack_last) each session of two or more items masked at its last item only, the
    evaluation's task (its context the whole session before it, which re-visits an item more often
    than the context of a random position with 30 % of it masked)."""
    if not last:
        return model.draw_masks(items, lengths, gen).masked
    return mask_positions(items, lengths, model.cfg.mask_prob, gen, last=1.0).masked


@torch.no_grad()
def mean_head_weight(model: SessionModel, st: SessionTensors, device: torch.device, batch_size: int) -> float:
    """Mean of the head gate's weight (`ItemMemory.head_weight`) over the sessions of `st`,
    each read as the evaluation reads it (every item but the last)."""
    mem = model.item_memory
    assert mem is not None
    feats, lengths, _ = eval_inputs_targets(st, model.cfg.item_feature)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(lengths), batch_size):
        f = model.unknown_to_oov({k: v[i : i + batch_size].to(device) for k, v in feats.items()})
        h = model.next_hidden(f, lengths[i : i + batch_size].to(device))  # (b, d_model)
        total += float(mem.head_weight(h).sum())
    model.train(was_training)
    return total / max(1, len(lengths))


def blend_guard(
    model: SessionModel,
    held: SessionTensors,
    device: torch.device,
    batch_size: int,
    miss: torch.Tensor | None = None,
    known: int | None = None,
) -> dict[str, Any]:
    """Score `held` with the model (as served) and with its count blend (the same count tables,
    the combiner at its initial values, no network logits); where the blend scores better on
    NDCG@20 or Recall@20, reset the model to it (`ItemMemory.reset_to_blend`). miss (N,) / known:
    sessions whose target the model cannot know, and the ids known (`known_inputs`; TrainConfig.
    guard_split "valid" scores window t's valid split, which may hold items first seen there).

    Returns the metrics row's entries: both scores and "blend_fallback" (True: the window's
    model ranks as the count blend)."""
    mem = model.item_memory
    assert mem is not None, "the blend guard needs the item memory"
    ours = evaluate_model(model, held, device, batch_size, miss)
    tables = {k: getattr(mem, k) for k in ItemMemory.TABLES}
    blend = count_blend_metrics(tables, model.cfg, held, device, batch_size, known, miss)
    fallback = any(ours[m] < blend[m] - 1e-9 for m in GUARD_METRICS)  # not on rounding-level ties
    if fallback:
        mem.reset_to_blend()
    return {
        "holdout_guard_model": {m: float(ours[m]) for m in GUARD_METRICS},
        "holdout_guard_blend": {m: float(blend[m]) for m in GUARD_METRICS},
        "blend_fallback": fallback,
        "guard_sessions": len(held),
    }


def guard_sessions(
    trainer: Trainer, t: int, held: SessionTensors
) -> tuple[SessionTensors, torch.Tensor | None, int | None]:
    """The blend guard's sessions, which of their targets are unknown, the ids known
    (`blend_guard`): the held-back ones, or window t's valid split (TrainConfig.guard_split;
    the held-back ones where that split is empty)."""
    valid = (
        load_split(split_path(trainer.data, t, "valid"), trainer.schema)
        if trainer.cfg.guard_split == "valid"
        else None
    )
    if valid is None or len(valid) == 0:
        return held, None, None
    known = trainer.known_sizes(t)
    item = trainer.model.cfg.item_feature
    st, miss = known_inputs(valid, known, item, trainer.age_feature)
    return st, miss, known[item]
