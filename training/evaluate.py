"""Evaluation: the model, the baselines and the count blend on one window's sessions.

The protocol (training/train.py, docs/contracts.md): for each evaluation session the
input is every item but the last and the target is the last item, ranked over the
catalogue known after the training window (`known_inputs`: later ids are OOV in the
inputs and a target unknown then is a miss for every method); pessimistic ties
(training/metrics.py).

    evaluate_model(model, st, device, batch_size, miss)   the model's metrics
    count_blend_metrics(tables, cfg, st, ...)             the item memory untrained
    blend_memory(tables, cfg)                             its scorer (bench.count_fusion adds terms to it)
    evaluate_sessions(model, st, known, counts, ...)      all of them: a metrics row's entries
    split_holdout(st, fraction, seed)                     early stopping's held-back sessions
    holdout_indices(n, fraction, seed)                    the same rows as indices
    score_held(model, held, ...)                          and their NDCG@20 after an epoch
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import training.model.ranking as ranking
from training.baselines import BASELINES, BaselineCounts, evaluate_baselines, memory_tables
from training.data.splits import SessionTensors, eval_inputs_targets
from training.metrics import KS, metrics_from_ranks, pessimistic_ranks
from training.model import ItemMemory, ModelConfig, SessionModel
from training.names import FIRST_REAL_ID, OOV_ID

# what every evaluated row reports beside the model: the baselines of training/baselines.py and the
# count blend (the item memory untrained: `count_blend_metrics`)
COUNT_BLEND = "count_blend"
REPORTED = (*BASELINES, COUNT_BLEND)

# scores held at once by evaluation: rows x V floats (32M floats = 128 MB; 32 rows at 1M items)
EVAL_MAX_SCORES = 32_000_000
TOP_AGREE = 20  # the served and the exact top-k compared by `evaluate_both`
# up to this many items, candidate scores of a batch of sessions read the network's logits from one
# (B, V) product instead of gathering (B, C, E) item vectors (`SessionModel.candidate_scores`):
# at C = 2,248 candidates, 64 sessions, 1 thread, 100k items 22 vs 56 ms, 200k 52 vs 50 ms
# (docs/throughput.md section 3c); the served model (batch 1 and up) gathers; CPU only (same bits there)
EVAL_PRODUCT_ITEMS = 100_000


def eval_rows(n_items: int, batch_size: int, max_scores: int = EVAL_MAX_SCORES) -> int:
    """Sessions scored at once: `batch_size`, fewer when batch_size x n_items passes `max_scores`."""
    return max(1, min(batch_size, max_scores // max(1, n_items)))


def _with_misses(ranks: Tensor, miss: Tensor | None) -> dict[str, float]:
    """Metrics of (N,) ranks, a miss (rank inf) where `miss` (N,) is True."""
    return metrics_from_ranks(_missed(ranks, miss))


def _missed(ranks: Tensor, miss: Tensor | None) -> Tensor:
    """(N,) ranks, inf where `miss` (N,) is True."""
    if miss is not None:
        ranks = torch.where(miss, torch.tensor(float("inf"), dtype=ranks.dtype), ranks)
    return ranks


def served_ranking(model: SessionModel) -> bool:
    """Whether the served model ranks in two stages (its top-k then comes from a fixed number of
    candidates per session, and evaluation ranks what it serves: `evaluate_model`)."""
    return model.cfg.rank == "two_stage"


def differs_from_exact(model: SessionModel) -> bool:
    """Whether the served top-k can differ from the exact one: two stages over an index's
    candidates. Under re-ranking the memory's candidates are the only items the exact scores
    leave finite, so the two agree and only the cheaper (served) ranking is evaluated."""
    return served_ranking(model) and not (model.cfg.rerank and model.item_memory is not None)


@torch.no_grad()
def evaluate_model(
    model: SessionModel,
    st: SessionTensors,
    device: torch.device,
    batch_size: int,
    miss: Tensor | None = None,
    max_scores: int = EVAL_MAX_SCORES,
    exact: bool | None = None,
    *,
    ranks_out: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics of the model on every session of `st` (input: all but the last item);
    ranks_out: its (N,) target ranks kept under "model" too (float64, inf = a miss).

    exact (None: unless the model is served in two stages, `served_ranking`): rank the target
    over the full catalogue (`next_item_scores`, O(V) per session), in chunks of
    `eval_rows(V, batch_size, max_scores)` sessions, so a [sessions, V] matrix is never held
    for a large V. Otherwise rank it among the session's two-stage candidates, as the served
    model does (`SessionModel.candidate_scores`, `ranking.candidate_ranks`: not a candidate is a
    miss), O(candidates) per session. Always in float32, also on a GPU: reduced-precision
    logits would create ties, which the pessimistic ranking counts against the target.
    miss (N,) bool: sessions whose target counts as a miss whatever the scores
    (a target unknown after the training window, see `known_inputs`).
    """
    ranks = _missed(_ranks(model, st, device, batch_size, max_scores, exact), miss)
    if ranks_out is not None:
        ranks_out["model"] = ranks.double().numpy()
    return metrics_from_ranks(ranks)


