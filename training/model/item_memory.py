"""ItemMemory: count-based item scores added to the transformer's logits through learned gates.

Filled per window by `training.trainer.set_memory` (the counts of training/baselines.py);
its tables are buffers, so they travel in the checkpoint and in the traced model. Three
entry points share one scoring core (`ItemMemory.combine`), whose inputs come grouped:

    TargetContext  what precedes each target (items, which are context, distances)
    CountLists     the count-table rows of that context (co-occurrence, successor lists)
    HeadFactors    the network's own item logits as factors h @ w^T (optional)

    next_item_scores(h, items, lengths, head)      inference: (B, V)
    candidate_scores(h, items, lengths, cand, head) serving on candidates: (B, C)
    packed_scores(h, items, segment, targets, ...)  training: (M, V) or (M, U), own session left out

Re-ranking (ModelConfig.rerank, `rerank_popular` > 0): only the memory's own candidates
are ranked (`candidates`: the context items, their co-occurrence lists, the last item's
successors, the most popular ids); training scores them on the union of the batch's
candidates (`rerank_view` + `rerank_columns` + `rerank_scores`: flat entries, the values
of `packed_view` + `combine(cols=...)` without their zeros), serving on each session's own
(`session_candidates` + `candidate_scores`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import training.model.ranking as ranking
from training.model.curves import CountCurve, PopPrior
from training.model.memory_inputs import CountLists, HeadFactors, PackedTargets, TargetContext
from training.model.ranking import take
from training.model.rerank import RerankEntries, RerankSets, _find, _pair_dots, _term_index, _term_values
from training.model.scorer import CandidateScorer, count_features, not_candidates
from training.names import FIRST_REAL_ID


def _inv_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


def _seen_before(context: TargetContext) -> Tensor:
    """(M, W) bool: the item at this position is also at an earlier position of the target's context."""
    ids, ctx = context.items, context.ctx
    W = ids.shape[1]
    before = torch.ones(W, W, dtype=torch.bool, device=ids.device).tril(-1)  # [j, i]: i < j
    return ((ids[:, :, None] == ids[:, None, :]) & ctx[:, None, :] & before).any(2)


