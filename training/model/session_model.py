"""SessionModel: what the network is. Per-position features -> XLNet -> tied item head.

nanoGPT style: this file says what the network is; its pieces live next door in
training/model/ (config: ModelConfig; packing: masking and packed rows; xlnet: the
transformer body; item_memory: the count scores; ranking: serving top-k; sampled: the sampled
softmax). The architecture follows the Transformers4Rec getting-started example (notebook 02, see
docs/contracts.md and the Transformers4Rec reference notes, sections 1.2, 1.5, 2.2):

    item_id-list   [B, L] -> Embedding(V_item, 64)  \
    category-list  [B, L] -> Embedding(V_cat, 64)    > concat [B, L, 192]
    continuous     [B, L, C] -> Linear(C, 64)+ReLU  /
    -> Linear(192, d_output=100)+ReLU                 (masking happens here)
    -> Linear(100, 64)+ReLU
    -> XLNetModel(d_model 64, 4 heads, 2 layers, bidirectional, inputs_embeds,
                  WITH an attention mask hiding padding; the reference passes none)
    -> logits = h @ E_item^T (weight tying), special ids 0/1/2 -> -inf

Training objective (default "mlm", masked LM as the reference): each real
position is replaced by a trainable mask vector with probability `mask_prob`,
at least one per session and never all of them; the loss is the cross-entropy
on the masked positions only (`mask_positions`, `training_loss`).

Prediction (`next_item_scores`, used by evaluation AND by the exported
TorchScript model): a mask slot is appended at position `lengths` (right after
the last real item; the sequence inside the model is L+1 long so that a full
session still gets one) and the hidden state there scores every item.

The optional "clm" objective trains a causal model (causal attention mask):
the hidden state at position t predicts the item at t+1; `next_item_scores`
then reads the hidden state of the last real item.

Speed (CPU training ~3x the reference's sessions/s, `make bench-train`): training packs several
sessions into each row (`pack_sessions`: with attention kept inside each session, XLNet's relative
positions give the padded computation's result, tested, on ~2.5x fewer positions); `_XLNet` computes
the relative position encodings once per batch; `FastDropout` replaces XLNet's dropout on the CPU.

Item memory (`ItemMemory`, off by default, on in the real-data recipe of training/recipes.py): count
tables of the training sessions (co-occurrence, successor, popularity, top-k per item) and the
session's own items (repeats) give per-candidate scores that are added to the logits above, weighted
by gates computed from XLNet's hidden state (item_memory.py). Filled per window by
`training.trainer.set_memory`; buffers, so they travel in the checkpoint and in the traced model.
During training each session's own counts are left out.
Options (docs/quality.md measures them): `head_gate`, a per-session weight on the
network's own item logits; `rerank`, the network re-ranks only the memory's
candidates (training: softmax over each target's candidates, `_rerank_loss`;
serving: exact top-k over the same candidates); `head_logits` off, the gates only.

Large catalogues (`ModelConfig.loss`; "auto" picks "sampled" where it costs clearly less, choice.py):
the sampled loss scores only the batch's targets + `negatives` items drawn from (count + 1)^alpha with
the logQ correction (sampled.py), asks the item memory for those columns only and reads the item table
through sparse lookups (`param_groups`), so its step cost does not depend on V; evaluation and the
exported model still rank the full catalogue.

Serving top-k (`next_item_topk`): "exact" scores every item; "two_stage" scores a fixed number of
candidates per session (ranking.py), the index built by `prepare_ranking` before tracing.

Checkpoint I/O (`save_checkpoint`, `load_run`) lives in `training.checkpoint`.
Imports only torch, transformers and the standard library (no numpy inside
anything that is traced).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import XLNetConfig

import training.model.losses as losses  # modules of functions over tensors, used by name
import training.model.ranking as ranking
import training.model.sampled as sampled
from training.model.config import ModelConfig
from training.model.item_memory import ItemMemory
from training.model.memory_inputs import HeadFactors, PackedTargets
from training.model.packing import MaskedPositions, PackedSessions, mask_positions
from training.model.ranking import take
from training.model.repeats import RepeatInput, revisit_weights
from training.model.xlnet import _use_fast_dropout, _XLNet
from training.names import FIRST_REAL_ID, OOV_ID, PAD_ID


class SessionModel(nn.Module):
    """The network of the module docstring; `cfg` must hold the data's schema (`ModelConfig.with_schema`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.has_schema:
            raise ValueError(
                "SessionModel needs a ModelConfig with the data's schema (categorical features and their "
                "cardinalities): build it with ModelConfig.from_schema(schema, ...) or cfg.with_schema(schema)"
            )
        self.cfg = cfg
        # --- input block ------------------------------------------------------
        # sampled loss: every read of the (tied) item table is a sparse lookup, so its gradient
        # holds only the rows a step touched (SparseAdam/Adagrad, see `param_groups`)
        sparse_item = cfg.loss == "sampled"
        self.embeddings = nn.ModuleDict(
            {
                name: nn.Embedding(
                    card,
                    cfg.embedding_dim,
                    padding_idx=PAD_ID,
                    sparse=sparse_item and name == cfg.item_feature,
                )
                for name, card in cfg.categorical.items()
            }
        )
        in_dim = cfg.embedding_dim * len(cfg.categorical)
        if cfg.continuous:
            self.continuous_proj = nn.Linear(len(cfg.continuous), cfg.continuous_dim)
            in_dim += cfg.continuous_dim
        else:
            self.continuous_proj = None
        # cfg.feature_norm: a LayerNorm per input feature (categorical embeddings in sorted name order,
        # then the continuous projection) before they are merged; Transformers4Rec found side features
        # helped only so (+4.7% NDCG on REES46), their scales differ from the item embedding's
        # (cfg.item_norm off: the item embedding passes unnormalised, an Identity keeps the indices)
        self.feature_norms = (
            nn.ModuleList(
                [
                    nn.Identity()
                    if name == cfg.item_feature and not cfg.item_norm
                    else nn.LayerNorm(cfg.embedding_dim)
                    for name in sorted(cfg.categorical)
                ]
                + ([nn.LayerNorm(cfg.continuous_dim)] if cfg.continuous else [])
            )
            if cfg.feature_norm
            else None
        )
        self.input_proj = nn.Linear(in_dim, cfg.d_output)  # + ReLU
        self.mask_emb = nn.Parameter(torch.randn(cfg.d_output) * cfg.mask_init_std)  # replaces masked inputs
        # cfg.repeat_feature: how often a position's item occurs elsewhere in its session (repeats.py)
        self.repeats = RepeatInput(cfg.d_output, cfg.objective == "clm") if cfg.repeat_feature else None
        self.target_weights: tuple[float, float] | None = None  # TrainConfig.repeat_reweight, repeats.py
        self.mlp = nn.Linear(cfg.d_output, cfg.d_model)  # + ReLU (T4Rec's MLPBlock([64]))
        # --- body ---------------------------------------------------------------
        xcfg = XLNetConfig(
            vocab_size=1,  # items come in through inputs_embeds
            d_model=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_inner=cfg.d_inner,
            ff_activation=cfg.ff_activation,
            dropout=cfg.dropout,
            layer_norm_eps=cfg.layer_norm_eps,
            initializer_range=cfg.initializer_range,
            attn_type="bi",  # clm: the causal mask is built in `encode`
            mem_len=None,
            use_mems_train=False,
            use_mems_eval=False,
            pad_token_id=None,  # token ids are meaningless with inputs_embeds
            bos_token_id=None,
            eos_token_id=None,
        )
        self.transformer = _XLNet(xcfg)
        _use_fast_dropout(self.transformer)
        # XLNet's own word embedding (vocab 1) and two-stream mask_emb are never
        # used with inputs_embeds: freeze them so DDP sees no unused trainable
        # parameters (they stay in the state_dict, harmless).
        self.transformer.word_embedding.weight.requires_grad_(False)
        self.transformer.mask_emb.requires_grad_(False)
        for layer in self.transformer.layer:  # segment embeddings: no token_type_ids here
            layer.rel_attn.seg_embed.requires_grad_(False)
            layer.rel_attn.r_s_bias.requires_grad_(False)
        if cfg.objective == "clm":
            self.mask_emb.requires_grad_(False)  # clm never masks inputs
        # --- head: logits = h @ E_item^T --------------------------------------
        self.head_proj = (
            nn.Linear(cfg.d_model, cfg.embedding_dim) if cfg.d_model != cfg.embedding_dim else None
        )
        if self.head_proj is not None and not cfg.head_logits:
            self.head_proj.requires_grad_(False)  # never read: DDP wants no unused trainable parameter
        self.item_memory = (
            ItemMemory(
                cfg.n_items, cfg.memory_k, cfg.max_len, cfg.d_model, cfg.memory_decay,
                head_gate=cfg.head_gate, rerank_popular=cfg.rank_popular if cfg.rerank else 0,
                head_repeats=cfg.head_repeats, pop_prior=cfg.pop_prior, cooc_curve=cfg.cooc_curve,
                scorer=(cfg.scorer_hidden * cfg.scorer_members, cfg.scorer_top, cfg.scorer_network, cfg.scorer_recent > 0),
            )  # fmt: skip
            if cfg.memory
            else None
        )
        special = torch.zeros(cfg.n_items, dtype=torch.bool)
        special[:FIRST_REAL_ID] = True  # pad, null, OOV are never ranked
        self.register_buffer("special_ids", special, persistent=False)
        if cfg.loss == "sampled" and self.item_memory is None:
            # item counts of the training sessions for the negative sampler (with the memory on,
            # its `pop` table serves); training-only input set per window, so not in the state_dict
            self.register_buffer("sample_counts", torch.zeros(cfg.n_items), persistent=False)
        if cfg.rank == "two_stage":
            # two-stage ranking's index (`prepare_ranking`): derived from the item table and the
            # counts, so not in the state_dict; filled before serving, baked into the traced model
            self.register_buffer("rank_pop_ids", torch.zeros(0, dtype=torch.int64), persistent=False)
            self.register_buffer("ivf_centroids", torch.zeros(0, cfg.embedding_dim), persistent=False)
            self.register_buffer(
                "ivf_members", torch.zeros(0, cfg.ivf_list_size, dtype=torch.int64), persistent=False
            )
        self._rank_key: tuple | None = None  # which table/counts the ranking index was built from
        self._rank_hold: bool | None = None  # `hold_ranking_index`: None off, else whether built since
        self._rank_sizes = (0, 0, 0)  # (popular, probed lists, kept IVF items) of the index
        self._sampler_key: tuple | None = None  # which counts `_sampler` was computed from
        self._sampler: sampled.SamplerTables | None = None
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, 0.0, cfg.embedding_init_std)
            with torch.no_grad():
                emb.weight[PAD_ID].zero_()

    # --- a vocabulary that grows window by window (issue 12) ---------------------------

    @torch.no_grad()
    def grow(self, sizes: Mapping[str, int], generator: torch.Generator | None = None) -> dict[str, int]:
        """Grow the categorical tables to `sizes` rows (feature -> rows; ids are append-only).

        Old rows are kept; new rows of every embedding table are drawn from
        N(0, embedding_init_std) with `generator` (CPU; 0 std gives zeros); the item
        memory's count tables and the sampler's counts get zero rows (the trainer fills
        them per window). Parameters change size in place (`param.data` is replaced),
        so an optimizer keeps its keys: pad its state with `pad_optimizer_state`.
        Returns the sizes before. A table never shrinks.
        """
        before = dict(self.cfg.categorical)
        for name, n in sizes.items():
            if name not in before:
                raise ValueError(
                    f"grow: unknown categorical feature {name!r}; expected one of {sorted(before)}"
                )
            if n < before[name]:
                raise ValueError(
                    f"grow: {name} has {before[name]} rows, cannot shrink to {n} (ids are append-only)"
                )
        for name in sorted(sizes):  # sorted: the generator's draws do not depend on dict order
            old, n = before[name], int(sizes[name])
            if n == old:
                continue
            emb = self.embeddings[name]
            new = torch.randn(n - old, emb.weight.shape[1], generator=generator) * self.cfg.embedding_init_std
            emb.weight.data = torch.cat([emb.weight.data, new.to(emb.weight.device, emb.weight.dtype)])
            emb.weight.grad = None  # a gradient of the old shape cannot be accumulated into
            emb.num_embeddings = n
        self.cfg = replace(self.cfg, categorical={**before, **sizes})
        V, old_v = self.cfg.n_items, before[self.cfg.item_feature]
        if V != old_v:

            def rows(t: Tensor) -> Tensor:  # (old_v, ...) -> (V, ...), zero rows appended
                return torch.cat([t, t.new_zeros((V - old_v, *t.shape[1:]))])

            self.special_ids = rows(self.special_ids)  # new ids are real items
            if hasattr(self, "sample_counts"):
                self.sample_counts = rows(self.sample_counts)
            if self.item_memory is not None:
                self.item_memory.grow(V)
            self._sampler, self._sampler_key = None, None
        return before

    def unknown_to_oov(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Ids beyond a categorical table (values the model's vocabulary does not know yet) -> OOV.

        A workflow fitted on a longer log than the model's windows encodes later values with
        ids >= the table size; the model reads them as OOV instead of indexing out of range.
        Traceable (the sizes are constants of the model)."""
        out = dict(feats)
        for name, n in self.cfg.categorical.items():
            if name in out:
                out[name] = torch.where(out[name] >= n, torch.full_like(out[name], OOV_ID), out[name])
        return out

    # --- building blocks ---------------------------------------------------------

    def embed(self, feats: dict[str, Tensor]) -> Tensor:
        """Per-position input vectors before masking: (B, L) tensors -> (B, L, d_output)."""
        # sorted names: the concatenation order must not depend on dict order (e.g. of a JSON file)
        cats, conts = sorted(self.cfg.categorical), sorted(self.cfg.continuous)
        parts = [self.embeddings[name](feats[name]) for name in cats]  # each (B, L, E)
        if self.continuous_proj is not None:
            cont = torch.stack([feats[name].float() for name in conts], dim=-1)  # (B, L, C)
            if not self.cfg.side_features:  # ablation: the continuous features carry nothing
                cont = torch.zeros_like(cont)
            if self.cfg.continuous_log:
                cont = torch.sign(cont) * torch.log1p(cont.abs())
            parts.append(F.relu(self.continuous_proj(cont)))  # (B, L, continuous_dim)
        if self.feature_norms is not None:
            parts = [norm(x) for norm, x in zip(self.feature_norms, parts)]
        return F.relu(self.input_proj(torch.cat(parts, dim=-1)))  # (B, L, d_output)

    def encode(self, x: Tensor, segment: Tensor) -> Tensor:
        """(B, L, d_output) inputs, (B, L) segment ids -> (B, L, d_model) hidden states.

        segment: 0 = padding, positions with the same id > 0 belong to the same
        session (several sessions may share a row, see `pack_sessions`). A query
        attends only to keys of its own session (and, for clm, not after itself),
        passed to XLNet as perm_mask (1 = may not attend). XLNet's own causal
        mode (attn_type "uni") cannot be combined with a per-row mask in HF's
        implementation, so the causal part is built here.
        """
        x = F.relu(self.mlp(x))  # (B, L, d_model)
        pos = torch.arange(x.shape[1], device=x.device)
        blocked = (segment[:, :, None] != segment[:, None, :]) | (segment[:, None, :] == 0)  # (B, Lq, Lk)
        if self.cfg.objective == "clm":
            blocked = blocked | (pos[None, None, :] > pos[None, :, None])  # key after query
        out = self.transformer(inputs_embeds=x, perm_mask=blocked.to(x.dtype), return_dict=True)
        return out.last_hidden_state  # (B, L, d_model)

    def _head_input(self, h: Tensor) -> Tensor:
        return self.head_proj(h) if self.head_proj is not None else h

    def _head_factors(self, h: Tensor, cols: Tensor | None = None) -> HeadFactors | None:
        """The network's item logits as factors for the item memory (None: cfg.head_logits off):
        head inputs (M, E) and the item vectors (V, E), or the rows of the columns `cols` (U,)
        read by a lookup that is sparse exactly when the input lookup is (loss "sampled")."""
        if not self.cfg.head_logits:
            return None
        emb = self.embeddings[self.cfg.item_feature]
        w = emb.weight if cols is None else F.embedding(cols, emb.weight, sparse=emb.sparse)  # (V or U, E)
        return HeadFactors(self._head_input(h), w)

    def item_logits(self, h: Tensor) -> Tensor:
        """(..., d_model) hidden states -> (..., V) logits of the network alone, special ids at -inf."""
        logits = (self._head_input(h) @ self.embeddings[self.cfg.item_feature].weight.t()).float()  # (..., V)
        return logits.masked_fill(self.special_ids, float("-inf"))

    # --- inference ------------------------------------------------------------------

    def next_item_scores(self, feats: dict[str, Tensor], lengths: Tensor) -> Tensor:
        """Scores of the item that follows each session: (B, L) feats, (B,) lengths -> (B, V).

        feats hold right-padded sessions (pad 0) with `lengths` real items each.
        A mask slot is appended at position `lengths` (the model sees L+1
        positions) and the hidden state there ranks the catalogue. Padding
        never changes a session's scores (the attention mask hides it).
        Traceable with torch.jit.trace: no data-dependent Python control flow.
        """
        feats = self.unknown_to_oov(feats)  # ids the tables do not hold yet (issue 12) -> OOV
        h_next = self.next_hidden(feats, lengths)  # (B, d_model)
        if self.item_memory is None:
            return self.item_logits(h_next)  # (B, V)
        logits = self.item_memory.next_item_scores(
            h_next, feats[self.cfg.item_feature], lengths, self._head_factors(h_next)
        )  # (B, V) network logits + count scores (re-ranking: -inf but at the candidates), a fresh tensor
        return logits.masked_fill_(self.special_ids, float("-inf"))

    def next_hidden(self, feats: dict[str, Tensor], lengths: Tensor) -> Tensor:
        """(B, L) feats, (B,) lengths -> (B, d_model): the hidden state that scores the next item.

        feats must hold ids the tables have (`unknown_to_oov` first)."""
        x = self.embed(feats)  # (B, L, d_output)
        x = F.pad(x, (0, 0, 0, 1))  # (B, L+1, d_output): room for the mask slot of a full session
        pos = torch.arange(x.shape[1], device=x.device)  # (L+1,)
        slot = pos[None, :] == lengths[:, None]  # (B, L+1) the position right after the last item
        if self.cfg.objective == "mlm":
            x = torch.where(slot[:, :, None], self.mask_emb.to(x.dtype), x)
            read = lengths  # read the mask slot
        else:
            read = (lengths - 1).clamp(min=0)  # clm: the last real item predicts the next one
        segment = (pos[None, :] <= lengths[:, None]).long()  # (B, L+1) 1 = real items + the slot, 0 = pad
        if self.repeats is not None:  # the items (B, L+1): the slot shows none
            items = F.pad(feats[self.cfg.item_feature], (0, 1))
            x = self.repeats(x, items, segment, pos[None, :] < lengths[:, None])
        h = self.encode(x, segment)  # (B, L+1, d_model)
        idx = read.view(-1, 1, 1).expand(-1, 1, self.cfg.d_model)  # (B, 1, d_model)
        return h.gather(1, idx).squeeze(1)  # (B, d_model)

    def forward(self, feats: dict[str, Tensor], lengths: Tensor) -> Tensor:
        """Same as `next_item_scores` (so that the module itself can be traced)."""
        return self.next_item_scores(feats, lengths)

    # --- serving top-k (ranking.py) ------------------------------------------------------

    def next_item_topk(self, feats: dict[str, Tensor], lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k next items: (B, L) feats, (B,) lengths -> (scores (B, k) float32, ids (B, k) int64), best first.

        rank "exact": `next_item_scores` + topk (scores every item). rank "two_stage": the
        same scores computed on a fixed number C of candidates per session only
        (`rank_candidates`), so the cost does not grow with V (apart from the index's
        list heads); under re-ranking (cfg.rerank) the candidates are the item memory's
        (`ItemMemory.session_candidates`), the only items `next_item_scores` does not set
        to -inf, so this is its exact top-k at O(candidates) per session, no index.
        Special ids are never returned; scores are those `next_item_scores` gives the
        returned ids. Traceable (call `prepare_ranking` first).
        """
        rerank = self.item_memory is not None and self.cfg.rerank
        if self.cfg.rank == "exact":
            return ranking.exact_top_k(self.next_item_scores(feats, lengths), k)
        if rerank:  # ItemMemory.popular_ids: a constant number of real ids
            n_pop = min(self.cfg.rank_popular, self.cfg.n_items - FIRST_REAL_ID)
        else:
            self._check_ranking()
            n_pop = self._rank_sizes[0]
        if not 1 <= k <= n_pop:
            raise ValueError(
                f"{'re-ranking' if rerank else 'two-stage'} top-k: k={k} must be in [1, {n_pop}] (the popular "
                "candidates guarantee k real items; raise rank_popular)"
            )
        return ranking.candidate_top_k(*self.candidate_scores(feats, lengths), k)

    def candidate_scores(
        self, feats: dict[str, Tensor], lengths: Tensor, product: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Two-stage ranking's first stage and its scores: (B, L) feats, (B,) lengths ->
        (scores (B, C) float32, candidates (B, C) ids sorted per row); a repeated id and the
        special ids score -inf (`ranking.mask_candidates`), every other candidate the value
        `next_item_scores` gives it. What the served model ranks (evaluation reads it too).
        product (item memory only): the network's logits from one (B, V) product read at the
        candidates instead of gathering (B, C, E) item vectors: the same dot products, several
        times cheaper for a batch of sessions when V is within ~100x of C (`eval_product`)."""
        rerank = self.item_memory is not None and self.cfg.rerank
        if not rerank:
            self._check_ranking()
        feats = self.unknown_to_oov(feats)  # ids the tables do not hold yet (issue 12) -> OOV
        items = feats[self.cfg.item_feature]  # (B, L)
        h = self.next_hidden(feats, lengths)  # (B, d_model)
        q = self._head_input(h)  # (B, E)
        if rerank:
            cand = self.item_memory.session_candidates(items, lengths)  # (B, C) sorted, repeats and pads
        else:
            cand = self.rank_candidates(items, lengths, q)  # (B, C) sorted, with repeats and specials
        table = self.embeddings[self.cfg.item_feature].weight
        head = None
        if self.cfg.head_logits:  # w: (B, C, E), or the (V, E) table for the product
            head = HeadFactors(q, table if product and self.item_memory is not None else take(table, cand))
        if self.item_memory is None:
            assert head is not None  # ModelConfig: no head logits needs the memory
            scores = torch.bmm(head.w, q[:, :, None]).squeeze(2).float()  # (B, C)
        else:
            scores = self.item_memory.candidate_scores(h, items, lengths, cand, head)  # (B, C)
        return ranking.mask_candidates(scores, cand, self.special_ids), cand

    def rank_candidates(self, items: Tensor, lengths: Tensor, q: Tensor) -> Tensor:
        """Two-stage candidates (`ranking.candidates`): (B, L) items, (B,) lengths, (B, E) head
        inputs -> (B, C) ids sorted per row; C = L + rank_context*K + K + rank_popular + ivf_keep
        (K = memory_k; the neighbour lists only with the item memory)."""
        mem = self.item_memory
        neighbours = (
            None if mem is None else ranking.Neighbours(mem.cooc_idx, mem.succ_idx, self.cfg.rank_context)
        )
        table = self.embeddings[self.cfg.item_feature].weight
        return ranking.candidates(items, lengths, q, table, self._rank_index(), neighbours)

    def _rank_index(self) -> ranking.RankIndex:
        """The index `prepare_ranking` built: buffers, and sizes that are constants in a trace."""
        _, probe, keep = self._rank_sizes
        return ranking.RankIndex(self.rank_pop_ids, self.ivf_centroids, self.ivf_members, probe, keep)

    def _rank_sources(self) -> tuple:
        """What the ranking index depends on (storage and in-place version of the table and counts)."""
        table = self.embeddings[self.cfg.item_feature].weight
        key: tuple = (table.data_ptr(), table._version)
        counts = self._popularity()
        if counts is not None:
            key += (counts.data_ptr(), counts._version)
        return key

    def _popularity(self) -> Tensor | None:
        """Item counts for the popular candidates: the item memory's pop, else the sampler's counts, else None."""
        if self.item_memory is not None:
            return self.item_memory.pop
        counts = getattr(self, "sample_counts", None)
        return counts if counts is not None and bool(counts.any()) else None

    def hold_ranking_index(self, hold: bool) -> None:
        """hold: from now on the two-stage index, once built, is kept while the item table changes;
        False: rebuilt again whenever the table or the counts changed (the default).

        Early stopping scores every epoch of a window as served; rebuilding the index from the
        table after each epoch would cost O(V) per epoch (k-means over every item vector), so
        the window's later epochs keep the index built for its first scored one (their own
        vectors score the candidates). The served model's index is built from its final table."""
        self._rank_hold = False if hold else None

    def _check_ranking(self) -> None:
        if self._rank_key == self._rank_sources() or self._rank_hold:
            return
        if torch.jit.is_tracing():
            raise RuntimeError(
                "two-stage ranking: the index is missing or older than the item table/counts; call "
                "model.prepare_ranking() before torch.jit.trace (TopKRanker does)"
            )
        self.prepare_ranking()

    @torch.no_grad()
    def prepare_ranking(self) -> None:
        """Build the two-stage ranking's index from the current item table and counts (no-op for "exact").

        `ranking.build_index`: the rank_popular real ids with the highest counts (item memory's
        pop; without the memory the sampled loss's counts, `set_sample_counts`; with neither,
        the largest item-vector norms) and the inverted-file index of the real items' vectors.
        Called by TopKRanker before tracing, and lazily by `next_item_topk` in eager mode
        when the table or counts changed (training steps, set_tables). Re-ranking needs no
        index: its popular candidates (`ItemMemory.popular_ids`) are computed instead.
        """
        if self.item_memory is not None and self.cfg.rerank:
            self.item_memory.popular_ids()
            return
        if self.cfg.rank != "two_stage":
            return
        table = self.embeddings[self.cfg.item_feature].weight.detach()
        index = ranking.build_index(table, self._popularity(), self.cfg)
        self.rank_pop_ids, self.ivf_centroids, self.ivf_members = (
            index.pop_ids,
            index.centroids,
            index.members,
        )
        self._rank_sizes = (int(index.pop_ids.shape[0]), index.probe, index.keep)
        self._rank_key = self._rank_sources()
        if self._rank_hold is not None:
            self._rank_hold = True

    # --- training ---------------------------------------------------------------------

    def param_groups(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """Trainable parameters as (dense, sparse), by name.

        sparse: the item table when loss == "sampled" (its gradient is a sparse
        tensor: give it torch.optim.SparseAdam or Adagrad, and leave it out of
        clip_grad_norm_, which raises on sparse gradients); empty otherwise.
        dense: everything else (AdamW, clipping).
        """
        sparse_name = f"embeddings.{self.cfg.item_feature}.weight" if self.cfg.loss == "sampled" else None
        dense, sparse = {}, {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                (sparse if name == sparse_name else dense)[name] = p
        return dense, sparse

    @torch.no_grad()
    def set_sample_counts(self, counts: Tensor) -> None:
        """Item counts (V,) of the training sessions for the sampled loss's negative sampler.

        Without the item memory the trainer calls this per window; with it, the
        memory's `pop` table (set by `ItemMemory.set_tables`) is used instead.
        """
        if self.cfg.loss != "sampled":
            raise ValueError(
                f"set_sample_counts: loss is {self.cfg.loss!r}; the counts serve loss='sampled' only"
            )
        if self.item_memory is not None:
            raise ValueError(
                "set_sample_counts: with memory=True the sampler uses the item memory's pop table "
                "(ItemMemory.set_tables); there is nothing else to set"
            )
        if tuple(counts.shape) != (self.cfg.n_items,):
            raise ValueError(f"sample counts: shape {tuple(counts.shape)}, expected ({self.cfg.n_items},)")
        self.sample_counts.copy_(counts.to(self.sample_counts.dtype))

    def _sampler_tables(self) -> sampled.SamplerTables:
        """`sampled.sampler_tables` of the current counts (the item memory's pop, else the
        sample counts), recomputed only when the counts change."""
        counts = self.item_memory.pop if self.item_memory is not None else self.sample_counts
        key = (counts.data_ptr(), counts._version, counts.device, self.cfg.sample_alpha)
        if self._sampler is None or self._sampler_key != key:
            self._sampler = sampled.sampler_tables(counts, self.cfg.sample_alpha)
            self._sampler_key = key
        return self._sampler

    def sample_candidates(
        self, targets: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Candidate columns (U,) of one sampled-softmax step and their log P(j in U) (U,):
        `sampled.sample_candidates` with cfg.negatives shared negatives drawn with `generator`."""
        return sampled.sample_candidates(self._sampler_tables(), targets, self.cfg.negatives, generator)

    def draw_masks(self, items: Tensor, lengths: Tensor, generator: torch.Generator | None = None) -> MaskedPositions:
        """mlm: the positions to predict in (B, L) right-padded sessions, at this model's mask_prob and
        mask_last (`mask_positions`; training, stacking and `loss` all draw through here)."""
        return mask_positions(items, lengths, self.cfg.mask_prob, generator, last=self.cfg.mask_last)

    def training_loss(
        self,
        feats: dict[str, Tensor],
        lengths: Tensor,
        generator: torch.Generator | None = None,
        masking: MaskedPositions | None = None,
    ) -> Tensor:
        """Mean cross-entropy over the predicted positions of a padded batch (scalar).

        feats (B, L), lengths (B,). mlm: positions chosen by `mask_positions`
        (or given as `masking`); clm: every position t whose next position t+1
        holds a real item of the same session. A batch with nothing to predict
        returns 0 (still connected to the graph). Same value as
        `packed_loss(pack_sessions(...))`, which the training loop uses.
        """
        items = feats[self.cfg.item_feature]  # (B, L)
        B, L = items.shape
        rows = torch.arange(1, B + 1, device=items.device)[:, None]  # (B, 1)
        segment = torch.where(
            torch.arange(L, device=items.device)[None, :] < lengths[:, None], rows, 0
        )  # (B, L)
        masked = None
        if self.cfg.objective == "mlm":
            m = (
                masking
                if masking is not None
                else self.draw_masks(items, lengths, generator)
            )
            masked = m.masked
        return self.packed_loss(PackedSessions(feats, segment, masked), generator=generator)

    def packed_loss(
        self,
        p: PackedSessions,
        label_smoothing: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        leave_out: bool = True,
        last_only: bool = False,
    ) -> Tensor:
        """Mean loss over the predicted positions of packed rows (see `pack_sessions`).

        cfg.loss_fn "ce": cross-entropy, label_smoothing eps: (1 - eps) * CE + eps * mean over
        the row's columns of -log p (special ids, at -inf, are left out); "gbce": gSASRec's
        generalised BCE over the same columns (losses.py). The columns:
        * loss "full": every item;
        * loss "sampled": `sample_candidates` (drawn with `generator`), logits h . w_j (+ the
          item memory's scores of those columns), for "ce" - log P(j in U) (not on the row's
          own target); nothing of size V is built;
        * re-ranking (cfg.rerank, either loss): each target's own candidates (`_rerank_loss`).
        leave_out: the item memory subtracts each session's own counts (the sessions trained on
        are in the counts); False for sessions that are not (stacking on held-back sessions).
        last_only (clm): only each session's last item is a target, the evaluation's task
        (TrainConfig.stack_last), not every next item.
        """
        is_sampled = self.cfg.loss == "sampled"
        reranked = self.item_memory is not None and self.cfg.rerank  # a softmax over the candidates
        if is_sampled and not reranked and label_smoothing > 0.0:
            raise ValueError(
                f"label_smoothing={label_smoothing} needs the full softmax (its uniform part spans the whole "
                "catalogue); use label_smoothing=0 with loss='sampled', or loss='full'"
            )
        if self.cfg.loss_fn == "gbce" and label_smoothing > 0.0:
            raise ValueError(
                f"label_smoothing={label_smoothing} is a softmax notion: use loss_fn='ce' for it"
            )
        if last_only and self.cfg.objective == "mlm":
            raise ValueError("last_only: the last item as the only target is a causal (clm) notion")
        items = p.feats[self.cfg.item_feature]  # (R, W)
        x = self.embed(p.feats)  # (R, W, d_output)
        if self.cfg.objective == "mlm":
            assert p.masked is not None, "mlm needs masked positions"
            x = torch.where(p.masked[:, :, None], self.mask_emb.to(x.dtype), x)
        seg = p.segment
        if self.repeats is not None:
            x = self.repeats(x, items, seg, (seg > 0) if p.masked is None else (seg > 0) & ~p.masked)
        h = self.encode(x, seg)  # (R, W, d_model)
        if self.cfg.objective == "mlm":
            h_sel, targets = h[p.masked], items[p.masked]  # (M, d_model), (M,)
            where = p.masked
            ctx_ok = seg > 0 if self.cfg.memory_masked_context else ~p.masked  # the memory's context
        else:  # causal: position t predicts t+1 of the same session
            nxt = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & (items[:, 1:] >= FIRST_REAL_ID)  # (R, W-1)
            if last_only:  # t+1 ends its session: the next position is another session's, or none
                nxt &= F.pad(seg[:, 2:] != seg[:, 1:-1], (0, 1), value=True)
            h_sel, targets = h[:, :-1][nxt], items[:, 1:][nxt]
            where = F.pad(nxt, (1, 0))  # (R, W) the target positions t+1
            ctx_ok = seg > 0
        # the item memory's view of the targets: row-major, the order of h_sel
        tgt = None if self.item_memory is None else PackedTargets(*where.nonzero(as_tuple=True), ctx_ok)
        if self.item_memory is not None and self.cfg.rerank:
            return self._rerank_loss(p, h_sel, targets, tgt, label_smoothing, leave_out=leave_out)
        if is_sampled:
            return self._sampled_loss(p, h_sel, targets, tgt, generator, leave_out=leave_out)
        table = self.embeddings[self.cfg.item_feature].weight
        if self.item_memory is None:
            logits = (self._head_input(h_sel) @ table.t()).float()  # (M, V)
        else:
            assert tgt is not None
            logits = self.item_memory.packed_scores(
                h_sel, items, seg, tgt, self._head_factors(h_sel), leave_out=leave_out
            )  # (M, V)
        # special ids never win: -inf written into their 3 columns of the fresh scores, the values
        # (and gradients) of masked_fill(special_ids) without its (M, V) pass and (M, V) backward
        logits[:, :FIRST_REAL_ID] = float("-inf")
        return self._loss(logits, targets, label_smoothing)

    def _loss(self, logits: Tensor, target_col: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """cfg.loss_fn of (M, N) logits (-inf: not one of the row's columns) and the targets' columns (M,)."""
        if self.cfg.loss_fn == "gbce":
            return losses.gbce_loss(logits, target_col, self.cfg.n_items - FIRST_REAL_ID, self.cfg.gbce_t)
        return losses.softmax_loss(logits, target_col, label_smoothing)

    def _sampled_loss(
        self,
        p: PackedSessions,
        h_sel: Tensor,
        targets: Tensor,
        tgt: PackedTargets | None,
        generator: torch.Generator | None,
        *,
        leave_out: bool = True,
    ) -> Tensor:
        """Sampled part of `packed_loss`: (M, d_model) hidden states, (M,) targets -> scalar
        (`tgt`: where the targets sit, for the item memory). "gbce" reads the same columns
        without the logQ correction (gSASRec's negatives are not importance-weighted)."""
        cols, log_p = self.sample_candidates(targets, generator)  # (U,), (U,)
        head = self._head_factors(h_sel, cols)  # (U, E) item rows: sparse exactly when the input lookup is
        if self.item_memory is None:
            assert head is not None  # ModelConfig: no head logits needs the memory
            logits = (head.h @ head.w.t()).float()  # (M, U)
        else:
            assert tgt is not None
            items = p.feats[self.cfg.item_feature]
            logits = self.item_memory.packed_scores(
                h_sel, items, p.segment, tgt, head, cols=cols, leave_out=leave_out
            )  # (M, U)
        if self.cfg.loss_fn == "gbce":
            return self._loss(logits, torch.searchsorted(cols, targets))
        return sampled.sampled_cross_entropy(logits, log_p, cols, targets)

    def _rerank_loss(
        self,
        p: PackedSessions,
        h_sel: Tensor,
        targets: Tensor,
        tgt: PackedTargets | None,
        label_smoothing: float,
        *,
        leave_out: bool = True,
    ) -> Tensor:
        """Re-ranking part of `packed_loss` (cfg.rerank): each target against its own candidates
        (`ItemMemory.candidates`: hard negatives from the counts) -> scalar.

        The same loss as (M, V) scores masked to each row's candidates (tested): the count terms
        come as flat entries (`rerank_view`), the columns are the union U of the batch's
        candidates and targets (`rerank_columns`); cross-entropy reads each target's candidates
        only (`rerank_ce`), gbce and label smoothing the (M, U) masked scores (`rerank_scores`).
        The sets are deterministic, so no logQ correction. A target outside its own candidates
        is one the model can never rank: it is dropped from the loss.
        """
        mem = self.item_memory
        assert mem is not None and tgt is not None
        items = p.feats[self.cfg.item_feature]  # (R, W)
        view = mem.rerank_view(items, p.segment, tgt, leave_out=leave_out)
        cols, sets = mem.rerank_columns(view, targets)  # (U,), each target's candidates among them
        head = self._head_factors(h_sel, cols)
        if self.cfg.loss_fn == "ce" and label_smoothing <= 0.0:  # over the candidates only
            w = revisit_weights(view.context.items, view.context.ctx, targets, self.target_weights)
            return mem.rerank_ce(h_sel, view, head, cols, sets, targets, w)
        member = mem.member(sets, targets.shape[0], cols.shape[0])  # (M, U)
        logits = mem.rerank_scores(h_sel, view, head, cols, member)  # (M, U), -inf off the candidates
        tgt_col = torch.searchsorted(cols, targets)  # (M,) every target is a column
        keep = member.gather(1, tgt_col[:, None]).squeeze(1)  # (M,) targets among their own candidates
        return self._loss(logits[keep], tgt_col[keep], label_smoothing)
