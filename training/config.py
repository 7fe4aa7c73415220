"""The training settings: TrainConfig, the one list of settable fields, the CLI derived from both.

Each TrainConfig field carries its help text (`field(metadata={"help": ...})`);
the command line of `python -m training.train` is built from
`dataclasses.fields(TrainConfig)` and from the ModelConfig fields that carry a
help text (training/model.py), so a setting is declared once:

* recipe fields (training/recipes.py RECIPE_FIELDS) and model fields default to
  None on the command line, meaning "not given": the recipe, then a --config
  file, supply them (`resolve_settings`);
* a bool field defaulting to True becomes `--no-<name>`, one defaulting to False
  `--<name>`; a recipe or model bool gets both (`--memory` / `--no-memory`);
* metadata "cli": False keeps a field off the command line, "flags" names the
  flag(s), "choices" restricts the value, "config": True makes a non-recipe field
  settable from a --config file.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.checkpoint import RunError
from training.model import ModelConfig
from training.recipes import RECIPE_FIELDS, RECIPES

TRAIN_ON = ("window", "cumulative")
EVAL_SPLITS = ("valid", "test")


def _help(text: str, **more: Any) -> dict[str, Any]:
    return {"help": text, **more}


@dataclass
class TrainConfig:
    data: str = field(metadata=_help("DATA folder written by `python -m training.prepare`"))
    out: str = field(metadata=_help("RUN folder for checkpoints, metrics.json and metrics.png"))
    start_window: int = field(default=1, metadata=_help("first window to train on"))
    end_window: int = field(
        default=8, metadata=_help("train on windows start..END-1, evaluating each t on t+1")
    )
    epochs: int = field(default=5, metadata=_help("(max) epochs per window"))
    batch_size: int = field(
        default=128, metadata=_help("global training batch size (split across ranks)", config=True)
    )
    eval_batch_size: int = field(
        default=1024,
        metadata=_help("evaluation batch size (fewer rows at once for large catalogues: ~32M scores)"),
    )
    max_steps: int = field(
        default=0,
        metadata=_help("stop each window after this many optimizer steps (0 = all; bench.scale bounds work)"),
    )
    lr: float = field(
        default=5e-4,
        metadata=_help(
            "learning rate: AdamW for the network; SparseAdam (no weight decay) for the item table "
            "with the sampled loss"
        ),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_help(
            "AdamW weight decay (not applied to the item memory, nor to the item table under SparseAdam)"
        ),
    )
    memory_lr: float = field(
        default=0.0, metadata=_help("learning rate of the item memory's gates (0 = --lr)")
    )
    head_selection: bool = field(
        default=False,
        metadata=_help(
            "item memory + early stopping: per window, keep the head's own item logits only if the "
            "held-back training sessions score better with them than with the gated counts alone"
        ),
    )
    cycles_per_epoch: float = field(
        default=1.5,
        metadata=_help("cosine LR cycles per epoch (num_cycles = this * epochs), 0 = constant LR"),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_help("gradient clipping norm (0 = off; HF Trainer default 1)", config=True)
    )
    seed: int = field(default=0, metadata=_help("seed of initialisation, shuffling, masking and dropout"))
    device: str = field(
        default="auto", metadata=_help("auto (cuda if available), cpu, cuda or cuda:N; cuda uses AMP")
    )
    threads: int = field(
        default=0, metadata=_help("torch CPU threads per process (0 = cores / local processes)")
    )
    resume: bool = field(default=False, metadata=_help("continue after the last finished window in --out"))
    baselines: bool = field(
        default=True, metadata=_help("evaluate the popular / kNN baselines too (flag: skip them)")
    )
    keep_windows: bool = field(
        default=False,
        metadata=_help("also keep the model after every window t in RUN/windows/<t>/ (model.pt + meta.json; "
                       "clients.replay serves each one)"),
    )
    tensorboard: bool = field(default=False, metadata=_help("also write TensorBoard logs to RUN/tensorboard"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bars (flag: none)"))
    model: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("ModelConfig overrides (objective, mask_prob, ...): the model flags", cli=False),
    )
    # --- recipe settings (training/recipes.py; the reference protocol's values as defaults) ---
    recipe: str = field(
        default="reference",
        metadata=_help("the recipe these settings came from (reference | real | <name>+config)", cli=False),
    )
    train_on: str = field(
        default="window",
        metadata=_help("window: window t only; cumulative: every window <= t", choices=TRAIN_ON),
    )
    holdout: float = field(
        default=0.0, metadata=_help("fraction of window t's training sessions held back for early stopping")
    )
    patience: int = field(
        default=0,
        metadata=_help(
            "stop after N epochs without a better held-back NDCG@20, keep the best (0 = off)",
            flags=("--early-stopping", "--patience"),
        ),
    )
    label_smoothing: float = field(default=0.0, metadata=_help("label smoothing of the training loss"))
    eval_split: str = field(
        default="valid",
        metadata=_help(
            "split of window t+1 that evaluates window t: valid (the reference protocol, comparable with "
            "Transformers4Rec's) or test (final numbers: nothing else reads it; bench.quality's table)",
            choices=EVAL_SPLITS,
        ),
    )
    evaluate: bool = field(
        default=True,
        metadata=_help(
            "False: no evaluation on window t+1 (training.tune selects on held-back data only)", cli=False
        ),
    )

    def __post_init__(self) -> None:
        if self.head_selection and not (self.patience > 0 and self.model.get("memory")):
            raise ValueError(
                "head_selection needs early stopping (patience > 0, holdout > 0) and the item memory "
                "(--memory): it chooses on the held-back sessions whether the head's own logits help"
            )
        if self.memory_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"memory_lr and weight_decay must be >= 0, got {self.memory_lr} and {self.weight_decay}"
            )
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.patience > 0 and self.holdout <= 0.0:
            raise ValueError("early stopping (patience > 0) needs a held-back slice: set holdout > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing > 0.0 and self.model.get("loss") == "sampled":
            raise ValueError(sampled_smoothing_message(self.label_smoothing))
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 = no cap), got {self.max_steps}")


def sampled_smoothing_message(label_smoothing: float) -> str:
    return (
        f"label_smoothing={label_smoothing} needs the full softmax (its uniform part spans the whole "
        "catalogue) and the loss is sampled; pass --label-smoothing 0, or --loss full"
    )


# --- the settable fields, derived once -----------------------------------------------------------

_TRAIN_FIELDS: dict[str, Field] = {f.name: f for f in fields(TrainConfig)}
_MODEL_FIELDS: dict[str, Field] = {f.name: f for f in fields(ModelConfig)}
assert set(RECIPE_FIELDS) <= set(_TRAIN_FIELDS), "a recipe sets a field TrainConfig does not have"

# ModelConfig fields settable from the command line, a --config file and training.tune
MODEL_FIELDS: tuple[str, ...] = tuple(n for n, f in _MODEL_FIELDS.items() if "help" in f.metadata)
# TrainConfig fields a --config file may set (besides "recipe" and the MODEL_FIELDS)
CONFIG_FIELDS: tuple[str, ...] = RECIPE_FIELDS + tuple(
    n for n, f in _TRAIN_FIELDS.items() if f.metadata.get("config")
)


def load_params(path: str | Path) -> dict[str, Any]:
    """A --config JSON file (as `python -m training.tune` writes): TrainConfig fields, "model" overrides.

    Accepts {"params": {...}} (tune's output) or a flat {...}; model fields may sit at
    the top level or under "model".
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"--config {path}: cannot read a JSON object ({e})") from e
    raw = raw.get("params", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise RunError(f"--config {path}: expected a JSON object of settings, got {type(raw).__name__}")
    out: dict[str, Any] = {"model": dict(raw.get("model", {}))}
    allowed = set(CONFIG_FIELDS) | {"recipe"}
    for k, v in raw.items():
        if k == "model":
            continue
        if k in MODEL_FIELDS:
            out["model"][k] = v
        elif k in allowed:
            out[k] = v
        else:
            raise RunError(
                f"--config {path}: unknown setting {k!r}; expected one of {sorted(allowed | set(MODEL_FIELDS))}"
            )
    return out


# --- the command line, derived from the fields ------------------------------------------------------


def _recipe_values(name: str, model: bool) -> str:
    """' [reference X, real Y]': the defaults a recipe flag takes when not given."""

    def value(recipe: dict[str, Any]) -> Any:
        if not model:
            return recipe[name]
        return recipe["model"].get(name, _MODEL_FIELDS[name].default)

    vals = [value(r) for r in RECIPES.values()]
    if all(v == vals[0] for v in vals):
        return f" [{'all' if len(vals) > 2 else 'both'} {vals[0]}]"
    return " [" + ", ".join(f"{n} {v}" for n, v in zip(RECIPES, vals)) + "]"


def _add_flag(p: argparse.ArgumentParser, f: Field, typ: Any, from_recipe: bool, help: str) -> None:
    """One flag for field `f`; `from_recipe`: its default comes from the recipe (None = not given)."""
    flags = list(f.metadata.get("flags", ["--" + f.name.replace("_", "-")]))
    kw: dict[str, Any] = {"dest": f.name, "help": help}
    if typ is bool and from_recipe:
        kw.update(action=argparse.BooleanOptionalAction, default=None)
    elif typ is bool:
        if f.default:  # on by default: the flag switches it off
            flags = ["--no-" + f.name.replace("_", "-")]
            kw.update(action="store_false", default=True)
        else:
            kw.update(action="store_true", default=False)
    else:
        kw.update(type=typ, default=None if from_recipe else f.default)
        if f.default is MISSING and f.default_factory is MISSING:
            kw.update(required=True, default=None)
        elif not from_recipe:
            kw["help"] += f" [{f.default}]"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
    p.add_argument(*flags, **kw)


def add_flags(p: argparse.ArgumentParser, cls: type, from_recipe: tuple[str, ...] = ()) -> None:
    """A flag for every field of dataclass `cls` that has a help text and no "cli": False;
    the fields in `from_recipe` default to None ("not given") and show the recipes' values."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" in f.metadata and f.metadata.get("cli", True):
            recipe = f.name in from_recipe
            text = f.metadata["help"] + (_recipe_values(f.name, model=False) if recipe else "")
            _add_flag(p, f, hints[f.name], recipe, text)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The training CLI: every TrainConfig field with a flag, then the settable ModelConfig fields."""
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
    add_flags(p, TrainConfig, RECIPE_FIELDS)
    model_hints = typing.get_type_hints(ModelConfig)
    for name in MODEL_FIELDS:
        f = _MODEL_FIELDS[name]
        text = "model " + name + ": " + f.metadata["help"] + _recipe_values(name, model=True)
        _add_flag(p, f, model_hints[name], True, text)
    return p


def cli_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields and model fields given on the command line (None = not given)."""
    cli: dict[str, Any] = {k: getattr(a, k) for k in RECIPE_FIELDS}
    cli["model"] = {k: getattr(a, k) for k in MODEL_FIELDS}
    return cli


def plain_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The fields with a flag whose default does not depend on the recipe."""
    return {
        n: getattr(a, n)
        for n, f in _TRAIN_FIELDS.items()
        if f.metadata.get("cli", True) and n not in RECIPE_FIELDS
    }
