"""ModelConfig: every hyper-parameter of the session model, plus what it reads from the data schema.

    cfg = ModelConfig(objective="clm", memory=True)       # settings only (no schema yet)
    cfg = cfg.with_schema(schema)                         # + DATA/schema.json: a model can be built
    cfg = dataclasses.replace(cfg, categorical=sizes)     # the tables grown to a later window
    ModelConfig.from_dict(json.loads(meta_json))          # from a checkpoint, without pickle

The fields own their defaults and, where a run may set them from the command
line, their help text (`field(metadata={"help": ...})`): `python -m training.train`
derives its model flags from them (training/config.py). Every check of a value
is in `__post_init__`, so it runs wherever a config is built or replaced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import training.model.choice as choice
from training.names import FIRST_REAL_ID, ITEM_LIST
from training.schema import Schema

OBJECTIVES = ("mlm", "clm")
LOSSES = ("full", "sampled")
LOSS_FNS = ("ce", "gbce")
RANKINGS = ("exact", "two_stage")


@dataclass
class ModelConfig:
    """Every hyper-parameter of the model, plus what it needs from the data schema.

    Serialised to JSON in the checkpoint (meta.json) so that a model is rebuilt
    without pickle: `ModelConfig.from_dict(json.load(...))`.

    Without the schema fields (`categorical` empty) a config holds settings only:
    the values are checked, but the choices that depend on the catalogue size
    ("auto" loss and ranking, the memory_k cap) wait for `with_schema`, and no
    model can be built from it. training.train keeps the run's model settings so
    (TrainConfig.model) and adds the schema once the data is read.
    """

    # Fields with a "help" text have a command-line flag (training/config.py); every field but
    # the SCHEMA_FIELDS may be set by a recipe or a --config file.
    # --- from DATA/schema.json ------------------------------------------------
    categorical: dict[str, int] = field(
        default_factory=dict
    )  # list feature -> cardinality (specials included)
    continuous: list[str] = field(default_factory=list)  # continuous list features
    item_feature: str = ITEM_LIST  # the categorical feature that is predicted
    max_len: int = 20  # max_sequence_length of the data (the model accepts any L)
    # --- input block (T4Rec defaults of the reference example) --------------
    embedding_dim: int = field(  # embedding_dim_default=64 in T4Rec
        default=64, metadata={"help": "embedding size of every categorical feature"}
    )
    embedding_init_std: float = 0.05  # T4Rec's default embedding initializer N(0, 0.05)
    continuous_dim: int = 64  # continuous_projection=64
    d_output: int = 100  # projection of the concatenated features
    # --- transformer body ---------------------------------------------------
    d_model: int = field(default=64, metadata={"help": "transformer width"})
    n_head: int = field(default=4, metadata={"help": "attention heads (d_model must be a multiple)"})
    n_layer: int = field(default=2, metadata={"help": "transformer layers"})
    d_inner: int = field(  # 4 * d_model, as T4Rec's XLNetConfig.build
        default=256, metadata={"help": "feed-forward width of a transformer layer"}
    )
    dropout: float = field(
        default=0.3, metadata={"help": "dropout probability of the transformer (XLNetConfig.dropout)"}
    )
    layer_norm_eps: float = 0.03
    initializer_range: float = 0.01
    ff_activation: str = "gelu"
    # --- objective -------------------------------------------------------------
    objective: str = field(
        default="mlm",
        metadata={"help": "mlm: masked LM (the reference); clm: causal LM", "choices": OBJECTIVES},
    )
    mask_prob: float = field(
        default=0.15, metadata={"help": "mlm: probability that a real position is masked"}
    )
    mask_last: float = field(
        default=0.0,
        metadata={
            "help": "mlm: share of the sessions of a batch whose only masked position is their last item "
            "(BERT4Rec's extra samples that match the next-item task); the others are masked at mask_prob"
        },
    )
    mask_init_std: float = 0.001  # trainable mask embedding ~ N(0, 0.001) as T4Rec
    # --- item memory (off in the reference recipe; see ItemMemory) ---------------
    memory: bool = field(
        default=False,
        metadata={
            "help": "item memory: co-occurrence / successor / repeat / popularity counts of the training "
            "sessions added to the logits through learned gates (ItemMemory)"
        },
    )
    memory_k: int = field(
        default=100, metadata={"help": "item memory: neighbours kept per item (top-k by count)"}
    )
    # Catalogues of >= memory_k_min_items ids keep min(memory_k, memory_k_large) neighbours per item:
    # the tables are V x K x 16 B (1.45 GB at 908k ids and K = 100, 0.46 GB at K = 32), the bulk
    # of a 1M-item training process and export. Resolved in __post_init__ (meta.json records the K
    # used); below the threshold nothing changes. docs/scale.md measures it.
    memory_k_large: int = field(
        default=32,
        metadata={
            "help": "item memory: neighbours kept per item from memory_k_min_items ids (caps memory_k)"
        },
    )
    memory_k_min_items: int = 200_000
    memory_hop2: float = field(
        default=0.0,
        metadata={
            "help": "item memory: an item's co-occurrence row with free slots is filled with its two-hop "
            "items (never seen with it, seen with an item that is), pseudo-count up to this (0 = off, "
            "<= 1: below one real co-occurrence; training.baselines.two_hop_fill)"
        },
    )
    memory_window_decay: float = field(
        default=1.0,
        metadata={
            "help": "item memory: after window t the counts of window w's sessions weigh this ** (t - w) in "
            "its tables (1 = every session alike; recent co-occurrence and popularity count more below 1; "
            "the classical baselines keep plain counts; bench.count_fusion's decay_G measures it untrained)"
        },
    )
    # --- how the network and the counts are combined (item memory; defaults: the network's item
    # logits are added to the gated counts over the whole catalogue) -----------------------------
    rerank: bool = field(
        default=False,
        metadata={
            "help": "item memory (no-op without): the network re-ranks the memory's candidates (the context items, "
            "their co-occurrence lists, the last item's successors, the rank_popular most popular "
            "items) instead of scoring the whole catalogue; trained against those candidates only "
            "(hard negatives from the counts); every other item is never ranked"
        },
    )
    head_gate: bool = field(
        default=False,
        metadata={
            "help": "item memory (no-op without): a per-session learned weight softplus(Linear(h)) >= 0 on the "
            "network's own item logits, beside the count gates (starts at 1)"
        },
    )
    head_logits: bool = field(
        default=True,
        metadata={"help": "the network's own item logits (h . item vector); off: the gated counts only"},
    )
    head_repeats: bool = field(
        default=True,
        metadata={
            "help": "item memory (no-op without): the network's own item logits score the session's own items "
            "too; off: a re-visit is scored by the memory's terms alone (its head logit left out), so the "
            "network ranks the new items and the repeat term decides re-visits (RepeatNet's repeat / "
            "explore split)"
        },
    )
    # --- input block switches (ablations) ---------------------------------------------------------
    feature_norm: bool = field(
        default=False,
        metadata={"help": "a LayerNorm per input feature before merging (Transformers4Rec's side features)"},
    )
    item_norm: bool = field(
        default=True,
        metadata={
            "help": "feature_norm (no-op without): the item embedding gets its LayerNorm too; off: only the "
            "side features (other categorical embeddings, the continuous projection)"
        },
    )
    side_features: bool = field(
        default=True, metadata={"help": "read the continuous features (off: they are zeroed)"}
    )
    continuous_log: bool = field(
        default=False,
        metadata={
            "help": "each continuous input x enters as sign(x) log1p(|x|) (an item's age of hundreds of days "
            "would otherwise swamp the item embedding; Transformers4Rec's example log-transforms its recency)"
        },
    )
    repeat_feature: bool = field(
        default=False,
        metadata={
            "help": "an input per position: how often its item occurs at the other positions the position "
            "may attend to (0, 1, 2, 3 or more; masked positions and unknown ids never count), an embedding "
            "added after masking (zero at the start). Without it the network cannot tell that a session "
            "re-visits its items while their vectors are still near zero (most items of a real log)"
        },
    )
    memory_masked_context: bool = field(
        default=False,
        metadata={
            "help": "item memory, mlm (no-op otherwise): a masked target's count terms read every earlier item "
            "of its session, masked or not, as at serving time (the network still sees the unmasked ones "
            "only); off: the unmasked earlier items only, so training sees fewer re-visits than serving"
        },
    )
    pop_prior: int = field(
        default=0,
        metadata={
            "help": "item memory: a learned score per candidate from its popularity alone, piecewise linear in "
            "log1p(pop) over this many knots (one per unit), of any sign, zero at the start; 0: off (the "
            "linear term g_pop * log1p(pop), g_pop >= 0, only)"
        },
    )
    cooc_curve: int = field(
        default=0,
        metadata={
            "help": "item memory: the co-occurrence term reads a learned curve of log1p(count) instead of "
            "log1p(count): piecewise linear over this many knots (one per unit), extended along its last "
            "segment, 0 at 0, the identity at the start; 0: off"
        },
    )
    scorer_hidden: int = field(
        default=0,
        metadata={
            "help": "item memory + re-ranking (no-op without): an MLP with two hidden layers of this width "
            "re-ranks each session's --scorer-top best candidates from their count features and the "
            "combiner's score, fitted between windows on forward sessions (each window's training sessions "
            "scored by the model of the window before) and served once a forward check finds it better "
            "(training/scorer_fit.py); 0: off"
        },
    )
    scorer_members: int = field(
        default=1,
        metadata={
            "help": "--scorer-hidden: the scorer is the mean of this many MLPs fitted with different seeds on the "
            "same pool, served as one MLP of members x --scorer-hidden units (the second layer block-diagonal)"
        },
    )
    scorer_top: int = field(
        default=128, metadata={"help": "--scorer-hidden: how many of the combiner's best candidates it re-ranks"}
    )
    scorer_network: bool = field(
        default=False,
        metadata={
            "help": "--scorer-hidden: the network's own signals among the scorer's inputs too: each candidate's "
            "item logit from the network (its log-softmax over the candidates, before the head gate) and the "
            "session's gates (the four count gates, the head gate)"
        },
    )
    scorer_recent: int = field(
        default=0,
        metadata={
            "help": "--scorer-hidden: one more input of the scorer, each candidate's log1p count in the newest "
            "this many training sessions of the windows counted (the last window whole, at least): how popular "
            "it is now beside log1p(pop), its count over every window; 0: off"
        },
    )
    memory_decay: float = 0.8  # initial weight of a context item `d` positions before the last: decay**d
    # --- training loss over the catalogue (see `SessionModel.sample_candidates`) ----------------
    # "full": softmax over every item ((positions, V) logits, the reference); "sampled": softmax over
    # the batch's targets + `negatives` shared popularity-sampled items with the logQ correction, so
    # a step costs O(positions x (targets + negatives)) and the item table gets sparse gradients;
    # "auto" (default): "sampled" where it costs clearly less than "full" (training/model/choice.py:
    # from 2 x negatives ids, or from sampled_min_items when set), else "full". Resolved in
    # __post_init__, so the config (meta.json) records the loss actually used, and "choices" why.
    loss: str = field(
        default="auto",
        metadata={
            "help": "training loss: full softmax over every item, sampled softmax (targets + shared "
            "popularity negatives, logQ-corrected, sparse item-table updates), or auto: sampled where "
            "it costs clearly less (from 2 x --negatives ids, or --sampled-min-items)",
            "choices": LOSSES + ("auto",),
        },
    )
    sampled_min_items: int | None = field(
        default=None,
        metadata={"help": "loss auto: the sampled loss from this many item ids (default: 2 x --negatives)"},
    )
    negatives: int = field(  # drawn with replacement (GRU4Rec's n_sample default)
        default=2048, metadata={"help": "sampled loss: shared negatives drawn per batch"}
    )
    # negatives ~ (count + 1)**sample_alpha over the real ids; GRU4Rec's tuned range is 0.2-0.75 with
    # logq = 1 for cross-entropy; the upper end samples the popular items (which hold most of the
    # softmax mass) often, and the logQ correction removes the bias this leaves
    sample_alpha: float = field(
        default=0.75,
        metadata={"help": "sampled loss: negatives drawn with probability ~ (count + 1)^alpha (0 = uniform)"},
    )
    # "ce": softmax cross-entropy over the loss's columns (every item, the sampled ones, or the
    # re-ranked candidates); "gbce": gSASRec's generalised binary cross-entropy over the same columns
    # (Petrov & Macdonald, RecSys'23; training/model/losses.py), calibrated by gbce_t
    loss_fn: str = field(
        default="ce",
        metadata={
            "help": "ce: softmax cross-entropy; gbce: generalised binary cross-entropy (gSASRec) over "
            "the same columns (every item, the sampled ones or the re-ranked candidates)",
            "choices": LOSS_FNS,
        },
    )
    gbce_t: float = field(
        default=0.75, metadata={"help": "gbce: calibration t in [0, 1] (gSASRec's default 0.75; 0 = BCE)"}
    )
    # --- serving top-k over the catalogue (see `SessionModel.next_item_topk`) ----------------------
    # "exact": score every item, then topk (the reference; cost O(V) per session); "two_stage":
    # candidates per session (its items, co-occurrence neighbours of its last `rank_context` items,
    # successors of the last one, the `rank_popular` most popular items, the `ivf_keep` best items of
    # an inverted-file index over the item table, `ivf_probe` lists of `ivf_list_size` items), scored
    # exactly (network + item memory) on those only; "auto" (default): "two_stage" where a request
    # costs less than "exact" (training/model/choice.py: from 25 x the candidates per session, or
    # from two_stage_min_items when set). Resolved in __post_init__ (meta.json records the ranking
    # used and why). docs/scale.md and docs/throughput.md have the measurements behind the defaults.
    # Under `rerank` (with the memory), "two_stage" scores the memory's own candidates (no IVF index)
    # and "auto" resolves to it at any catalogue size, since nothing else is ranked; "exact" scores
    # every item and masks the rest (faster at large batches on small catalogues, docs/quality.md).
    # Both give the same top-k.
    rank: str = "auto"
    two_stage_min_items: int | None = None
    rank_context: int = 5  # last items of a session whose co-occurrence lists are candidates
    rank_popular: int = 128  # most popular items always among the candidates (stand in for the pop bonus)
    ivf_list_size: int = 256  # items per inverted list row (lists are split to this size: static shapes)
    ivf_probe: int = 4  # list rows probed per session (ivf_probe * ivf_list_size items scored)
    ivf_keep: int = 64  # best items of the probed lists that become candidates

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.loss not in LOSSES + ("auto",):
            raise ValueError(f"loss must be one of {LOSSES + ('auto',)}, got {self.loss!r}")
        if self.sampled_min_items is not None and self.sampled_min_items < 1:
            raise ValueError(f"sampled_min_items must be >= 1, got {self.sampled_min_items}")
        if self.negatives < 1:
            raise ValueError(
                f"negatives must be >= 1, got {self.negatives} (the sampled loss always draws shared negatives)"
            )
        if not 0.0 <= self.sample_alpha <= 1.0:
            raise ValueError(f"sample_alpha must be in [0, 1], got {self.sample_alpha}")
        if self.has_schema and self.item_feature not in self.categorical:
            raise ValueError(
                f"item_feature {self.item_feature!r} is not among the categorical features "
                f"{sorted(self.categorical)}; the schema must give its cardinality"
            )
        if self.has_schema and self.categorical[self.item_feature] <= FIRST_REAL_ID:
            raise ValueError(
                f"item cardinality {self.categorical[self.item_feature]} leaves no real item "
                f"(real ids start at {FIRST_REAL_ID})"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if not 0.0 <= self.mask_last <= 1.0:
            raise ValueError(f"mask_last must be in [0, 1], got {self.mask_last}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        for name in ("pop_prior", "cooc_curve"):
            if getattr(self, name) < 0 or getattr(self, name) == 1:
                raise ValueError(f"{name} must be 0 (off) or >= 2 knots, got {getattr(self, name)}")
        if not self.scorer_recent >= 0:
            raise ValueError(
                f"scorer_recent must be >= 0 sessions (0 = off), got {self.scorer_recent}"
            )
        if self.scorer_members < 1:
            raise ValueError(f"scorer_members must be >= 1 (1 = one MLP), got {self.scorer_members}")
        if self.scorer_hidden < 0 or self.scorer_top < 1:
            raise ValueError(
                f"scorer_hidden must be >= 0 (0 = off) and scorer_top >= 1, got {self.scorer_hidden} and "
                f"{self.scorer_top}"
            )
        if self.memory and self.memory_k < 1:
            raise ValueError(f"memory_k must be >= 1, got {self.memory_k}")
        if not 0.0 <= self.memory_hop2 <= 1.0:
            raise ValueError(f"memory_hop2 must be in [0, 1] (0 = off), got {self.memory_hop2}")
        if not 0.0 < self.memory_window_decay <= 1.0:
            raise ValueError(f"memory_window_decay must be in (0, 1] (1 = off), got {self.memory_window_decay}")
        if self.memory_k_large < 1:
            raise ValueError(f"memory_k_large must be >= 1, got {self.memory_k_large}")
        if self.has_schema and self.n_items >= self.memory_k_min_items:
            self.memory_k = min(self.memory_k, self.memory_k_large)
        # rerank and head_gate combine the network with the item memory: without it they do nothing
        # (so a recipe that sets them still runs with --no-memory); the head's logits are all there is
        if not self.head_logits and not self.memory:
            raise ValueError(
                "head_logits=False needs the item memory (memory=True): nothing else scores items"
            )
        if self.loss_fn not in LOSS_FNS:
            raise ValueError(f"loss_fn must be one of {LOSS_FNS}, got {self.loss_fn!r}")
        if not 0.0 <= self.gbce_t <= 1.0:
            raise ValueError(f"gbce_t must be in [0, 1], got {self.gbce_t}")
        if self.memory and not 0.0 < self.memory_decay <= 1.0:
            raise ValueError(f"memory_decay must be in (0, 1], got {self.memory_decay}")
        if self.has_schema and self.loss == "auto":
            self.loss = choice.auto_loss(self)
        if self.rank not in RANKINGS + ("auto",):
            raise ValueError(f"rank must be one of {RANKINGS + ('auto',)}, got {self.rank!r}")
        for name in ("two_stage_min_items", "rank_popular", "ivf_list_size", "ivf_probe", "ivf_keep"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rank_context < 0:
            raise ValueError(f"rank_context must be >= 0, got {self.rank_context}")
        if self.has_schema and self.rank == "auto":
            self.rank = choice.auto_rank(self)

    @property
    def has_schema(self) -> bool:
        """Whether the schema fields are filled (`with_schema`); without them, settings only."""
        return bool(self.categorical)

    @property
    def n_items(self) -> int:
        """Size of the item vocabulary V (encoded ids 0..V-1, specials included)."""
        if not self.has_schema:
            raise ValueError("this ModelConfig holds settings only: add the data's schema with `with_schema`")
        return self.categorical[self.item_feature]

    @property
    def feature_names(self) -> list[str]:
        """Input tensors `next_item_scores` expects, in a fixed order."""
        return list(self.categorical) + list(self.continuous)

    @classmethod
    def from_schema(cls, schema: Schema | Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Build from DATA/schema.json (a `Schema` or its dict, see docs/contracts.md); overrides win."""
        schema = Schema.of(schema)
        kw: dict[str, Any] = dict(
            categorical=dict(schema.categorical),
            continuous=list(schema.continuous),
            item_feature=schema.item_feature,
            max_len=schema.max_len,
        )
        kw.update(overrides)
        return cls(**kw)

    def with_schema(self, schema: Schema | Mapping[str, Any]) -> ModelConfig:
        """These settings with the schema fields of DATA/schema.json (= `from_schema(schema, **settings)`)."""
        schema = Schema.of(schema)
        return replace(
            self,
            categorical=dict(schema.categorical),
            continuous=list(schema.continuous),
            item_feature=schema.item_feature,
            max_len=schema.max_len,
        )

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], where: str = "model settings") -> ModelConfig:
        """A settings-only config from {field: value} (a recipe's, a --config file's, the flags').

        Names must be settable fields (MODEL_SETTINGS: not read from the schema); the values
        are checked by `__post_init__`. Both raise ValueError naming the setting."""
        unknown = sorted(set(values) - set(MODEL_SETTINGS))
        if unknown:
            raise ValueError(
                f"{where}: unknown model setting {unknown[0]!r}; expected one of {sorted(MODEL_SETTINGS)}"
            )
        return cls(**values)

    def settings(self) -> dict[str, Any]:
        """{field: value} of the settable fields (MODEL_SETTINGS), in field order."""
        return {name: getattr(self, name) for name in MODEL_SETTINGS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig fields {unknown}; was this checkpoint written by a newer version?"
            )
        # a config written before `loss` existed was trained with the full softmax, whatever its size
        # ... and kept memory_k neighbours per item whatever its size (its tables have that shape)
        return cls(**{"loss": "full", "memory_k_large": d.get("memory_k", cls.memory_k), **d})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# the fields read from DATA/schema.json (`with_schema`); every other field is a setting
SCHEMA_FIELDS: tuple[str, ...] = ("categorical", "continuous", "item_feature", "max_len")
MODEL_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(ModelConfig) if f.name not in SCHEMA_FIELDS)
# the settings with a command-line flag (a help text)
MODEL_FLAGS: tuple[str, ...] = tuple(f.name for f in fields(ModelConfig) if "help" in f.metadata)
assert set(MODEL_FLAGS) <= set(MODEL_SETTINGS)