class ItemMemory(nn.Module):
    """Count-based item scores added to the transformer's logits through learned gates.

    On a real click log a day holds ~1.5k sessions against a ~21k-item catalogue:
    most items are seen a handful of times, too few for their embeddings to learn
    which items go together, while counting does (docs/quality.md measures both).
    This block gives the model those counts as features and lets it learn how much
    to trust them, per session. Tables (buffers: saved in the checkpoint and baked
    into the traced model), built from the training sessions by `set_tables`
    (`training.baselines.memory_tables`):

        cooc_idx, cooc_val (V, K)  the K items found in most training sessions
                                   together with item a (row a), and those counts;
        succ_idx, succ_val (V, K)  the K most frequent direct successors of a;
        pop (V,)                   occurrences of each item.

    For a target whose context (the session so far) is x_1..x_n and a candidate c:

        cooc   = sum_j w_cooc[n-j] * log1p(cooc[x_j, c])  (w init decay**(n-j), learned)
        succ   = log1p(succ[x_n, c])
        repeat = sum_j w_rep[n-j] * [x_j == c]             (re-visits: ~14% of real targets)
        pop    = log1p(pop[c])

    score = g . (cooc, succ, repeat, pop) with g = softplus(Linear(h)) >= 0 computed
    from the transformer's hidden state h, plus the network's own item logits
    (times `head_scale`, and with `head_gate` times a per-session weight
    softplus(Linear(h)) >= 0 that learns how far the network is worth trusting on a
    session). During training every session is in the counts, so its own
    contribution is subtracted first (`packed_view`): otherwise the gates would learn
    that the counts always hold the answer. Pure tensor code, traceable; tables of
    zeros give scores of zero.
    """

    N_FEATURES = 4  # cooc, succ, repeat, pop
    BLEND_GATES = (1.0, 1.0, 1.0, 0.1)  # the gates' initial values: the count blend's weights

    def __init__(
        self,
        n_items: int,
        k: int,
        max_len: int,
        d_model: int,
        decay: float,
        *,
        head_gate: bool = False,
        rerank_popular: int = 0,
        head_repeats: bool = True,
        pop_prior: int = 0,
        cooc_curve: int = 0,
        scorer: tuple[int, int, bool, bool] = (0, 0, False, False),
    ):
        super().__init__()
        # ModelConfig.head_repeats: False = the network's own logit is left out of the score of every
        # item of the target's context (`_repeat_cells`), which the count terms alone score
        self.head_repeats = head_repeats
        self.register_buffer("cooc_idx", torch.zeros(n_items, k, dtype=torch.int32))
        self.register_buffer("cooc_val", torch.zeros(n_items, k))
        self.register_buffer("succ_idx", torch.zeros(n_items, k, dtype=torch.int32))
        self.register_buffer("succ_val", torch.zeros(n_items, k))
        self.register_buffer("pop", torch.zeros(n_items))
        # weight of the network's own item logits in the scores: 1, or 0 where training's
        # head selection (`--head-selection`) found the gated counts better on held-back sessions
        self.register_buffer("head_scale", torch.ones(()))
        self._col_of: Tensor | None = None  # sampled loss: item id -> candidate column (`_column_map`)
        # re-ranking (ModelConfig.rerank): > 0 = only the memory's candidates are ranked, this many
        # popular ids among them (`popular_ids`: derived from pop, so not in the state_dict)
        self.rerank_popular = rerank_popular
        self.register_buffer("popular", torch.zeros(0, dtype=torch.int64), persistent=False)
        self._popular_key: tuple | None = None  # which pop table `popular` was computed from
        self.decay = decay
        self.w_cooc = nn.Parameter(torch.empty(max(max_len, 1)))  # weight of a context item d positions before the last
        self.w_rep = nn.Parameter(torch.empty(max(max_len, 1)))
        self.gate = nn.Linear(d_model, self.N_FEATURES)
        # ModelConfig.head_gate: how much the network's own item logits count, per session (>= 0)
        self.head_gate: nn.Linear | None = nn.Linear(d_model, 1) if head_gate else None
        # ModelConfig.pop_prior: a learned function of each candidate's log1p(pop), of any sign (0 = off)
        self.pop_prior: PopPrior | None = PopPrior(pop_prior) if pop_prior else None
        # ModelConfig.cooc_curve: the co-occurrence term reads a learned curve of log1p(count) (0 = off)
        self.cooc_curve: CountCurve | None = CountCurve(cooc_curve) if cooc_curve else None
        # the count blend's weights added to the combiner's at this weight (0 = off): scores = the
        # model's + blend_weight x the blend's count scores. A Python float (a traced model bakes it
        # in); evaluation sets it for `TrainConfig.fuse_blend`, training never does.
        self.blend_weight = 0.0
        # ModelConfig.scorer_hidden, scorer_top, scorer_network: the MLP that re-ranks the best candidates
        # (re-ranking only)
        hidden, top, network, recent = scorer  # recent: ModelConfig.scorer_recent > 0
        self.scorer: CandidateScorer | None = (
            CandidateScorer(hidden, top, network, n_items if recent else 0) if hidden and rerank_popular else None
        )
        # training.scorer_fit: a list = candidate_scores appends the scorer's inputs to it (`scorer.tapping`)
        self.scorer_tap: list | None = None
        self._init_combiner()

    @torch.no_grad()
    def _init_combiner(self) -> None:
        """The combiner's initial values (no random draw): a fixed blend, counts at weight 1 and
        popularity as a tie-breaker, context weights decaying with distance, and the head gate at 1
        for every session (weight 0), as without the gate."""
        dist = self.decay ** torch.arange(self.w_cooc.numel(), dtype=torch.float32)
        self.w_cooc.copy_(dist)
        self.w_rep.copy_(dist)
        self.gate.weight.zero_()
        self.gate.bias.copy_(_inv_softplus(torch.tensor(self.BLEND_GATES)))
        if self.head_gate is not None:
            self.head_gate.weight.zero_()
            self.head_gate.bias.copy_(_inv_softplus(torch.tensor([1.0])))
        if self.pop_prior is not None:
            self.pop_prior.values.zero_()
        if self.cooc_curve is not None:
            self.cooc_curve.slopes.fill_(1.0)

    @torch.no_grad()
    def reset_to_blend(self) -> None:
        """The count blend (`training.evaluate.count_blend_metrics`): the combiner back at its
        initial values and no network logits (head_scale 0). `--blend-guard` calls it when the
        held-back sessions score the blend better; the next window's fit sets head_scale to 1."""
        self._init_combiner()
        self.head_scale.fill_(0.0)
        if self.scorer is not None:
            self.scorer.on.fill_(0.0)

    TABLES = ("cooc_idx", "cooc_val", "succ_idx", "succ_val", "pop")  # the count buffers

    @torch.no_grad()
    def set_tables(
        self, cooc_idx: Tensor, cooc_val: Tensor, succ_idx: Tensor, succ_val: Tensor, pop: Tensor
    ) -> None:
        """Copy new count tables in (shapes must match the buffers: (V, K) and (V,))."""
        for name, v in dict(
            cooc_idx=cooc_idx, cooc_val=cooc_val, succ_idx=succ_idx, succ_val=succ_val, pop=pop
        ).items():
            self.set_table(name, v)

    @torch.no_grad()
    def set_table(self, name: str, v: Tensor) -> None:
        """Copy one count table in (`TABLES`; its shape must match the buffer's)."""
        if name not in self.TABLES:
            raise ValueError(f"memory table {name!r}: expected one of {self.TABLES}")
        buf = getattr(self, name)
        if tuple(v.shape) != tuple(buf.shape):
            raise ValueError(f"memory table {name}: shape {tuple(v.shape)}, expected {tuple(buf.shape)}")
        buf.copy_(v.to(buf.dtype))

    @torch.no_grad()
    def grow(self, n_items: int) -> None:
        """Zero rows appended to the count tables up to `n_items` (a vocabulary that grows by window)."""
        for name in self.TABLES:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros((n_items - t.shape[0], *t.shape[1:]))]))
        if self.scorer is not None:
            self.scorer.grow(n_items)
        self._col_of = None  # sized for the old vocabulary
        self._popular_key = None

    def tables(self) -> dict[str, Tensor]:
        """The count buffers by name (`TABLES`)."""
        return {name: getattr(self, name) for name in self.TABLES}

    # --- the scores ------------------------------------------------------------------

    def combine(
        self,
        h: Tensor,
        context: TargetContext,
        lists: CountLists,
        head: HeadFactors | None = None,
        cols: Tensor | None = None,
    ) -> Tensor:
        """M targets -> (M, V) float32 scores: the network's item logits (head) + the count scores.

        h (M, d) hidden states (the gates read them); `context` and `lists`: the targets'
        sessions so far and their count-table rows; `head`: the network's item logits as
        factors (None: none). The popularity term is a rank-1 (M, V) matrix: it rides in
        the network's matmul as one more column, and the sparse terms are added in place.

        cols (U,) sorted unique item ids (the sampled loss's or re-ranking's columns): only
        those columns are scored, (M, U) out, and head.w holds their rows only (U, E).
        An item id in the sparse lists is found among cols through `_column_map`;
        ids that are not candidates are dropped. Nothing of size V is touched.
        """
        with torch.autocast(h.device.type, enabled=False):  # counts in float32, also under AMP
            g, lhs, rhs = self._factors(h, head, cols)  # (M, 4), (M, E+1), (V or U, E+1)
            out = lhs @ rhs.t()  # (M, V or U) network logits + g_pop * log1p(pop), fresh: added to in place
        n_cols = out.shape[1]

        col_of = None if cols is None else self._column_map(cols)
        for idx, val in self._count_terms(g, context, lists):  # out[m, idx[m, j]] += val[m, j]
            if col_of is None:
                out.scatter_add_(1, idx, val)
                continue
            j = col_of[idx].long().clamp_(max=n_cols - 1)  # column of each id if it is a candidate, else any
            out.scatter_add_(1, j, torch.where(cols[j] == idx, val, 0.0))
        if not self.head_repeats and head is not None:
            m, ids = self._repeat_cells(context)
            j = ids if col_of is None else col_of[ids].long().clamp_(max=n_cols - 1)
            val = self._repeat_head(lhs, rhs, m, j)
            ok = val.new_ones((), dtype=torch.bool) if cols is None else cols[j] == ids
            out.view(-1).index_add_(0, m * n_cols + j, torch.where(ok, val, 0.0))
        return out

    def _repeat_cells(self, context: TargetContext) -> tuple[Tensor, Tensor]:
        """(head_repeats off) the cells whose head logit is left out: each distinct item of each
        target's context, once (its first context position), as (target (N,), item id (N,)),
        row-major."""
        m, w = (context.ctx & ~_seen_before(context)).nonzero(as_tuple=True)
        return m, context.items[m, w].long()

    def _repeat_head(self, lhs: Tensor, rhs: Tensor, m: Tensor, col: Tensor) -> Tensor:
        """(N,) minus the network's logit at the cells (m, col) of `_factors`' (M, E+x) and
        (cols, E+x) factors (their last x columns are the popularity terms, not the network's)."""
        e = lhs.shape[1] - (1 if self.pop_prior is None else 2)
        return -(lhs[m, :e] * rhs[col, :e]).sum(1)

    def _factors(
        self, h: Tensor, head: HeadFactors | None, cols: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(M, d) hidden states -> the (M, 4) gates and the two float32 factors whose product is the
        network's item logits + g_pop * log1p(pop) (+ the popularity prior, ModelConfig.pop_prior):
        lhs (M, E+1) and rhs (V, E+1), or (U, E+1) for the columns `cols` (E+2 with the prior; head:
        the network's logits as factors, None: none). Call it with autocast off."""
        g = F.softplus(self.gate(h.float()))  # (M, 4)
        n_cols = self.pop.shape[0] if cols is None else cols.shape[0]
        if head is None:
            base_h, base_w = h.new_zeros(h.shape[0], 1), self.pop.new_zeros(n_cols, 1)
        else:
            base_h, base_w = head.h, head.w
        lhs = torch.cat([self._head_lhs(h, base_h), self._pop_gate(g)], 1)
        pop = self.pop if cols is None else self.pop[cols]
        rhs = torch.cat([base_w.float(), torch.log1p(pop)[:, None]], 1)
        if self.pop_prior is not None:  # one more column: 1 x prior(c)
            lhs = torch.cat([lhs, g.new_ones(g.shape[0], 1)], 1)
            rhs = torch.cat([rhs, self.pop_prior(torch.log1p(pop))[:, None]], 1)
        return g, lhs, rhs

    def _head_lhs(self, h: Tensor, base_h: Tensor) -> Tensor:
        """(M, E) head inputs -> the left factor of the network's item logits in float32: times
        head_scale and, with the head gate, times each session's weight `head_weight(h)`."""
        lhs = base_h.float() * self.head_scale
        if self.head_gate is not None:
            lhs = lhs * self.head_weight(h)
        return lhs

    def head_weight(self, h: Tensor) -> Tensor:
        """(M, d) hidden states -> (M, 1) the head gate's weight of the network's own item logits,
        softplus(Linear(h)) >= 0 (ModelConfig.head_gate); a tensor of ones without the gate."""
        if self.head_gate is None:
            return h.new_ones(h.shape[0], 1, dtype=torch.float32)
        return F.softplus(self.head_gate(h.float()))

    def _count_terms(
        self, g: Tensor, context: TargetContext, lists: CountLists
    ) -> list[tuple[Tensor, Tensor]]:
        """The sparse count scores of M targets as (ids (M, N), values (M, N)) pairs, added to
        the scores at those ids: co-occurrence, successor, repeat (and the training-only
        popularity correction). (M, 4) gates g."""
        M = g.shape[0]
        wc, wr, ws = self._gate_weights(g, context)  # (M, W), (M, W), (M, 1)
        terms = [
            (lists.cooc_idx.reshape(M, -1), (wc[:, :, None] * self._curve(torch.log1p(lists.cooc_val))).reshape(M, -1)),
            (lists.succ_idx, ws * torch.log1p(lists.succ_val)),
            (context.items, wr),
        ]
        if lists.pop_delta is not None:
            own = g[:, 3:4] * lists.pop_delta
            terms.append((context.items, own if lists.prior_delta is None else own + lists.prior_delta))
        return terms

    def _curve(self, log_count: Tensor) -> Tensor:
        """log1p(count) of the co-occurrence term -> through the learned curve (cooc_curve) if any;
        itself without (no op on it here: a trace names the values an op reads by this frame's names)."""
        return log_count if self.cooc_curve is None else self.cooc_curve(log_count)

    def _gate_weights(self, g: Tensor, context: TargetContext) -> tuple[Tensor, Tensor, Tensor]:
        """(M, 4) gates -> weights of the cooc and repeat terms per context position (M, W) and of
        the successor term (M, 1): learned position weights w[distance] times the gates (+ the
        count blend's, decay ** distance and 1, times `blend_weight`)."""
        d = context.dist.clamp(0, self.w_cooc.shape[0] - 1)
        zero = torch.zeros((), device=g.device)
        wc = torch.where(context.ctx, self.w_cooc[d], zero) * g[:, 0:1]  # (M, W)
        wr = torch.where(context.ctx, self.w_rep[d], zero) * g[:, 2:3]  # (M, W)
        ws = torch.where(context.has_last, g[:, 1], zero)[:, None]  # (M, 1)
        if self.blend_weight:
            b, (gc, gs, gr, _) = self.blend_weight, self.BLEND_GATES
            prior = torch.where(context.ctx, self.decay ** d.float(), zero)  # (M, W) the blend's w
            wc, wr = wc + (b * gc) * prior, wr + (b * gr) * prior
            ws = ws + (b * gs) * context.has_last.float()[:, None]
        return wc, wr, ws

    def _pop_gate(self, g: Tensor) -> Tensor:
        """(M, 4) gates -> (M, 1) the popularity term's weight (+ the blend's x `blend_weight`)."""
        return g[:, 3:4] + self.BLEND_GATES[3] * self.blend_weight if self.blend_weight else g[:, 3:4]

    def _session_view(self, items: Tensor, lengths: Tensor) -> tuple[TargetContext, CountLists]:
        """Inference: (B, L) right-padded sessions, (B,) lengths -> the context of the item after
        each session (all of it) and its count-table rows (gathered by `take`)."""
        pos = torch.arange(items.shape[1], device=items.device)
        ctx = pos[None, :] < lengths[:, None]  # (B, L)
        dist = lengths[:, None] - 1 - pos[None, :]  # (B, L)
        last = items.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,) the last item
        lists = CountLists(
            take(self.cooc_idx, items).long(),  # (B, L, K)
            take(self.cooc_val, items),
            take(self.succ_idx, last).long(),  # (B, K)
            take(self.succ_val, last),
        )
        return TargetContext(items, ctx, dist, lengths > 0), lists

    def _column_map(self, cols: Tensor) -> Tensor:
        """(V,) int32 map with map[cols[j]] = j, for ids -> candidate columns by one gather.

        Kept between steps (one int per item, allocated on first use; training only,
        not a buffer) and never cleared: entries of earlier steps' candidates are
        stale, so every lookup j = map[id] is checked with cols[j] == id (cols are
        unique). Setting it costs O(U); binary search over U cost ~25x more here.
        """
        col_of = self._id_map(cols.device)
        col_of[cols] = torch.arange(cols.shape[0], dtype=torch.int32, device=cols.device)
        return col_of

    def _id_map(self, device: torch.device) -> Tensor:
        """The (V,) int32 map behind `_column_map` (allocated on first use, stale entries and all)."""
        if self._col_of is None or self._col_of.device != device:
            self._col_of = torch.zeros(self.pop.shape[0], dtype=torch.int32, device=device)
        return self._col_of

    # --- re-ranking's candidates (ModelConfig.rerank) --------------------------------------

    def popular_ids(self) -> Tensor:
        """(P,) the rerank_popular real ids with the highest `pop` (P = min(rerank_popular, real ids)).

        Recomputed when the pop table changes (set_tables, load_state_dict, grow, .to); a trace
        reads the buffer, so compute it before tracing (SessionModel.prepare_ranking does)."""
        key = (self.pop.data_ptr(), self.pop._version, self.pop.device, self.rerank_popular)
        if self._popular_key != key:
            if torch.jit.is_tracing():
                raise RuntimeError(
                    "re-ranking: the popular candidates are older than the pop table; call "
                    "model.prepare_ranking() before torch.jit.trace (TopKRanker does)"
                )
            with torch.no_grad():
                real = self.pop[FIRST_REAL_ID:]
                self.popular = real.topk(min(self.rerank_popular, real.shape[0])).indices + FIRST_REAL_ID
            self._popular_key = key
        return self.popular

    def candidates(self, context: TargetContext, lists: CountLists) -> Tensor:
        """Re-ranking's candidates of M targets: (M, N) ids, PAD_ID where an entry is none
        (`ranking.memory_candidates` with `popular_ids`)."""
        return ranking.memory_candidates(context, lists, self.popular_ids())

    def session_candidates(self, items: Tensor, lengths: Tensor) -> Tensor:
        """Serving under re-ranking: (B, L) sessions, (B,) lengths -> (B, L + L*K + K + P) candidate
        ids sorted per row (repeats and PAD_ID left in: `ranking.candidate_top_k` masks them)."""
        return self.candidates(*self._session_view(items, lengths)).sort(1).values

    # --- the three entry points --------------------------------------------------------

    def next_item_scores(
        self, h: Tensor, items: Tensor, lengths: Tensor, head: HeadFactors | None = None
    ) -> Tensor:
        """Inference: (B, d) hidden states, (B, L) right-padded items, (B,) lengths -> (B, V).

        head: the network's logits as factors (None: none). Re-ranking: every item that is not
        one of the session's candidates (`candidates`) scores -inf, as do the special ids."""
        context, lists = self._session_view(items, lengths)
        if self.scorer is not None:  # the candidates' scores (re-ranked), -inf everywhere else
            cand = self.candidates(context, lists).sort(1).values
            s = self.candidate_scores(h, items, lengths, cand, head).masked_fill(not_candidates(cand), float("-inf"))
            out = torch.full((cand.shape[0], self.pop.shape[0]), float("-inf"), device=h.device)
            return out.scatter_reduce_(1, cand, s, "amax")
        out = self.combine(h, context, lists, head)  # (B, V)
        if self.rerank_popular > 0:
            keep = torch.zeros_like(out, dtype=torch.bool).scatter_(1, self.candidates(context, lists), True)
            keep[:, :FIRST_REAL_ID] = False  # PAD_ID marked the entries that are none
            out = out.masked_fill_(~keep, float("-inf"))
        return out

    def candidate_scores(
        self, h: Tensor, items: Tensor, lengths: Tensor, cand: Tensor, head: HeadFactors | None
    ) -> Tensor:
        """Inference on per-session candidates (two-stage ranking, re-ranking): the
        `next_item_scores` values at cand, before any -inf.

        h (B, d); items (B, L) right-padded, lengths (B,); cand (B, C) item ids sorted along
        dim 1 (repeats allowed: a repeated id gets its count terms at its first occurrence
        only, the caller masks the others); head: the network's item logits as factors,
        h (B, E) and w (B, C, E) the item vectors of cand, or w (V, E) the whole item table
        (one (B, V) product read at cand: cheaper for a batch of sessions when V is not much larger
        than C; the same dot products); None: none. -> (B, C) float32.
        The same terms as `combine` (tested against it); an id of a sparse list is found
        in its session's candidates by binary search, ids that are not candidates are dropped.
        """
        B, C = cand.shape
        context, lists = self._session_view(items, lengths)
        with torch.autocast(h.device.type, enabled=False):
            g = F.softplus(self.gate(h.float()))  # (B, 4)
            out = torch.log1p(take(self.pop, cand)) * self._pop_gate(g)  # (B, C) g_pop * log1p(pop)
            if self.pop_prior is not None:
                out = out + self.pop_prior(torch.log1p(take(self.pop, cand)))
            if head is not None:  # + the network's logits; (B, C, E) is large: no concatenation to it
                hl = self._head_at(self._head_lhs(h, head.h), head, cand)  # (B, C)
                if not self.head_repeats:  # no network logit at the session's own items
                    own = torch.where(context.ctx, context.items, -1)  # (B, L)
                    hl = hl.masked_fill((cand[:, :, None] == own[:, None, :]).any(2), 0.0)
                out = out + hl

        for idx, val in self._count_terms(g, context, lists):  # out[b, column of idx[b, j]] += val[b, j]
            j = torch.searchsorted(cand, idx).clamp_(max=C - 1)  # (B, N) first position of idx, if present
            out.scatter_add_(1, j, torch.where(cand.gather(1, j) == idx, val, 0.0))
        if self.scorer is None:
            return out
        bad, feats = not_candidates(cand), self.scorer.with_recent(count_features(self.pop, context, lists, cand, lengths), cand)
        net = None
        if self.scorer.network:  # the network's own logit of each candidate (ungated) and the session's gates
            raw = out.new_zeros(B, C) if head is None else self._head_at(head.h.float(), head, cand)
            net = (raw, torch.cat([g, self.head_weight(h)], 1))
        x, at, ok = self.scorer.inputs(out, bad, feats, net)
        if self.scorer_tap is not None:  # training.scorer_fit: the scorer's inputs, kept as they are scored
            self.scorer_tap.append((x, at, ok, cand))
        return self.scorer.rescore(out, bad, x, at, ok)

    @staticmethod
    def _head_at(lhs: Tensor, head: HeadFactors, cand: Tensor) -> Tensor:
        """(B, E) float32 left factors -> (B, C) their dot products with the candidates' item vectors
        (head.w (B, C, E), or (V, E): one (B, V) product read at cand)."""
        if head.w.dim() == 2:
            return (lhs @ head.w.float().T).gather(1, cand)
        return torch.bmm(head.w.float(), lhs[:, :, None]).squeeze(2)

    def packed_scores(
        self,
        h: Tensor,
        items: Tensor,
        segment: Tensor,
        targets: PackedTargets,
        head: HeadFactors | None = None,
        cols: Tensor | None = None,
        *,
        leave_out: bool = True,
    ) -> Tensor:
        """Training: scores of M targets in packed rows, each session's own counts left out.

        h (M, d); items, segment (R, W) packed rows; targets: where they sit (`packed_view`).
        (M, V) scores, or (M, U) for the sorted candidate ids `cols` (U,) with head.w
        their rows (U, E): the same values at those columns (tested). leave_out=False:
        sessions that are not in the counts (stacking on held-back sessions).
        """
        context, lists = self.packed_view(items, segment, targets, leave_out=leave_out)
        return self.combine(h, context, lists, head, cols)

    def packed_view(
        self, items: Tensor, segment: Tensor, targets: PackedTargets, *, leave_out: bool = True
    ) -> tuple[TargetContext, CountLists]:
        """Training: the context and count-table rows of M targets in packed rows.

        items, segment (R, W) packed rows; target m sits at row targets.row[m], position
        targets.pos[m]; its context is the earlier positions of its session where
        targets.ctx_ok is True (clm: every real position; mlm: the unmasked ones).
        leave_out: the sessions are in the counts, so each one's own contribution is
        subtracted from its lists and popularity (tested against tables rebuilt without it);
        False for sessions that are not in the counts.
        """
        c_idx, c_val, s_idx, s_val, pop_delta, prior_delta = self._packed_lists(items, segment, leave_out)
        context, in_own, lq = self._targets(items, segment, targets)
        tgt_r = targets.row
        lists = CountLists(
            c_idx[tgt_r],
            c_val[tgt_r],
            s_idx[tgt_r, lq],
            s_val[tgt_r, lq],
            pop_delta=None if pop_delta is None else torch.where(in_own, pop_delta[tgt_r], 0.0),
            prior_delta=None if prior_delta is None else torch.where(in_own, prior_delta[tgt_r], 0.0),
        )
        return context, lists

    def _packed_lists(
        self, items: Tensor, segment: Tensor, leave_out: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(R, W) packed rows -> the count lists of every position: co-occurrence ids and counts,
        successor ids and counts (R, W, K; ids int64), and with leave_out each session's own
        contribution subtracted, plus the popularity corrections pop_delta (R, W) and prior_delta
        (R, W) (the popularity prior's; None without it), else None and None."""
        R, W = items.shape
        c_idx = take(self.cooc_idx, items).long()  # (R, W, K)
        s_idx = take(self.succ_idx, items).long()  # (R, W, K)
        c_val, s_val, pop_delta, prior_delta = take(self.cooc_val, items), take(self.succ_val, items), None, None
        if leave_out:
            real = segment > 0
            same = (segment[:, :, None] == segment[:, None, :]) & real[:, :, None]  # (R, W, W) same session
            eq = (items[:, :, None] == items[:, None, :]) & same  # (R, W, W) same item, same session
            cnt = eq.sum(-1)  # (R, W) occurrences of the item in its session
            # membership and step counts by sorted keys, not (R, W, K, W) comparisons: the keys of
            # (session, item) pairs, session = (row, segment), ranked among the batch's own pairs
            V = self.pop.shape[0]
            n_seg = int(segment.max()) + 1 if segment.numel() else 1
            sess = torch.arange(R, device=items.device)[:, None] * n_seg + segment  # (R, W) session key
            pairs = (sess * V + items)[real].unique()  # (T,) sorted (session, item) of the real positions
            # co-occurrence: this session added 1 to cooc[a, c] for every other item c in it,
            # and 1 to cooc[a, a] if a occurs twice or more
            in_sess = _find(pairs, sess[..., None] * V + c_idx)[1] & real[..., None]  # (R, W, K) c in a's session
            own = torch.where(c_idx == items[..., None], (cnt >= 2)[..., None], in_sess)
            c_val = (c_val - own.float()).clamp(min=0.0)
            # successors: this session added one per a -> c step in it; a step's key: (pair of a, c)
            step = (segment[:, 1:] == segment[:, :-1]) & real[:, 1:]  # (R, W-1) q -> q+1 inside a session
            rank_a = torch.searchsorted(pairs, sess * V + items)  # (R, W) a's pair among `pairs` (real ones)
            steps, n = (rank_a[:, :-1] * V + items[:, 1:])[step].unique(return_counts=True)  # (S,) sorted
            if steps.numel():
                q = rank_a[..., None] * V + s_idx  # (R, W, K)
                at = torch.searchsorted(steps, q).clamp_(max=steps.numel() - 1)
                n_steps = torch.where((steps[at] == q) & real[..., None], n[at], 0)  # (R, W, K)
                s_val = (s_val - n_steps.float()).clamp(min=0.0)
            # popularity: minus the session's own occurrences (spread over them, scatter adds them up)
            p = self.pop[items]
            pop_delta = torch.where(
                real, (torch.log1p((p - cnt).clamp(min=0.0)) - torch.log1p(p)) / cnt.clamp(min=1), 0.0
            )  # (R, W)
            if self.pop_prior is not None:
                prior_delta = self.pop_prior.delta(p, cnt.float(), real)
        return c_idx, c_val, s_idx, s_val, pop_delta, prior_delta

    def _targets(
        self, items: Tensor, segment: Tensor, targets: PackedTargets
    ) -> tuple[TargetContext, Tensor, Tensor]:
        """M targets in packed rows -> their context (M, W), which positions hold their own session
        (M, W) bool, and the position of their last context item (M,) (0 where none)."""
        tgt_r, tgt_p = targets.row, targets.pos
        pos = torch.arange(items.shape[1], device=items.device)
        seg_t = segment[tgt_r, tgt_p]  # (M,)
        in_own = segment[tgt_r] == seg_t[:, None]  # (M, W) the target's session
        ctx = in_own & (pos[None, :] < tgt_p[:, None]) & targets.ctx_ok[tgt_r]  # (M, W)
        last_q = torch.where(ctx, pos[None, :], -1).max(1).values  # (M,)
        context = TargetContext(items[tgt_r], ctx, tgt_p[:, None] - 1 - pos[None, :], last_q >= 0)
        return context, in_own, last_q.clamp(min=0)

    # --- re-ranking in training: flat entries instead of (M, W, K) lists --------------------

    def rerank_view(
        self, items: Tensor, segment: Tensor, targets: PackedTargets, *, leave_out: bool = True
    ) -> RerankEntries:
        """Training under re-ranking: the candidates and count terms of M targets in packed rows
        as flat entries (`RerankEntries`): the same terms as `packed_view`'s lists, without
        their zeros (a zero count adds nothing and proposes no candidate)."""
        c_idx, c_val, s_idx, s_val, pop_delta, prior_delta = self._packed_lists(items, segment, leave_out)
        context, in_own, lq = self._targets(items, segment, targets)
        tgt_r = targets.row
        pm, pw = context.ctx.nonzero(as_tuple=True)  # (P,) row-major
        pr = tgt_r[pm]
        cv = c_val[pr, pw]  # (P, K)
        pi, ki = (cv > 0).nonzero(as_tuple=True)
        sv = s_val[tgt_r, lq]  # (M, K) the last context item's successors
        sm, sk = ((sv > 0) & context.has_last[:, None]).nonzero(as_tuple=True)
        own = None
        if pop_delta is not None:
            om, ow = in_own.nonzero(as_tuple=True)
            orow = tgt_r[om]
            prior = None if prior_delta is None else prior_delta[orow, ow]
            own = (om, items[orow, ow].long(), pop_delta[orow, ow], prior)
        return RerankEntries(
            context,
            pm,
            pw,
            items[pr, pw].long(),
            pi,
            c_idx[pr[pi], pw[pi], ki],
            self._curve(torch.log1p(cv[pi, ki])),
            sm,
            s_idx[tgt_r[sm], lq[sm], sk],
            torch.log1p(sv[sm, sk]),
            own,
        )

    def rerank_columns(self, view: RerankEntries, targets: Tensor) -> tuple[Tensor, RerankSets]:
        """Training under re-ranking: cols (U,) the sorted ids of every target's candidates
        (`memory_candidates`: context items, co-occurrence and successor entries, the popular
        ids) and of the targets, and each target's candidates among them (`RerankSets`: the
        popular columns, shared, and the other (target, column) pairs, each once).
        Ids are deduplicated through the (V,) column map; pairs by one sort of their keys."""
        popular = self.popular_ids()
        M, dev = targets.shape[0], targets.device
        tm, tids, n_cand = _term_index(view)
        proposes = (torch.arange(tids.shape[0], device=dev) < n_cand) & (tids >= FIRST_REAL_ID)
        every = torch.cat([popular, tids[proposes], targets])
        # one representative per id: whichever write of the scatter lands is read back by its own slot
        slot = torch.arange(every.shape[0], dtype=torch.int32, device=dev)
        seen = self._id_map(dev)
        seen[every] = slot
        cols = every[seen[every] == slot].sort().values  # (U,)
        U, P = cols.shape[0], popular.shape[0]
        col_of = self._column_map(cols)
        pop_cols = col_of[popular].long()  # (P,)
        pop_pos = torch.full((U,), -1, dtype=torch.int64, device=dev)
        pop_pos[pop_cols] = torch.arange(P, device=dev)
        j = col_of[tids].long().clamp_(max=U - 1)
        in_cols = cols[j] == tids  # popularity corrections may name ids that are not candidates
        pos = torch.where(in_cols, pop_pos[j], -1)  # the entry's place among the popular, -1: none
        key = tm * U + j  # (N,) the entry's (target, column)
        paired = proposes & (pos < 0)  # entries that make the pairs
        pairs, inv = torch.unique(key[paired], sorted=True, return_inverse=True)  # (S,) by target, column
        pm = pairs // U
        crow = torch.zeros(M + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.bincount(pm, minlength=M).cumsum(0)
        pair_at, has_pair = torch.zeros_like(key), paired.clone()  # the entry's pair, if its cell is one
        pair_at[paired] = inv
        other = ~paired & (pos < 0) & in_cols  # popularity corrections: their cell may be a candidate
        pair_at[other], has_pair[other] = _find(pairs, key[other])
        sink = M * P + pairs.shape[0]
        term_at = torch.where(pos >= 0, tm * P + pos, torch.where(has_pair, M * P + pair_at, sink))
        t_col = torch.searchsorted(cols, targets)  # every target is a column
        t_pos = pop_pos[t_col]
        rows = torch.arange(M, device=dev)
        t_at, t_found = _find(pairs, rows * U + t_col)
        target_ok = (t_pos >= 0) | t_found
        target_at = torch.where(t_pos >= 0, rows * P + t_pos, torch.where(t_found, M * P + t_at, 0))
        return cols, RerankSets(pop_cols, pm, pairs % U, crow, term_at, target_at, target_ok)

    def member(self, sets: RerankSets, M: int, U: int) -> Tensor:
        """(M, U) bool: column j is a candidate of target m (`RerankSets` as a dense mask)."""
        out = torch.zeros(M, U, dtype=torch.bool, device=sets.pop_cols.device)
        out[:, sets.pop_cols] = True
        out[sets.pair_m, sets.pair_col] = True
        return out

    def rerank_ce(
        self,
        h: Tensor,
        view: RerankEntries,
        head: HeadFactors | None,
        cols: Tensor,
        sets: RerankSets,
        targets: Tensor,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Training under re-ranking, cross-entropy: the mean over the targets that are among
        their own candidates of -log softmax(target) over those candidates (0, still connected
        to the graph, where none is); weights (M,): a weighted mean instead. The values of
        `rerank_scores` over the candidates only: the P popular columns as an (M, P) block, every
        other candidate a (target, column) pair, its score a dot product; no (M, U) tensor (tested)."""
        M, P = h.shape[0], sets.pop_cols.shape[0]
        pm = sets.pair_m
        with torch.autocast(h.device.type, enabled=False):
            g, lhs, rhs = self._factors(h, head, cols)  # (M, 4), (M, E+1), (U, E+1)
            block = lhs @ rhs[sets.pop_cols].t()  # (M, P)
            pair = _pair_dots(lhs, rhs, sets)  # (S,)
            # (M * P + S + 1,) every candidate's score, fresh, and the sink of the terms of no candidate
            z = torch.cat([block.reshape(-1), pair, pair.new_zeros(1)])
        wc, wr, ws = self._gate_weights(g, view.context)
        val = _term_values(view, g, wc, wr, ws)
        z.index_add_(0, sets.term_at, val)  # the count terms
        if not self.head_repeats and head is not None:
            # term_at's third block is the context entries (`_term_index`); at each item's first position
            # they are `_repeat_cells`' cells
            first = self._first_positions(view)
            rep_at = sets.term_at[view.cooc_p.shape[0] + view.succ_m.shape[0] :][: view.pm.shape[0]][first]
            j = torch.searchsorted(cols, view.ctx_ids[first])
            z.index_add_(0, rep_at, self._repeat_head(lhs, rhs, view.pm[first], j))
        block, pair = z[: M * P].view(M, P), z[M * P : -1]
        # log-sum-exp per target over its block row and its pairs (the max only steadies it)
        top = block.detach().max(1).values if P else torch.full((M,), float("-inf"), device=h.device)
        top = top.scatter_reduce(0, pm, pair.detach(), "amax")
        top = torch.where(torch.isfinite(top), top, 0.0)
        total = torch.exp(block - top[:, None]).sum(1).index_add(0, pm, torch.exp(pair - top[pm]))
        lse = top + torch.log(torch.where(total > 0, total, 1.0))  # (M,); 0 for a row without candidates
        nll = torch.where(sets.target_ok, lse - z[sets.target_at], 0.0)
        if weights is not None:
            w = torch.where(sets.target_ok, weights, 0.0)
            return (nll * w).sum() / w.sum().clamp(min=1e-12)
        return nll.sum() / max(int(sets.target_ok.sum()), 1)

    def rerank_scores(
        self, h: Tensor, view: RerankEntries, head: HeadFactors | None, cols: Tensor, member: Tensor
    ) -> Tensor:
        """Training under re-ranking: (M, U) scores of the columns `cols`, -inf where `member`
        (`rerank_columns`) is False: at every candidate the value of
        `combine(h, *packed_view(...), head, cols)` (tested), the same terms added to the same
        cells in the same order, from the entries that are not zero."""
        M, U = h.shape[0], cols.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            g, lhs, rhs = self._factors(h, head, cols)  # (M, 4), (M, E+1), (U, E+1)
            # -inf off the candidates by an added constant: its backward copies nothing (a masked_fill's would)
            off = torch.zeros(M, U, device=h.device).masked_fill_(~member, float("-inf"))
            # (M * U,): fresh and flat, so the terms are added in place without a view (whose
            # in-place backward copies the whole gradient)
            out = (lhs @ rhs.t()).view(-1) + off.view(-1)
        wc, wr, ws = self._gate_weights(g, view.context)
        m, ids, _ = _term_index(view)
        val = _term_values(view, g, wc, wr, ws)  # one pass, in the order of combine's terms
        col_of = self._column_map(cols)
        j = col_of[ids].long().clamp_(max=U - 1)
        # out[m, column of ids] += val where the id is a column (flat: serial, in order, on the CPU)
        out.index_add_(0, m * U + j, torch.where(cols[j] == ids, val, 0.0))
        if not self.head_repeats and head is not None:
            rm, rids = self._repeat_cells(view.context)
            rj = col_of[rids].long().clamp_(max=U - 1)
            out.index_add_(0, rm * U + rj, torch.where(cols[rj] == rids, self._repeat_head(lhs, rhs, rm, rj), 0.0))
        return out.view(M, U)

    def _first_positions(self, view: RerankEntries) -> Tensor:
        """(P,) bool over the context entries (view.pm, view.pw): the item's first position in its
        target's context (`_repeat_cells`' cells, in the same row-major order)."""
        return ~_seen_before(view.context)[view.pm, view.pw]
