"""CandidateScorer: a small MLP that re-ranks the item memory's best candidates (ModelConfig.scorer_hidden).

The combiner (`ItemMemory.candidate_scores`) adds the count terms to the network's logits linearly,
through per-session gates. A learned function of the same counts ranks better than that sum on both
logs of docs/quality.md (`python -m bench.count_scorer`: an MLP over these features, fitted on forward
sessions, 1.15x the count blend on NowPlaying1M against the model's 1.08x). So the served score of a
session's top `top` candidates by the combiner's score z is

    s = MLP(count features of the candidate, z's log-softmax over the candidates, log1p(z's rank))

and every other candidate ranks below them, in z's order. The count features (`count_features`),
per distance bin of the context position (0, 1, 2, 3-5, 6+): the summed log1p co-occurrence counts,
how many context items co-occur with the candidate, how often it is in the context; then the last
item's log1p successor count, log1p popularity and the session's log1p length.

The MLP's weights are buffers, not parameters: the network's optimizer never sees them. They are
fitted between windows on forward sessions (`training.scorer_fit`: each window's training sessions
scored by the model of the window before, with the counts of the windows before) and travel in the
checkpoint and the traced model. `on` (a buffer, 0 or 1) says whether the scores are re-ranked; at 0
(unfitted, not chosen by the forward check, or the count blend serving) they are z, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model.memory_inputs import CountLists, TargetContext
from training.names import FIRST_REAL_ID

BINS = ((0, 0), (1, 1), (2, 2), (3, 5), (6, 10**6))  # distance of a context position to the last one
BIN_NAMES = ("d0", "d1", "d2", "d3-5", "d6+")
COUNT_FEATURES = [
    "log1p_pop",
    *(f"{name}_{b}" for b in BIN_NAMES for name in ("cooc_log", "cooc_items", "repeats")),
    "succ_log",
    "log1p_length",
]
FEATURES = [*COUNT_FEATURES, "z_log_softmax", "log1p_z_rank"]
# ModelConfig.scorer_network: appended to FEATURES (the network's logit of the candidate, ungated, as a
# log-softmax over the candidates; the session's gates g_cooc, g_succ, g_repeat, g_pop and head weight)
NETWORK_FEATURES = ["head_log_softmax", "gate_cooc", "gate_succ", "gate_repeat", "gate_pop", "head_weight"]
# ModelConfig.scorer_recent: after COUNT_FEATURES (each candidate's log1p count in the newest training sessions)
RECENT_FEATURES = ["log1p_pop_recent"]
NO_SCORE = -50.0  # the log-softmax feature of a slot that holds no candidate (its score is -inf anyway)


def _scatter(cand: Tensor, idx: Tensor, val: Tensor) -> Tensor:
    """(B, C) sorted candidates; (B, N) ids with (B, N, F) values -> (B, C, F) the values summed per
    candidate (ids that are not candidates dropped; a repeated candidate gets them at its first position).
    One search and one scatter for every feature that the same ids carry."""
    C = cand.shape[1]
    j = torch.searchsorted(cand, idx).clamp_(max=C - 1)
    val = torch.where((cand.gather(1, j) == idx)[..., None], val.float(), 0.0)
    out = torch.zeros(*cand.shape, val.shape[2], device=cand.device)
    return out.scatter_add_(1, j[..., None].expand(-1, -1, val.shape[2]), val)


def count_features(pop: Tensor, context: TargetContext, lists: CountLists, cand: Tensor, lengths: Tensor) -> Tensor:
    """(B, C) sorted candidates of B sessions (their context and count lists: `ItemMemory._session_view`)
    -> (B, C, len(COUNT_FEATURES)) float32 (`COUNT_FEATURES`; pop: the (V,) popularity table)."""
    B, C = cand.shape
    cooc_log, cooc_any = torch.log1p(lists.cooc_val.float()), (lists.cooc_val > 0).float()
    inb = torch.stack(
        [(context.ctx & (context.dist >= lo) & (context.dist <= hi)).float() for lo, hi in BINS], 2
    )  # (B, W, bins)
    # per bin: summed log1p co-occurrence, co-occurring context items (B, W*K, 2 x bins); repeats (B, W, bins)
    cooc = torch.stack([cooc_log[..., None] * inb[:, :, None, :], cooc_any[..., None] * inb[:, :, None, :]], 4)
    cooc = _scatter(cand, lists.cooc_idx.reshape(B, -1), cooc.reshape(B, -1, 2 * len(BINS)))  # (B, C, bins x 2)
    rep = _scatter(cand, context.items.long(), inb)  # (B, C, bins)
    f = [torch.log1p(pop[cand].float())[..., None]]
    for b in range(len(BINS)):  # the order of COUNT_FEATURES: per bin cooc_log, cooc_items, repeats
        f += [cooc[..., 2 * b : 2 * b + 2], rep[..., b : b + 1]]
    succ = torch.log1p(lists.succ_val.float()) * context.has_last[:, None]
    f.append(_scatter(cand, lists.succ_idx, succ[..., None]))
    f.append(torch.log1p(lengths.float())[:, None, None].expand(B, C, 1))
    return torch.cat(f, 2)


def not_candidates(cand: Tensor) -> Tensor:
    """(B, C) sorted candidates -> (B, C) bool: a special id or a repeat of the id before it (the
    entries `ranking.mask_candidates` sets to -inf)."""
    bad = cand < FIRST_REAL_ID
    return bad | F.pad(cand[:, 1:] == cand[:, :-1], (1, 0))


@contextmanager
def tapping(mem: nn.Module, tap: list | None) -> Iterator[None]:
    """While in it, the item memory's `candidate_scores` appends the scorer's inputs of every batch it
    scores to `tap` ((x, at, ok, cand) each: `CandidateScorer.inputs` and the candidates); None: no-op."""
    if tap is None:
        yield
        return
    mem.scorer_tap = tap
    try:
        yield
    finally:
        mem.scorer_tap = None


class CandidateScorer(nn.Module):
    """The MLP over `FEATURES` (two hidden layers of `hidden` ReLUs), as buffers, applied to the `top`
    best candidates by z (module docstring)."""

    def __init__(self, hidden: int, top: int, network: bool = False, recent_items: int = 0):
        super().__init__()
        recent = recent_items > 0
        self.network, self.recent = network, recent
        # the inputs in their order: the count features (and the recent count), z's two, the network's
        self.names = [
            *COUNT_FEATURES, *(RECENT_FEATURES if recent else []), *FEATURES[len(COUNT_FEATURES) :],
            *(NETWORK_FEATURES if network else []),
        ]  # fmt: skip
        n = len(self.names)
        self.top = top
        for name, shape in dict(mu=(n,), sd=(n,), w1=(n, hidden), b1=(hidden,), w2=(hidden, hidden), b2=(hidden,)).items():
            self.register_buffer(name, torch.ones(shape) if name == "sd" else torch.zeros(shape))
        self.register_buffer("w3", torch.zeros(hidden))
        self.register_buffer("b3", torch.zeros(()))
        self.register_buffer("on", torch.zeros(()))  # 1: re-rank; 0: the scores are z
        # ModelConfig.scorer_recent: each item's count in the newest training sessions (`set_recent`), over
        # the item memory's `recent_items` ids (grown with them); None without
        self.register_buffer("pop_recent", torch.zeros(recent_items) if recent else None)

    PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")  # the MLP's weights (`training.scorer_fit` fits them)

    @torch.no_grad()
    def set_recent(self, counts: Tensor) -> None:
        """ModelConfig.scorer_recent: (V,) each item's count in the newest training sessions."""
        if self.pop_recent is None:
            raise ValueError("set_recent: this scorer has no recent counts (ModelConfig.scorer_recent is 0)")
        if tuple(counts.shape) != tuple(self.pop_recent.shape):
            raise ValueError(f"recent counts: shape {tuple(counts.shape)}, expected {tuple(self.pop_recent.shape)}")
        self.pop_recent.copy_(counts.to(self.pop_recent.dtype))

    @torch.no_grad()
    def grow(self, n_items: int) -> None:
        """Zero recent counts appended up to `n_items` (the item memory's vocabulary grows); no-op without."""
        if self.pop_recent is not None:
            self.pop_recent = torch.cat([self.pop_recent, self.pop_recent.new_zeros(n_items - len(self.pop_recent))])

    def with_recent(self, feats: Tensor, cand: Tensor) -> Tensor:
        """(B, C, len(COUNT_FEATURES)) count features of the (B, C) candidates -> with their log1p recent
        count after them (RECENT_FEATURES) where the scorer reads it, else `feats` itself."""
        if self.pop_recent is None:
            return feats
        recent = self.pop_recent.index_select(0, cand.reshape(-1)).view(cand.shape).float()
        return torch.cat([feats, torch.log1p(recent)[..., None]], 2)

    @staticmethod
    def mlp(x: Tensor, w: dict[str, Tensor]) -> Tensor:
        """(..., F) normalised features -> (...) scores with the weights `w` (PARAMS by name)."""
        a = F.relu(x @ w["w1"] + w["b1"])
        a = F.relu(a @ w["w2"] + w["b2"])
        return a @ w["w3"] + w["b3"]

    def inputs(
        self, z: Tensor, bad: Tensor, feats: Tensor, net: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C) combiner scores, (B, C) not-a-candidate mask, (B, C, len(COUNT_FEATURES)) count
        features (with `recent`, RECENT_FEATURES after them; with `network`, net: the network's (B, C)
        item logits and (B, 5) session gates) -> the `top` best candidates by z: their features
        (B, top, F), not normalised (F: `names`); their columns (B, top), best first; and which of them
        are candidates (B, top)."""
        # `top` empty columns appended: a session with fewer candidates than slots needs no branch (a trace
        # keeps none); a slot there is not ok
        zm = F.pad(z.masked_fill(bad, float("-inf")), (0, self.top), value=float("-inf"))
        zt, at = zm.topk(self.top, dim=1)
        ok = torch.isfinite(zt)
        ls = torch.where(ok, zt - torch.logsumexp(zm, 1, keepdim=True), NO_SCORE)
        rank = torch.log1p(torch.arange(self.top, device=z.device, dtype=torch.float32)).expand_as(ls)
        f = F.pad(feats, (0, 0, 0, self.top)).gather(1, at[:, :, None].expand(-1, -1, feats.shape[2]))
        x = [f, ls[..., None], rank[..., None]]
        if self.network:
            assert net is not None, "a scorer with the network's inputs needs them"
            raw, gates = net
            hm = F.pad(raw.masked_fill(bad, float("-inf")), (0, self.top), value=float("-inf"))
            hls = torch.where(ok, hm.gather(1, at) - torch.logsumexp(hm, 1, keepdim=True), NO_SCORE)
            x += [hls[..., None], gates[:, None, :].expand(-1, self.top, -1)]
        return torch.cat(x, 2), at, ok

    def forward(self, z: Tensor, bad: Tensor, feats: Tensor, net: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, C) -> (B, C) scores: the MLP's at the `top` best candidates by z, the others below all of
        them in z's order, -inf where `bad`; z itself while `on` is 0."""
        return self.rescore(z, bad, *self.inputs(z, bad, feats, net))

    def rescore(self, z: Tensor, bad: Tensor, x: Tensor, at: Tensor, ok: Tensor) -> Tensor:
        """`forward` from its `inputs` (x, at, ok), computed once."""
        s = self.mlp((x - self.mu) / self.sd, {k: getattr(self, k) for k in self.PARAMS})  # (B, top)
        s = s.masked_fill(~ok, float("-inf"))
        floor = torch.where(ok, s, float("inf")).min(1, keepdim=True).values - 1.0  # below every re-ranked one
        zm = z.masked_fill(bad, float("-inf"))
        last = F.pad(zm, (0, self.top), value=float("-inf")).gather(1, at[:, -1:])  # z of the last slot
        rest = torch.where(bad | ~torch.isfinite(last), float("-inf"), floor - (last - z))
        out = F.pad(rest, (0, self.top)).scatter(1, at, s)[:, : z.shape[1]]
        return torch.where(self.on > 0, out, z)
