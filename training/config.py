"""The training settings: TrainConfig (with the model's settings, a ModelConfig) and its command line.

Each field owns its default and help text (`field(metadata=help_meta(...))`);
the command line of `python -m training.train` is derived from the fields of
TrainConfig and of ModelConfig (training/model/config.py) by training/cli.py,
and a run's value is layered

    dataclass defaults  <  recipe (training/recipes.py)  <  --config FILE  <  explicit flags

(`parse_args`): a flag that was not given leaves no trace, so the file never
beats an explicit flag. The model's settings travel typed: `TrainConfig.model`
is a ModelConfig without the schema, checked where it is built; the trainer
adds the data's schema once (`ModelConfig.with_schema`) and grows the tables
with `dataclasses.replace`.
"""

from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from training import cli
from training.checkpoint import RunError
from training.cli import ConfigFileError, comma_floats, help_meta
from training.data.splits import DataError, load_schema
from training.model.config import MODEL_FLAGS, MODEL_SETTINGS, ModelConfig
from training.recipes import RECIPE_FIELDS, RECIPES, resolve_settings

TRAIN_ON = ("window", "cumulative")
EVAL_SPLITS = ("valid", "test")
ITEM_INITS = ("random", "cooc")
CURVE_FITS = ("joint", "stack", "choose")
GUARD_SPLITS = ("held", "valid", "next")
MODEL_PREFIX = "model."  # argparse destinations of the model flags (cli.given(ns, MODEL_PREFIX))