def _ranks(
    model: SessionModel,
    st: SessionTensors,
    device: torch.device,
    batch_size: int,
    max_scores: int = EVAL_MAX_SCORES,
    exact: bool | None = None,
    top: list[Tensor] | None = None,
) -> Tensor:
    """(N,) target ranks of `evaluate_model`; `top`: the top-TOP_AGREE ids of each chunk appended."""
    exact = not served_ranking(model) if exact is None else exact
    feats, lengths, targets = eval_inputs_targets(st, model.cfg.item_feature)
    # on the CPU the product and the gather give the same bits; a GPU's kernels round differently
    product = (
        not exact
        and device.type == "cpu"
        and model.item_memory is not None
        and model.cfg.n_items <= EVAL_PRODUCT_ITEMS
    )
    if exact or product:
        batch_size = eval_rows(model.cfg.n_items, batch_size, max_scores)
    was_training = model.training
    model.eval()
    ranks = []
    for i in range(0, len(targets), batch_size):
        f = {k: v[i : i + batch_size].to(device) for k, v in feats.items()}
        n, t = lengths[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
        if exact:
            scores = model.next_item_scores(f, n)
            ranks.append(pessimistic_ranks(scores, t).cpu())
            if top is not None:
                top.append(_finite_top(*scores.topk(min(TOP_AGREE, scores.shape[1]), dim=1)))
        else:
            scores, cand = model.candidate_scores(f, n, product)
            ranks.append(ranking.candidate_ranks(scores, cand, t).cpu())
            if top is not None:
                top.append(_finite_top(*ranking.candidate_top_k(scores, cand, min(TOP_AGREE, cand.shape[1]))))
    model.train(was_training)
    return torch.cat(ranks)


def _finite_top(top: Tensor, ids: Tensor) -> Tensor:
    """(B, k) best scores and their ids -> (B, TOP_AGREE) ids, -1 where a score is -inf (a special
    or masked id) and past k (a catalogue or candidate set smaller than TOP_AGREE: early windows)."""
    ids = torch.where(torch.isfinite(top), ids, -1)
    return F.pad(ids, (0, TOP_AGREE - ids.shape[1]), value=-1).cpu()


def evaluate_both(
    model: SessionModel,
    st: SessionTensors,
    device: torch.device,
    batch_size: int,
    miss: Tensor | None = None,
    ranks_out: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """A two-stage model's served metrics (`evaluate_model`), its exact metrics under "exact" and
    how the two agree under "served_agreement": "top20_overlap", the mean share of the exact
    top 20 that the served top 20 holds; "same_rank", the share of sessions whose target gets
    the same rank from both (a miss counts as the same only if both miss it within 40)."""
    tops: dict[bool, list[Tensor]] = {True: [], False: []}
    ranks = {e: _ranks(model, st, device, batch_size, exact=e, top=tops[e]) for e in (False, True)}
    if ranks_out is not None:  # the served ranks (`evaluate_sessions`)
        ranks_out["model"] = _missed(ranks[False], miss).double().numpy()
    out: dict[str, Any] = dict(_with_misses(ranks[False], miss))
    out["exact"] = _with_misses(ranks[True], miss)
    a, b = torch.cat(tops[True]), torch.cat(tops[False])  # (N, 20) each, -1: no item
    held = a >= 0  # (N, 20) the exact top's real entries
    shared = ((a[:, :, None] == b[:, None, :]) & held[:, :, None]).any(2).sum(1)  # (N,)
    overlap = shared / held.sum(1).clamp(min=1)  # (N,) share of the exact top the served top holds
    cut = max(KS)
    same = torch.where(ranks[True] > cut, ranks[False] > cut, ranks[True] == ranks[False])
    out["served_agreement"] = {
        "top20_overlap": float(overlap.mean()),
        "same_rank": float(same.float().mean()),
    }
    return out


def known_inputs(
    st: SessionTensors, sizes: dict[str, int], item_feature: str, age_feature: str | None = None
) -> tuple[SessionTensors, Tensor]:
    """Sessions as the served model after window t sees them, and which targets it cannot know.

    sizes: categorical feature -> ids known after window t (schema.json's vocabulary_by_window;
    ids follow first appearance, so the known ones are [0, size)). Every id >= size becomes
    OOV; where the item is unknown, `age_feature` (the workflow's derived item age, None when
    the data gives it) becomes 0, as the item_age_days op gives for an item unseen at fit.
    Returns (sessions, unknown (N,) bool: the session's last item, the evaluation target, is unknown).
    """
    if item_feature not in sizes:
        raise ValueError(f"known_inputs: sizes {sorted(sizes)} lack the item feature {item_feature!r}")
    feats = dict(st.feats)
    unknown = feats[item_feature] >= sizes[item_feature]  # (N, L)
    for name, n in sizes.items():
        if name in feats:
            feats[name] = feats[name].masked_fill(feats[name] >= n, OOV_ID)
    if age_feature is not None and age_feature in feats:
        feats[age_feature] = feats[age_feature].masked_fill(unknown, 0.0)
    rows = torch.arange(len(st))
    last_unknown = unknown[rows, (st.lengths - 1).clamp(min=0)]  # (N,)
    return SessionTensors(feats, st.lengths, st.session_id, st.source), last_unknown


def count_blend_metrics(*args: Any, **kwargs: Any) -> dict[str, float]:
    """The count blend's metrics: `count_blend_ranks` (same arguments) averaged."""
    return metrics_from_ranks(count_blend_ranks(*args, **kwargs))


def blend_memory(tables: dict[str, Tensor], cfg: ModelConfig, device: torch.device | None = None) -> ItemMemory:
    """The count blend's scorer: a fresh ItemMemory (gates at their initial values, no network logits)
    in eval mode holding count `tables` ((V, K) and (V,) tensors, `ItemMemory.TABLES`)."""
    V = int(tables["pop"].shape[0])
    mem = ItemMemory(V, int(tables["cooc_idx"].shape[1]), cfg.max_len, cfg.d_model, cfg.memory_decay)
    mem = mem.to(device).eval()
    mem.set_tables(**{k: tables[k].to(device) for k in ItemMemory.TABLES})
    return mem


@torch.no_grad()
def count_blend_ranks(
    tables: dict[str, Tensor],
    cfg: ModelConfig,
    st: SessionTensors,
    device: torch.device,
    batch_size: int,
    known: int | None = None,
    miss: Tensor | None = None,
    *,
    dense: bool = False,
) -> Tensor:
    """The count blend: a fresh ItemMemory (gates at their initial values, no network logits)
    holding count `tables` (the model's item memory buffers, or `memory_tables` of the same
    counts): what the counts alone give, on the model's sessions. Ids >= `known` are not ranked.
    -> (N,) target ranks, inf for a miss. Ranked by `SparseBlendRanker`; `dense`: by scoring every
    item (the same ranks, O(V) per session)."""
    mem = blend_memory(tables, cfg, device)
    feats, lengths, targets = eval_inputs_targets(st, cfg.item_feature)
    V = int(tables["pop"].shape[0])
    known = V if known is None else min(known, V)
    ranker = None if dense else SparseBlendRanker(mem, known)
    ranks = []
    for i in range(0, len(targets), batch_size):
        items = feats[cfg.item_feature][i : i + batch_size].to(device)
        lens = lengths[i : i + batch_size].to(device)
        t = targets[i : i + batch_size].to(device)
        h = torch.zeros(len(lens), cfg.d_model, device=device)  # the gates' weights are 0: h is not read
        if ranker is not None:
            ranks.append(ranker.ranks(h, items, lens, t).cpu())
            continue
        scores = mem.next_item_scores(h, items, lens)  # (b, V)
        scores[:, :FIRST_REAL_ID] = float("-inf")
        scores[:, known:] = float("-inf")
        ranks.append(pessimistic_ranks(scores, t).cpu())
    return _missed(torch.cat(ranks), miss)


class SparseBlendRanker:
    """The count blend's pessimistic target ranks (`pessimistic_ranks` over the catalogue, the
    special ids and those >= `known` at -inf) without scoring the catalogue.

    Outside a session's sparse entries (its own items, their co-occurrence lists, the last item's
    successors: `ranking.memory_candidates` without popular ids) the blend scores an item by its
    popularity term alone, g_pop * log1p(pop), the same for every session (the gates are at their
    start). So the items scoring >= the target are the session's entries that do (by their full
    scores, `ItemMemory.candidate_scores`) and the other items whose popularity score does (binary
    search in that score, sorted once). The values are the dense path's float32 values (the same
    terms added in the same order; the dense popularity term is a product whose other factors are
    zero), so the ranks are the same, ties included (tested against the dense path, and on real
    logs). Cost per session O(C log V) for its C entries instead of O(V)."""

    def __init__(self, mem: ItemMemory, known: int):
        if mem.rerank_popular or mem.pop_prior is not None or mem.cooc_curve is not None:
            raise ValueError("SparseBlendRanker ranks the count blend: a fresh ItemMemory (`blend_memory`)")
        self.mem, dev = mem, mem.pop.device
        with torch.no_grad():
            g = F.softplus(mem.gate(torch.zeros(1, mem.gate.in_features, device=dev)))  # (1, 4) every session's
            self.pop_score = torch.log1p(mem.pop) * mem._pop_gate(g)[0]  # (V,) as candidate_scores computes it
        self.sorted = self.pop_score[FIRST_REAL_ID:known].sort().values  # the real known ids', ascending
        self.special = torch.ones(mem.pop.shape[0], dtype=torch.bool, device=dev)  # -inf in the dense scores
        self.special[FIRST_REAL_ID:known] = False

    @torch.no_grad()
    def ranks(self, h: Tensor, items: Tensor, lengths: Tensor, targets: Tensor) -> Tensor:
        """(B, d) hidden states (read by nothing: zero gate weights), (B, L) sessions, (B,) lengths
        and target ids -> (B,) float64 pessimistic ranks."""
        mem, neg = self.mem, float("-inf")
        cand = mem.session_candidates(items, lengths)  # (B, C) sorted, repeats and PAD_ID in
        scores = ranking.mask_candidates(mem.candidate_scores(h, items, lengths, cand, None), cand, self.special)
        live = scores > neg  # (B, C) each real known entry once
        at = (cand == targets[:, None]) & live  # (B, C) the target among the entries
        ts = torch.where(at.any(1), torch.where(at, scores, neg).max(1).values, self.pop_score[targets])
        ts = ts.masked_fill(self.special[targets], neg)  # (B,) a target the dense path masks
        # the real known ids whose popularity score is >= ts, less the entries among them, plus the
        # entries whose own score is >= ts; the target is one of them
        n_pop = self.sorted.shape[0] - torch.searchsorted(self.sorted, ts[:, None]).squeeze(1)
        n_pop = n_pop - ((self.pop_score[cand] >= ts[:, None]) & live).sum(1)
        ge = n_pop + ((scores >= ts[:, None]) & live).sum(1) - 1
        # a target at -inf: the dense path counts every other id, the -inf ones too
        ge = torch.where(ts == neg, self.pop_score.shape[0] - 1, ge)
        return (1 + ge).to(torch.float64)


def evaluate_sessions(
    model: SessionModel,
    st: SessionTensors,
    known: dict[str, int],
    counts: BaselineCounts | None,
    device: torch.device,
    batch_size: int,
    age_feature: str | None = None,
    exact_max_items: int = 0,
    *,
    ranks_out: dict[str, np.ndarray] | None = None,
    fuse_blend: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Model, baselines (with `counts`) and count blend on evaluation sessions `st`, with only
    what was known (`known` sizes after the training window): a metrics row's entries
    ("unseen_targets", the model's metrics, "eval_seconds", "baselines"). A model served in two
    stages reports its served metrics, and up to `exact_max_items` item ids also the exact
    ones and their agreement (`evaluate_both`). ranks_out: filled with every method's (N,)
    target ranks (float64, inf = a miss; "model", the baselines, "count_blend"), the metrics'
    per-session source (TrainConfig.save_ranks, `bench.paired`). fuse_blend (TrainConfig.fuse_blend):
    the model also with its item memory's `blend_weight` at each weight, as baselines "fused_B"."""
    item = model.cfg.item_feature
    st, miss = known_inputs(st, known, item, age_feature)
    row: dict[str, Any] = {"unseen_targets": float(miss.float().mean())}
    t0 = time.perf_counter()
    if differs_from_exact(model) and model.cfg.n_items <= exact_max_items:
        row.update(evaluate_both(model, st, device, batch_size, miss, ranks_out))
    else:
        row.update(evaluate_model(model, st, device, batch_size, miss, ranks_out=ranks_out))
    row["eval_seconds"] = time.perf_counter() - t0
    if counts is not None:
        feats, lengths, targets = eval_inputs_targets(st, item)
        row["baselines"] = evaluate_baselines(
            counts, feats[item].numpy(), lengths.numpy(), targets.numpy(), ranks_out
        )
        mem = model.item_memory
        if mem is not None:  # the model's own count tables
            tables = mem.tables()
        else:  # the same counts, as the memory would hold them
            tables = {
                k: torch.from_numpy(v)
                for k, v in memory_tables(counts, model.cfg.memory_k, model.cfg.memory_hop2).items()
            }
        blend = count_blend_ranks(tables, model.cfg, st, device, batch_size, known[item], miss)
        row["baselines"][COUNT_BLEND] = metrics_from_ranks(blend)
        if ranks_out is not None:
            ranks_out[COUNT_BLEND] = blend.double().numpy()
        for b in fuse_blend if mem is not None else ():  # TrainConfig.fuse_blend: model + b x blend
            mem.blend_weight = b
            try:
                ranks = _missed(_ranks(model, st, device, batch_size), miss)
            finally:
                mem.blend_weight = 0.0
            row["baselines"][f"fused_{b:g}"] = metrics_from_ranks(ranks)
            if ranks_out is not None:
                ranks_out[f"fused_{b:g}"] = ranks.double().numpy()
    return row


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, held) sorted row indices of n sessions: a random `fraction` held back (at least 1
    when fraction > 0 and n >= 2); the same n, fraction and seed give the same rows."""
    k = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def split_holdout(st: SessionTensors, fraction: float, seed: int) -> tuple[SessionTensors, SessionTensors]:
    """(fit, held): a random `fraction` of the sessions held back (`holdout_indices`)."""
    fit, held = holdout_indices(len(st), fraction, seed)
    return st.select(fit), st.select(held)


class HeldScore(NamedTuple):
    """Early stopping's score of an epoch on held-back training sessions."""

    ndcg20: float  # the better of the two below (with select_head), else with the head
    head_scale: float  # 1: the head's own item logits kept, 0: the gated counts only
    without_head: float | None  # NDCG@20 without the head's logits (None: not scored)


def score_held(
    model: SessionModel,
    held: SessionTensors,
    device: torch.device,
    batch_size: int,
    select_head: bool,
    exact: bool | None = None,
) -> HeldScore:
    """NDCG@20 of the model on held-back sessions, ranked as served (`evaluate_model`; exact:
    over the whole catalogue whatever the served ranking); with `select_head` (the item memory's
    head selection) also without the head's own item logits, keeping the better of the two."""
    score = evaluate_model(model, held, device, batch_size, exact=exact)["ndcg@20"]
    if not select_head:
        return HeldScore(score, 1.0, None)
    mem = model.item_memory
    assert mem is not None
    mem.head_scale.fill_(0.0)  # the same weights without the head's own item logits (gated counts only)
    without = evaluate_model(model, held, device, batch_size, exact=exact)["ndcg@20"]
    mem.head_scale.fill_(1.0)
    if without > score:
        return HeldScore(without, 0.0, without)
    return HeldScore(score, 1.0, without)
