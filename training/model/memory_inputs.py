"""The inputs of the item memory's scoring core (`ItemMemory.combine`), grouped: what precedes each
target (`TargetContext`), its count-table rows (`CountLists`), the network's item logits as factors
(`HeadFactors`), and where training targets sit in packed rows (`PackedTargets`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class HeadFactors:
    """The network's item logits as factors, logits = h @ w^T: they ride in one matmul with the
    popularity term (see `ItemMemory._combine`)."""

    h: Tensor  # (M, E) head inputs
    w: Tensor  # (V, E) item vectors; (U, E) the candidate columns' rows; (B, C, E) per-session candidates
    # (candidate_scores also takes the (V, E) table: a (B, V) product read at the candidates)


@dataclass
class TargetContext:
    """What precedes each of M targets: the session so far (W positions per target)."""

    items: Tensor  # (M, W) item ids
    ctx: Tensor  # (M, W) bool, which positions are the target's context
    dist: Tensor  # (M, W) distance to the last context position (0 = the last one)
    has_last: Tensor  # (M,) bool, the target has a context item at all


@dataclass
class CountLists:
    """The count-table rows that score M targets (gathered from ItemMemory's buffers)."""

    cooc_idx: Tensor  # (M, W, K) co-occurrence lists of the context items, int64 ids
    cooc_val: Tensor  # (M, W, K) their counts
    succ_idx: Tensor  # (M, K) successor list of the last context item, int64 ids
    succ_val: Tensor  # (M, K) its counts
    # training only: (M, W) corrections added to log1p(pop) at the context items (own session left out)
    pop_delta: Tensor | None = None
    prior_delta: Tensor | None = None  # (M, W) the same for the popularity prior (ModelConfig.pop_prior)


@dataclass
class PackedTargets:
    """M training targets in packed rows (`training.model.packing.pack_sessions`), row-major."""

    row: Tensor  # (M,) the row of each target
    pos: Tensor  # (M,) its position in that row
    ctx_ok: Tensor  # (R, W) bool, positions that may be context (clm: every real one; mlm: unmasked, or all)
