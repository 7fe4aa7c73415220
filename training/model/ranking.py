"""Serving top-k over the catalogue, as functions over tensors (SessionModel.next_item_topk calls them).

* exact: score every item, then topk (`exact_top_k`; cost O(V) per session);
* two-stage: a fixed number C of candidates per session (`candidates`: the session's
  items, the item memory's neighbour lists, the most popular items and the best items
  of an inverted-file index over the item table, `build_index` / `ivf_search`), scored
  exactly on those only, then `candidate_top_k`. The cost does not grow with V apart
  from the index's list heads (docs/scale.md measures it).
* re-ranking (ModelConfig.rerank): the item memory's candidates only (`memory_candidates`),
  which are also the only items the model ranks at all, so top-k on them is the exact
  top-k; no index needed.

Everything here is traceable given the index (built before tracing: no data-dependent
Python control flow, static shapes); `build_index` itself runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from training.model.config import ModelConfig
from training.names import FIRST_REAL_ID, PAD_ID

if TYPE_CHECKING:
    from training.model.memory_inputs import CountLists, TargetContext


def take(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx] for an index tensor of any shape, by one index_select: (*idx.shape, *table.shape[1:]).

    Advanced indexing with a multi-dimensional index (`table[idx]`) costs ~20x more on the
    CPU (measured at (64, 5000) ids into a (20k, 64) table); two-stage ranking gathers a lot."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


@torch.no_grad()
def ivf_index(x: Tensor, list_size: int, iters: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inverted-file index of (N, E) vectors for inner-product search, in plain torch (traceable to serve).

    Spherical k-means (directions; ceil(N / list_size) lists, trained on a sample of
    32 points per list, `iters` Lloyd steps), every vector assigned to its most similar
    centroid; a list longer than list_size is split into several rows with the same
    centroid, so the shapes are static: centroids (R, E), members (R, list_size) row
    indices into x, -1 = empty slot. Deterministic for a given seed. Cost at 1M x 64,
    list_size 512: ~30 s on one core (docs/scale.md).
    """
    n, dim = x.shape
    g = torch.Generator().manual_seed(seed)
    unit = F.normalize(x.float(), dim=1)  # (N, E)
    n_lists = max(1, -(-n // list_size))
    sample = unit[torch.randperm(n, generator=g)[: min(n, 32 * n_lists)].to(x.device)]  # (S, E)
    c = sample[torch.randperm(sample.shape[0], generator=g)[:n_lists].to(x.device)].clone()  # (n_lists, E)

    def assign(v: Tensor) -> Tensor:  # (N, E) -> (N,) most similar centroid, in chunks of bounded memory
        step = max(1, (1 << 24) // c.shape[0])
        return torch.cat([(v[i : i + step] @ c.t()).argmax(1) for i in range(0, v.shape[0], step)])

    for _ in range(iters):
        a = assign(sample)
        sums = torch.zeros_like(c).index_add_(0, a, sample)
        c = torch.where(torch.bincount(a, minlength=c.shape[0])[:, None] > 0, F.normalize(sums, dim=1), c)
    a = assign(unit)  # (N,)
    order = torch.argsort(a, stable=True)  # (N,) vectors grouped by list
    cnt = torch.bincount(a, minlength=c.shape[0])  # (n_lists,)
    rows_per = (cnt + list_size - 1) // list_size  # empty lists get no row
    row_start = torch.cumsum(rows_per, 0) - rows_per
    a_sorted = a[order]
    rank_in = torch.arange(n, device=x.device) - (torch.cumsum(cnt, 0) - cnt)[a_sorted]
    members = torch.full((int(rows_per.sum()), list_size), -1, dtype=torch.int64, device=x.device)
    members[row_start[a_sorted] + rank_in // list_size, rank_in % list_size] = order
    return c.repeat_interleave(rows_per, 0), members


@dataclass
class RankIndex:
    """Two-stage ranking's index over the item table (`build_index`); SessionModel keeps the
    tensors as buffers (baked into the traced model) and the sizes as Python ints (constants)."""

    pop_ids: Tensor  # (P,) the most popular real ids, always candidates
    centroids: Tensor  # (R, E) inverted-list heads
    members: Tensor  # (R, list_size) item ids of each list row, PAD_ID = empty slot
    probe: int  # list rows probed per session
    keep: int  # best items of the probed lists that become candidates


@torch.no_grad()
def build_index(table: Tensor, counts: Tensor | None, cfg: ModelConfig) -> RankIndex:
    """The index of a (V, E) item table: cfg.rank_popular ids with the highest `counts` (V,)
    (None: the largest item-vector norms, which dominate inner-product scores), and a spherical
    k-means of the real items' vectors (`ivf_index`) split into rows of cfg.ivf_list_size."""
    real = table[FIRST_REAL_ID:].float()  # (V-3, E)
    score = counts[FIRST_REAL_ID:].float() if counts is not None else real.norm(dim=1)
    n_pop = min(cfg.rank_popular, real.shape[0])
    pop_ids = score.topk(n_pop).indices.to(torch.int64) + FIRST_REAL_ID  # (P,)
    centroids, members = ivf_index(real, cfg.ivf_list_size)
    probe = min(cfg.ivf_probe, members.shape[0])
    return RankIndex(
        pop_ids=pop_ids,
        centroids=centroids.to(table.device),
        members=torch.where(members >= 0, members + FIRST_REAL_ID, PAD_ID).to(table.device),
        probe=probe,
        keep=min(cfg.ivf_keep, probe * cfg.ivf_list_size),
    )


def ivf_search(q: Tensor, table: Tensor, index: RankIndex) -> Tensor:
    """(B, E) head inputs -> (B, keep) ids: the best network scores among the items of the best-scoring lists."""
    B = q.shape[0]
    rows = (q.float() @ index.centroids.t()).topk(index.probe, dim=1).indices  # (B, probe)
    ids = take(index.members, rows).reshape(B, -1)  # (B, probe*M), pads 0
    s = torch.bmm(take(table, ids), q[:, :, None]).squeeze(2).float()  # (B, probe*M)
    s = s.masked_fill(ids == PAD_ID, float("-inf"))
    return ids.gather(1, torch.topk(s, index.keep, dim=1).indices)


@dataclass
class Neighbours:
    """The item memory's neighbour lists as candidate sources (`ItemMemory` buffers)."""

    cooc_idx: Tensor  # (V, K) co-occurrence lists
    succ_idx: Tensor  # (V, K) successor lists
    context: int  # last items of a session whose co-occurrence lists are candidates (rank_context)


def candidates(
    items: Tensor,
    lengths: Tensor,
    q: Tensor,
    table: Tensor,
    index: RankIndex,
    neighbours: Neighbours | None = None,
) -> Tensor:
    """Two-stage candidates: (B, L) items, (B,) lengths, (B, E) head inputs -> (B, C) ids sorted per row.

    C = L + context*K + K + P + keep (the neighbour parts only with `neighbours`): the
    session's items, the co-occurrence lists of its last `context` items, the successors
    of its last item, the popular ids (they stand in for the popularity bonus every item
    gets), and `ivf_search`'s best items. Repeats and pads (0) are left in; the caller
    masks them (`mask_candidates`).
    """
    B, L = items.shape
    dev = items.device
    pos = torch.arange(L, device=dev)
    parts = [torch.where(pos[None, :] < lengths[:, None], items, PAD_ID)]  # (B, L)
    if neighbours is not None:
        back = lengths[:, None] - 1 - torch.arange(max(neighbours.context, 1), device=dev)[None, :]  # (B, n)
        recent = torch.where(back >= 0, items.gather(1, back.clamp(min=0)), PAD_ID)  # (B, n) last first
        if neighbours.context > 0:
            nb = take(neighbours.cooc_idx, recent).long()  # (B, n, K)
            parts.append(torch.where(recent[:, :, None] != PAD_ID, nb, PAD_ID).reshape(B, -1))
        succ = take(neighbours.succ_idx, recent[:, 0]).long()  # (B, K)
        parts.append(torch.where(recent[:, :1] != PAD_ID, succ, PAD_ID))
    parts.append(index.pop_ids[None, :].expand(B, -1))  # (B, P)
    parts.append(ivf_search(q, table, index))  # (B, keep)
    return torch.cat(parts, 1).sort(1).values  # (B, C)


def memory_candidates(context: TargetContext, lists: CountLists, popular: Tensor) -> Tensor:
    """Re-ranking's candidates of M targets: (M, W + W*K + K + P) ids, PAD_ID where an entry is none.

    For a target whose context is x_1..x_n: the context items x_j, the co-occurrence-list
    entries of every x_j with a count > 0, the successor-list entries of x_n with a count > 0
    (the counts as given: in training each session's own are left out first, so what only
    the session itself put there is not a candidate), and the P ids of `popular` (P,).
    Repeats are left in. Everything else is never ranked: the network re-ranks what the
    counts propose instead of competing with them over the whole catalogue.
    """
    M = context.items.shape[0]
    items = torch.where(context.ctx, context.items, PAD_ID)  # (M, W)
    cooc = torch.where(context.ctx[:, :, None] & (lists.cooc_val > 0), lists.cooc_idx, PAD_ID)  # (M, W, K)
    succ = torch.where(context.has_last[:, None] & (lists.succ_val > 0), lists.succ_idx, PAD_ID)  # (M, K)
    return torch.cat([items, cooc.reshape(M, -1), succ, popular[None, :].expand(M, -1)], 1)


def mask_candidates(scores: Tensor, cand: Tensor, special: Tensor) -> Tensor:
    """(B, C) scores of the sorted candidates `cand` -> the same with -inf at every repeated id
    (all but the first of equal ids) and at the `special` (V,) bool ids: they never come out."""
    repeat = F.pad(cand[:, 1:] == cand[:, :-1], (1, 0))  # (B, C) all but the first of equal ids
    return scores.masked_fill(repeat | take(special, cand), float("-inf"))


def candidate_top_k(scores: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, C) masked scores of the candidates `cand` (`mask_candidates`) -> (top (B, k), ids (B, k)),
    best first."""
    top, col = torch.topk(scores, k, dim=1)  # (B, k)
    return top, cand.gather(1, col)


def candidate_ranks(scores: Tensor, cand: Tensor, targets: Tensor) -> Tensor:
    """(B, C) masked scores of the candidates `cand`, (B,) target ids -> (B,) float64 pessimistic
    ranks of the targets among the candidates (1 + the other candidates scoring >= the target,
    as `training.metrics.pessimistic_ranks` over the catalogue), +inf where the target is not a
    candidate (or scores -inf): what the served two-stage model's top-k gives each target."""
    at = (cand == targets[:, None]) & (scores > float("-inf"))  # (B, C) its first, unmasked occurrence
    ts = torch.where(at, scores, float("-inf")).max(1).values  # (B,)
    ranks = (scores >= ts[:, None]).sum(1).to(torch.float64)  # the target itself included: 1 + others
    return torch.where(at.any(1), ranks, float("inf"))


def exact_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, V) scores of every item (special ids at -inf) -> (top (B, k), ids (B, k)), best first."""
    return torch.topk(scores, k, dim=1)
