"""Re-ranking's training pieces on flat entries (`ItemMemory.rerank_view`, `rerank_columns`,
`rerank_ce`): the entries and candidate sets, their index arithmetic, and the pair dot products
with their own backward."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from training.model.memory_inputs import TargetContext


@dataclass
class RerankEntries:
    """Re-ranking's training view of M targets (`ItemMemory.rerank_view`): their candidates and
    count terms as flat entries, only where a term can be nonzero or an id is a candidate.

    A target's context holds ~2.5 of a packed row's W = 20 positions on a real log, so the
    (M, W, K) lists of `packed_view` are ~90 % zeros; these hold the rest. Entries are in
    row-major order (target, position, list slot), the order `combine` adds them in."""

    context: TargetContext  # (M, W): the gates' position weights read ctx and dist
    pm: Tensor  # (P,) target of each context pair (target, position)
    pw: Tensor  # (P,) its position; the item there is a candidate and gets the repeat term
    ctx_ids: Tensor  # (P,) that item
    cooc_p: Tensor  # (Nc,) the context pair of each co-occurrence entry with a count > 0
    cooc_ids: Tensor  # (Nc,) its id
    cooc_log: Tensor  # (Nc,) log1p(count)
    succ_m: Tensor  # (Ns,) the target of each successor entry (last context item) with a count > 0
    succ_ids: Tensor  # (Ns,)
    succ_log: Tensor  # (Ns,) log1p(count)
    # training with leave_out: the popularity corrections at the items of the target's session,
    # (No,) target, id, correction of log1p(pop), correction of the popularity prior (None: no prior)
    own: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None


@dataclass
class RerankSets:
    """Each training target's candidates among the union columns (`ItemMemory.rerank_columns`),
    and where `rerank_ce` finds each score: the (M, P) block of the popular columns (every
    target's), flat, then the S other (target, column) pairs."""

    pop_cols: Tensor  # (P,) the popular ids' columns
    pair_m: Tensor  # (S,) every other (target, column) candidate pair, once, sorted: the target
    pair_col: Tensor  # (S,) and the column
    crow: Tensor  # (M + 1,) where each target's pairs start (CSR row pointers)
    # (N,) the score each of `_term_index`'s entries adds to; M * P + S (a sink after the pairs, never
    # read) where its cell is not a candidate: such terms are dropped
    term_at: Tensor
    target_at: Tensor  # (M,) the score of each target
    target_ok: Tensor  # (M,) bool: the target is among its candidates


def _term_index(view: RerankEntries) -> tuple[Tensor, Tensor, int]:
    """The (target, id) of each count term of re-ranking's flat entries (N,), in the order
    `ItemMemory.combine` adds them: co-occurrence, successor, repeat, popularity correction;
    and how many lead the list that propose candidates (all but the popularity corrections)."""
    m = [view.pm[view.cooc_p], view.succ_m, view.pm]
    ids = [view.cooc_ids, view.succ_ids, view.ctx_ids]
    n_cand = sum(x.shape[0] for x in m)
    if view.own is not None:
        m.append(view.own[0])
        ids.append(view.own[1])
    return torch.cat(m), torch.cat(ids), n_cand


def _term_values(view: RerankEntries, g: Tensor, wc: Tensor, wr: Tensor, ws: Tensor) -> Tensor:
    """The values (N,) of re-ranking's count terms, in `_term_index`'s order. (M, 4) gates g;
    (M, W) cooc and repeat weights wc, wr; (M, 1) successor weight ws."""
    val = [
        wc[view.pm, view.pw][view.cooc_p] * view.cooc_log,
        ws[view.succ_m, 0] * view.succ_log,
        wr[view.pm, view.pw],
    ]
    if view.own is not None:
        own = g[view.own[0], 3] * view.own[2]
        val.append(own if view.own[3] is None else own + view.own[3])
    return torch.cat(val)


def _pair_dots(lhs: Tensor, rhs: Tensor, sets: RerankSets) -> Tensor:
    """(S,) lhs[pair_m] . rhs[pair_col] of (M, E) and (U, E) factors: one sampled matrix product
    over the pairs' CSR pattern (no (S, E) gathers: 3x less time at 200k pairs than gathering);
    its backward two CSR products (`_PairDots`)."""
    if sets.pair_m.numel() == 0:
        return lhs.new_zeros(0) + 0.0 * (lhs.sum() + rhs.sum())  # connected, like the others
    return _PairDots.apply(lhs, rhs, sets.crow, sets.pair_m, sets.pair_col)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products are tested here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


class _PairDots(torch.autograd.Function):
    """Forward: `torch.sparse.sampled_addmm` over the pairs (sorted by target, then column).
    Backward, g (S,) the pairs' gradients as a sparse (M, U) matrix G: d lhs = G @ rhs (the
    value torch's own backward gives, bit for bit), d rhs = G^T @ lhs with G^T built as a CSR
    matrix by one sort of the pairs by column. torch's backward of sampled_addmm took ~9% of
    the real recipe's step on its own, 2-3x this (docs/throughput.md section 3c)."""

    @staticmethod
    def forward(ctx, lhs: Tensor, rhs: Tensor, crow: Tensor, pm: Tensor, col: Tensor) -> Tensor:
        M, U = lhs.shape[0], rhs.shape[0]
        ctx.save_for_backward(lhs, rhs, crow, pm, col)
        pattern = _csr(crow, col, lhs.new_zeros(col.shape[0]), (M, U))
        return torch.sparse.sampled_addmm(pattern, lhs, rhs.t()).values()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        lhs, rhs, crow, pm, col = ctx.saved_tensors
        M, U = lhs.shape[0], rhs.shape[0]
        g = g.contiguous()
        d_lhs = d_rhs = None
        if ctx.needs_input_grad[0]:
            d_lhs = _csr(crow, col, g, (M, U)) @ rhs
        if ctx.needs_input_grad[1]:
            order = torch.argsort(col * M + pm)  # the pairs by column, then target
            crow_t = torch.zeros(U + 1, dtype=crow.dtype, device=crow.device)
            crow_t[1:] = torch.bincount(col, minlength=U).cumsum(0)
            d_rhs = _csr(crow_t, pm[order], g[order], (U, M)) @ lhs
        return d_lhs, d_rhs, None, None, None


def _find(keys: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Places of q's entries among the sorted `keys` and whether they are there (q's shape)."""
    if keys.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(q, dtype=torch.bool)
    at = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
    return at, keys[at] == q
