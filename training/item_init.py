"""Item rows that start from the counts (TrainConfig.item_init = "cooc") instead of noise.

Why: on a real log most items are seen a handful of times (DIGINETICA: 21k ids for ~10k
training sessions; NowPlaying1M: 121k ids for ~50k), so an item row drawn at random
learns little before the item drops out of the newest sessions, and the network's own
item logits (h . item row, tied) are noise for it (docs/quality.md: on both logs they
add nothing measurable). The co-occurrence counts do know such an item: its row of
the item memory lists the items it was seen with. This gives every new row a start
there:

    X = U sqrt(S)       the top `dim` singular vectors of the co-occurrence matrix
                        D^-1/2 log1p(C) D^-1/2 (rows of the item memory, D = row sums)
    new rows            X @ W, W fitted by least squares from X to the item rows already
                        trained (window t > first); at the first window (nothing trained)
                        X itself, scaled to the table's initial spread

Items without any count keep their random row. Runs once per window, after the vocabulary
grew and the memory holds the fitted sessions' counts (`Trainer.run_window`), on the rows
that window added; trained rows are never touched. Deterministic (its own seeded draw).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from training.names import FIRST_REAL_ID

if TYPE_CHECKING:
    from training.model import SessionModel


@torch.no_grad()
def cooc_vectors(cooc_idx: Tensor, cooc_val: Tensor, dim: int, seed: int) -> Tensor:
    """(V, K) co-occurrence lists (ids, counts) -> (V, dim) item vectors U sqrt(S) of the
    normalised log1p count matrix (`torch.svd_lowrank`, `dim` components at most V);
    zero rows for items whose list is empty."""
    V, K = cooc_idx.shape
    vals = torch.log1p(cooc_val.float()).reshape(-1)
    rows = torch.arange(V).repeat_interleave(K)
    cols = cooc_idx.long().reshape(-1)
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    out = torch.zeros(V, dim)
    if not len(vals):
        return out
    deg = torch.zeros(V).index_add_(0, rows, vals)
    col_deg = torch.zeros(V).index_add_(0, cols, vals)
    vals = vals * deg[rows].rsqrt() * col_deg[cols].rsqrt()  # both > 0 where an entry is
    a = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (V, V), check_invariants=False).coalesce()
    q = min(dim, V)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its test matrix from the global RNG
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(a, q=q, niter=3)
    out[:, :q] = u * s.sqrt()
    out[deg == 0] = 0.0
    return out


@torch.no_grad()
def init_new_rows(weight: Tensor, x: Tensor, old_v: int, init_std: float) -> int:
    """Set the item table's rows [old_v, V) that have counts (x's row non-zero) from x (V, dim):
    through a least-squares map fitted on the trained rows [FIRST_REAL_ID, old_v) that have
    counts, or, with fewer of them than 2 * dim, x scaled to spread `init_std`. Returns how
    many rows were set."""
    V = weight.shape[0]
    has = x.abs().sum(1) > 0
    new = torch.arange(max(old_v, FIRST_REAL_ID), V)
    new = new[has[new]]
    if not len(new):
        return 0
    old = torch.arange(FIRST_REAL_ID, max(old_v, FIRST_REAL_ID))
    old = old[has[old]]
    w = weight.detach().float().cpu()
    if len(old) >= 2 * x.shape[1]:
        fit = torch.linalg.lstsq(x[old], w[old]).solution  # (dim, E)
        rows = x[new] @ fit
    else:
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"item_init: {x.shape[1]} count components for a table of width {w.shape[1]}")
        rows = x[new] * (init_std / x[new].std().clamp(min=1e-12))
    weight[new.to(weight.device)] = rows.to(weight.device, weight.dtype)
    return int(len(new))


def init_item_rows(model: SessionModel, old_items: int, seed: int) -> int:
    """The item rows the window added (from `old_items` on) start from the item memory's
    co-occurrence counts (`cooc_vectors`, `init_new_rows`); how many rows were set."""
    mem = model.item_memory
    assert mem is not None, "item_init cooc needs the item memory"
    emb = model.embeddings[model.cfg.item_feature]
    x = cooc_vectors(mem.cooc_idx.cpu(), mem.cooc_val.cpu(), emb.weight.shape[1], seed)
    return init_new_rows(emb.weight.data, x, old_items, model.cfg.embedding_init_std)