@dataclass
class TrainConfig:
    """Every setting of a training run; the recipe fields (RECIPE_FIELDS) default to the reference's."""

    data: str = field(metadata=help_meta("DATA folder written by `python -m training.prepare`"))
    out: str = field(metadata=help_meta("RUN folder for checkpoints, metrics.json and metrics.png"))
    start_window: int = field(default=1, metadata=help_meta("first window to train on"))
    end_window: int = field(
        default=8, metadata=help_meta("train on windows start..END-1, evaluating each t on t+1")
    )
    epochs: int = field(default=5, metadata=help_meta("(max) epochs per window"))
    batch_size: int = field(
        default=128, metadata=help_meta("global training batch size (split across ranks)")
    )
    eval_batch_size: int = field(
        default=1024,
        metadata=help_meta("evaluation batch size (fewer rows at once for large catalogues: ~32M scores)"),
    )
    max_steps: int = field(
        default=0,
        metadata=help_meta(
            "stop each window after this many optimizer steps (0 = all; bench.scale bounds work)"
        ),
    )
    lr: float = field(
        default=5e-4,
        metadata=help_meta(
            "learning rate: AdamW for the network; SparseAdam (no weight decay) for the item table "
            "with the sampled loss"
        ),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=help_meta(
            "AdamW weight decay (not applied to the item memory, nor to the item table under SparseAdam)"
        ),
    )
    memory_lr: float = field(
        default=0.0, metadata=help_meta("learning rate of the item memory's gates (0 = --lr)")
    )
    head_selection: bool = field(
        default=False,
        metadata=help_meta(
            "item memory + early stopping: per window, keep the head's own item logits only if the "
            "held-back training sessions score better with them than with the gated counts alone"
        ),
    )
    stack: int = field(
        default=0,
        metadata=help_meta(
            "item memory + early stopping (no-op without): after a window's fit, train only the item memory's "
            "combiner (count gates, head gate, position weights) for N epochs on the held-back "
            "sessions, which neither the network nor the counts saw (stacking; 0 = off)"
        ),
    )
    stack_last: bool = field(
        default=False,
        metadata=help_meta(
            "stacking fits each held-back session's last item only (the evaluation's target): clm, "
            "instead of every next item; mlm, each session masked at its last item only instead of "
            "at random positions"
        ),
    )
    members: int = field(
        default=1,
        metadata=help_meta(
            "train this many models side by side (an ensemble: each its own seed, held-back slice, early "
            "stopping, stacking and checks, the same count tables) and rank by the mean of their "
            "log-softmax over the shared candidates; needs the item memory with re-ranking. Member 0 is "
            "the run of --seed alone; RUN/members/<k>/ holds each member's checkpoint"
        ),
    )
    stack_prefixes: bool = field(
        default=False,
        metadata=help_meta(
            "mlm stacking (no-op without --stack; clm already fits every next item): the combiner is fitted on "
            "every prefix of two or more items of each held-back session, masked at its last item (the "
            "evaluation's task, the whole context before the target, at every position), instead of the "
            "sessions masked at random positions"
        ),
    )
    stack_lag: bool = field(
        default=False,
        metadata=help_meta(
            "stacking (no-op without --stack): the combiner is fitted on window t's held-back sessions "
            "scored with the counts of the windows before t only, as the evaluation scores window t+1 with "
            "those of the windows up to t (a window later than the counts, not of their own time); the "
            "window's full counts are back afterwards. The first window (no earlier counts) stacks as "
            "without it"
        ),
    )
    cooc_curve_fit: str = field(
        default="joint",
        metadata=help_meta(
            "item memory + --cooc-curve (no-op without): where its curve is learned. joint: with the "
            "rest of the combiner, in the fit and in stacking; stack: in stacking only (the fit reads it "
            "as it stands); choose: stacking fits the combiner twice, with the curve and with the "
            "identity (plain log1p counts), and a forward check picks one: after window t, window t+1's "
            "training sessions are scored by both with the counts of windows <= t (as the evaluation and "
            "serving meet the next window), and the curve serves from the next window on once their "
            "pooled paired NDCG@20 gain is positive at z > 1.645 (training/forward_check.py). Without "
            "--stack, stack and choose leave the curve at the identity",
            choices=CURVE_FITS,
        ),
    )
    forward_check_sessions: int = field(
        default=5_000,
        metadata=help_meta(
            "the forward checks (--cooc-curve-fit choose, --guard-split next) score at most the newest N "
            "of the next window's training sessions"
        ),
    )
    scorer_prefixes: float = field(
        default=0.0,
        metadata=help_meta(
            "candidate scorer (--scorer-hidden): besides each forward check's sessions, at most F per "
            "checked session of their shorter prefixes (2 items or more; the prefix's last item is its "
            "target) join the scorer's pool, drawn at random (seeded): more rows to fit on where windows "
            "are small. The check itself reads the whole sessions only (0 = none)"
        ),
    )
    repeat_reweight: bool = field(
        default=False,
        metadata=help_meta(
            "item memory + re-ranking, cross-entropy (no-op without): each window's training targets that "
            "re-visit an item of their context weigh r_last / r_train, the others (1 - r_last) / (1 - r_train), "
            "where r_last is the share of the window's fitted sessions whose last item re-visits the session "
            "and r_train the share of training targets that do (masked LM sees fewer re-visits than the "
            "last item: a label-shift correction, measured from training sessions only)"
        ),
    )
    fuse_blend: tuple[float, ...] = field(
        default=(),
        metadata=help_meta(
            "item memory (diagnostic, no-op without): each window's evaluation also scores the model with "
            "the count blend's weights added to its combiner's at each weight B (scores = the model's + B x "
            "the blend's count scores), reported beside the baselines as fused_B; training never uses it. "
            "Comma-separated, e.g. 0.25,0.5,1 (left out: none)",
            parse=comma_floats,
            metavar="B[,B...]",
        ),
    )
    guard_split: str = field(
        default="held",
        metadata=help_meta(
            "the sessions the blend guard scores: held = the held-back training sessions (the ones early "
            "stopping chose on and stacking fitted on); valid = window t's own valid split (never trained, "
            "fitted or counted; sessions of the training window's time, not of the evaluation window); "
            "next = a forward check: after window t, the model and its count blend score the newest "
            "--forward-check-sessions of window t+1's training split (counts of windows <= t), the "
            "per-session differences are pooled over every check so far, and from the next window on the "
            "model serves as the blend while the blend is better on NDCG@20 or Recall@20 at z > 1.645 "
            "(its network and stacked combiner train on as before: training/forward_check.py)",
            choices=GUARD_SPLITS,
        ),
    )
    stack_pool: int = field(
        default=0,
        metadata=help_meta(
            "stacking (no-op without --stack): each earlier window's held-back slice stays out of the "
            "network's training for good (it is in the counts), and stacking also reads the newest N "
            "of those sessions, their own counts left out, beside window t's (0 = window t's only)"
        ),
    )
    item_init: str = field(
        default="random",
        metadata=help_meta(
            "item memory (no-op without): how a window's new item rows start. random: N(0, "
            "embedding_init_std); cooc: from the co-occurrence counts (their top singular vectors, "
            "mapped onto the trained rows by least squares; training/item_init.py)",
            choices=ITEM_INITS,
        ),
    )
    blend_guard: bool = field(
        default=False,
        metadata=help_meta(
            "item memory + early stopping (no-op without): after a window's fit (and stacking), score the "
            "held-back sessions with the model and with its count blend (the combiner at its initial "
            "values, no network logits); where the blend is better on NDCG@20 or on Recall@20, the "
            "window's model ranks as the blend (its network keeps training in the next window)"
        ),
    )
    cycles_per_epoch: float = field(
        default=1.5,
        metadata=help_meta("cosine LR cycles per epoch (num_cycles = this * epochs), 0 = constant LR"),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=help_meta("gradient clipping norm (0 = off; HF Trainer default 1)")
    )
    seed: int = field(default=0, metadata=help_meta("seed of initialisation, shuffling, masking and dropout"))
    device: str = field(
        default="auto", metadata=help_meta("auto (cuda if available), cpu, cuda or cuda:N; cuda uses AMP")
    )
    threads: int = field(
        default=0, metadata=help_meta("torch CPU threads per process (0 = cores / local processes)")
    )
    resume: bool = field(
        default=False, metadata=help_meta("continue after the last finished window in --out")
    )
    baselines: bool = field(
        default=True, metadata=help_meta("evaluate the popular / kNN baselines and the count blend too")
    )
    save_ranks: bool = field(
        default=False,
        metadata=help_meta(
            "write every method's per-session target ranks of each evaluated window to "
            "OUT/ranks/window_T.npz (T the evaluation window; inf = a miss), for `python -m bench.paired`"
        ),
    )
    keep_windows: bool = field(
        default=False,
        metadata=help_meta(
            "also keep the model after every window t in RUN/windows/<t>/ (model.pt + meta.json; "
            "clients.replay serves each one)"
        ),
    )
    tensorboard: bool = field(
        default=False, metadata=help_meta("also write TensorBoard logs to RUN/tensorboard")
    )
    progress: bool = field(default=True, metadata=help_meta("tqdm progress bars"))
    model: ModelConfig = field(
        default_factory=ModelConfig,
        metadata=help_meta(
            "the model's settings: a ModelConfig without the schema (the model flags); a mapping of "
            "settings is accepted and checked (`ModelConfig.from_settings`)",
            cli=False,
        ),
    )
    # --- recipe settings (training/recipes.py; the reference protocol's values as defaults) ---
    recipe: str = field(
        default="reference",
        metadata=help_meta(
            "the recipe these settings came from (reference | real | <name>+config)", cli=False
        ),
    )
    train_on: str = field(
        default="window",
        metadata=help_meta("window: window t only; cumulative: every window <= t", choices=TRAIN_ON),
    )
    train_budget: int = field(
        default=0,
        metadata=help_meta(
            "cumulative: train window t on at most this many sessions, the newest (window t's always "
            "whole, then earlier windows newest first; the counts keep every window; 0 = every window <= t)"
        ),
    )
    holdout: float = field(
        default=0.0,
        metadata=help_meta("fraction of window t's training sessions held back for early stopping"),
    )
    patience: int = field(
        default=0,
        metadata=help_meta(
            "stop after N epochs without a better held-back NDCG@20, keep the best (0 = off)",
            flags=("--early-stopping", "--patience"),
        ),
    )
    label_smoothing: float = field(default=0.0, metadata=help_meta("label smoothing of the training loss"))
    eval_split: str = field(
        default="valid",
        metadata=help_meta(
            "split of window t+1 that evaluates window t: valid (the reference protocol, comparable with "
            "Transformers4Rec's) or test (final numbers: nothing else reads it; bench.quality's table)",
            choices=EVAL_SPLITS,
        ),
    )
    exact_eval_max_items: int = field(
        default=200_000,
        metadata=help_meta(
            "a model served in two stages is evaluated as served (its candidates); up to this many "
            'item ids also exactly over the catalogue (window metrics under "exact", the agreement, '
            "early stopping's held-back scores and choice), 0 = never"
        ),
    )
    evaluate: bool = field(
        default=True,
        metadata=help_meta(
            "False: no evaluation on window t+1 (training.tune selects on held-back data only)", cli=False
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):  # {setting: value} (tests, benchmarks, resolve_settings)
            self.model = ModelConfig.from_settings(self.model, where="TrainConfig.model")
        if self.head_selection and not (self.patience > 0 and self.model.memory):
            raise ValueError(
                "head_selection needs early stopping (patience > 0, holdout > 0) and the item memory "
                "(--memory): it chooses on the held-back sessions whether the head's own logits help"
            )
        if self.stack < 0:
            raise ValueError(f"stack must be >= 0 epochs (0 = off), got {self.stack}")
        if self.memory_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"memory_lr and weight_decay must be >= 0, got {self.memory_lr} and {self.weight_decay}"
            )
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if self.train_budget < 0:
            raise ValueError(f"train_budget must be >= 0 (0 = no cap), got {self.train_budget}")
        if self.item_init not in ITEM_INITS:
            raise ValueError(f"item_init must be one of {ITEM_INITS}, got {self.item_init!r}")
        if self.guard_split not in GUARD_SPLITS:
            raise ValueError(f"guard_split must be one of {GUARD_SPLITS}, got {self.guard_split!r}")
        if self.cooc_curve_fit not in CURVE_FITS:
            raise ValueError(f"cooc_curve_fit must be one of {CURVE_FITS}, got {self.cooc_curve_fit!r}")
        if self.forward_check_sessions < 1:
            raise ValueError(f"forward_check_sessions must be >= 1, got {self.forward_check_sessions}")
        if not self.scorer_prefixes >= 0:
            raise ValueError(f"scorer_prefixes must be >= 0 (0 = none), got {self.scorer_prefixes}")
        if self.members < 1:
            raise ValueError(f"members must be >= 1 (1 = one model, no ensemble), got {self.members}")
        if self.stack_pool < 0:
            raise ValueError(f"stack_pool must be >= 0, got {self.stack_pool}")
        if self.stack_prefixes and self.stack_pool > 0:
            # a pooled session is in the counts whole; leaving out a prefix's own pairs would leave its
            # target's co-occurrences with the session's later items in
            raise ValueError(
                f"stack_prefixes cannot be combined with stack_pool (got stack_pool={self.stack_pool}): the "
                "pooled sessions are counted whole, and a prefix cannot leave out the rest of its session"
            )
        self.fuse_blend = tuple(float(b) for b in self.fuse_blend)  # a JSON list from a --config file
        if any(b <= 0 for b in self.fuse_blend):
            raise ValueError(f"fuse_blend weights must be > 0, got {list(self.fuse_blend)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.patience > 0 and self.holdout <= 0.0:
            raise ValueError("early stopping (patience > 0) needs a held-back slice: set holdout > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.exact_eval_max_items < 0:
            raise ValueError(f"exact_eval_max_items must be >= 0, got {self.exact_eval_max_items}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 = no cap), got {self.max_steps}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON (metrics.json, meta.json "train_config"); "model": the model's settings."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["fuse_blend"] = list(self.fuse_blend)  # JSON has lists, not tuples
        out["model"] = self.model.settings()
        return out


def check_model(model: ModelConfig, label_smoothing: float, repeat_reweight: bool = False) -> None:
    """The checks of the settings that need the model's final config (`with_schema`: the
    loss "auto" resolves by the catalogue size): label smoothing needs the full softmax, or
    re-ranking's softmax over each target's candidates (its uniform part spans them);
    repeat_reweight weighs re-ranking's cross-entropy (`ItemMemory.rerank_ce`) only."""
    if repeat_reweight and not (model.memory and model.rerank and model.loss_fn == "ce" and label_smoothing == 0):
        raise RunError(
            "--repeat-reweight weighs the re-ranking cross-entropy's targets: it needs --memory, --rerank, "
            f"--loss-fn ce and --label-smoothing 0 (got memory={model.memory}, rerank={model.rerank}, "
            f"loss_fn={model.loss_fn!r}, label_smoothing={label_smoothing})"
        )
    if label_smoothing > 0.0 and model.loss == "sampled" and not (model.rerank and model.memory):
        raise RunError(
            f"label_smoothing={label_smoothing} needs the full softmax (its uniform part spans the whole "
            "catalogue) and the loss is sampled; pass --label-smoothing 0, or --loss full"
        )


# --- a --config file ---------------------------------------------------------------------------

_TRAIN_FIELDS: dict[str, Field] = {f.name: f for f in fields(TrainConfig)}
_MODEL_FIELDS: dict[str, Field] = {f.name: f for f in fields(ModelConfig)}
assert set(RECIPE_FIELDS) <= set(_TRAIN_FIELDS), "a recipe sets a field TrainConfig does not have"
assert not set(MODEL_SETTINGS) & set(_TRAIN_FIELDS), "a model setting shadows a TrainConfig field"


def split_settings(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """{TrainConfig field: value, "model": {model setting: value}} from a flat or nested object:
    model settings may sit at the top level or under "model" (ConfigFileError names an unknown key)."""
    nested = raw.get("model", {})
    if not isinstance(nested, dict):
        raise ConfigFileError(f'{where}: "model" must be an object of model settings, got {nested!r}')
    out: dict[str, Any] = {"model": dict(nested)}
    for k, v in raw.items():
        if k == "model":
            continue
        if k in MODEL_SETTINGS:
            out["model"][k] = v
        else:
            out[k] = v
    train_keys = {k: v for k, v in out.items() if k != "model"}
    cli.check_keys(train_keys, set(_TRAIN_FIELDS) - {"model"}, where)
    cli.check_keys(out["model"], MODEL_SETTINGS, f'{where} "model"')
    return out


def load_params(path: str | Path) -> dict[str, Any]:
    """A --config JSON file (as `python -m training.tune` writes: {"params": {...}} or a flat {...}):
    TrainConfig fields and model settings (`split_settings`)."""
    return split_settings(cli.read_config_file(path), f"--config {path}")


# --- the command line ----------------------------------------------------------------------------


def _recipe_values(name: str, model: bool = False) -> str:
    """' [reference X, real Y]': the values a flag takes from the recipes when not given."""

    def value(recipe: dict[str, Any]) -> Any:
        if not model:
            return recipe[name]
        return recipe["model"].get(name, cli.field_default(_MODEL_FIELDS[name]))

    vals = [value(r) for r in RECIPES.values()]
    if all(v == vals[0] for v in vals):
        return f" [{'all' if len(vals) > 2 else 'both'} {vals[0]}]"
    return " [" + ", ".join(f"{n} {v}" for n, v in zip(RECIPES, vals)) + "]"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The training CLI: --recipe, --config, a flag per TrainConfig field, then the model flags."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--recipe",
        choices=["auto", *RECIPES],
        default="auto",
        help="defaults of the recipe flags ([reference X, real Y] below): auto = reference for synthetic "
        "data (schema source 'synthetic'), real for a click log prepared from --input",
    )
    p.add_argument(
        "--config",
        "--params",
        dest="config",
        default=None,
        help="JSON of settings (as written by `python -m training.tune`); explicit flags win",
    )
    cli.add_flags(p, TrainConfig, defaults_text={n: _recipe_values(n) for n in RECIPE_FIELDS})
    cli.add_flags(
        p,
        ModelConfig,
        prefix=MODEL_PREFIX,
        group="model (ModelConfig)",
        defaults_text={n: _recipe_values(n, model=True) for n in MODEL_FLAGS},
    )
    return p


def parse_args(argv: list[str] | None, prog: str, description: str) -> TrainConfig:
    """The command line -> TrainConfig: dataclass defaults < recipe < --config FILE < explicit flags.

    ConfigFileError: an unreadable file, an unknown setting, no --data/--out. A bad value exits
    with argparse's usage message (code 2)."""
    p = build_parser(prog, description)
    ns = p.parse_args(argv)
    flags = cli.given(ns)
    flags["model"] = cli.given(ns, MODEL_PREFIX)
    recipe, config = flags.pop("recipe"), flags.pop("config")
    params = load_params(config) if config else None
    data = flags.get("data", (params or {}).get("data"))
    try:
        schema = load_schema(data) if data is not None else {"source": "synthetic"}
    except DataError:
        # no readable DATA/schema.json: nothing says it is a real log; `train` reports the
        # missing data itself, with its own message
        schema = {"source": "synthetic"}
    settings = resolve_settings(schema, recipe, params, flags)
    try:
        return cli.layered(TrainConfig, settings, where=f"--config {config}" if config else "flags")
    except ConfigFileError:
        raise
    except (ValueError, TypeError) as e:
        p.error(str(e))
    raise AssertionError("unreachable")  # p.error exits
