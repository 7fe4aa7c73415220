"""Training recipes: the defaults of the recipe-dependent settings, each value with its reason.

"reference": the Transformers4Rec getting-started protocol (synthetic data keeps
it). "real": the recipe for real click logs (docs/quality.md gives the
measurements). A recipe names every setting in RECIPE_FIELDS plus the
ModelConfig overrides under "model"; `resolve_settings` layers a --config file
and explicit command-line flags on top (recipe < config file < flags).
"""

from __future__ import annotations

from typing import Any

from training.checkpoint import RunError

_REFERENCE_REASON = "Transformers4Rec getting-started protocol"

# name -> setting -> (value, reason); "model" -> ModelConfig field -> (value, reason)
_RECIPES: dict[str, dict[str, Any]] = {
    "reference": {
        "epochs": (5, _REFERENCE_REASON),
        "batch_size": (128, _REFERENCE_REASON + ": per_device_train_batch_size 128"),
        "lr": (5e-4, _REFERENCE_REASON),
        "cycles_per_epoch": (1.5, _REFERENCE_REASON + ": cosine restarts, 1.5 cycles per epoch"),
        "train_on": ("window", _REFERENCE_REASON + ": window t only"),
        "train_budget": (0, "window t only: nothing to cap"),
        "holdout": (0.0, "no early stopping, so nothing held back"),
        "patience": (0, "no early stopping: every window runs all its epochs"),
        "label_smoothing": (0.0, _REFERENCE_REASON),
        "weight_decay": (0.0, "HF Trainer default, as the reference"),
        "memory_lr": (0.0, "no item memory (0 = lr)"),
        "head_selection": (False, "needs the item memory and early stopping"),
        "stack": (0, "needs the item memory and early stopping"),
        "blend_guard": (False, "needs the item memory and early stopping"),
        "guard_split": ("held", "no guard"),
        "cooc_curve_fit": ("joint", "no item memory, so no curve: a no-op"),
        "model": {
            "objective": ("mlm", _REFERENCE_REASON + ": masked LM"),
            "mask_prob": (0.15, _REFERENCE_REASON),
        },
    },
    "real": {
        "epochs": (20, "at most 20 epochs per window; early stopping ends a window sooner"),
        "batch_size": (
            256,
            "256 sessions a step instead of 128: the same accuracy, less time. Valid, 3 seeds: DIGINETICA "
            "-1.3% +/- 1.1 NDCG@20, -0.3% +/- 0.7 Recall@20 (+0.9% / +0.1% in a run with the code before "
            "the evening's speed work: noise), NowPlaying1M as a whole +0.3% +/- 0.2 / +0.3% +/- 0.7 at "
            "818-893 vs 721-777 training sessions/s (docs/quality.md); Transformers4Rec's best on "
            "YOOCHOOSE was 384",
        ),
        "lr": (1e-3, "AdamW's usual default (with a constant LR, see cycles_per_epoch)"),
        "cycles_per_epoch": (0.0, "constant LR: the cosine restarts of the reference fight early stopping"),
        "train_on": (
            "cumulative",
            "every window <= t: a real log's windows are small (~1.5k sessions a day here) and the item "
            "vocabulary is large, so forgetting earlier windows throws away most item evidence (the "
            "baselines count over windows <= t as well)",
        ),
        "train_budget": (
            5_000,
            "a window trains on at most the newest 5,000 sessions (the model carries what it learnt from "
            "older ones, the counts keep them all). Valid split, same code: DIGINETICA (3 seeds) with "
            "patience 1 against the former 20,000 with patience 2: -1.1% +/- 0.1 NDCG@20, -0.6% +/- 0.9 "
            "Recall@20 at 41 vs 133 s of training per seed (patience 1 alone: 90 s); NowPlaying1M as a "
            "whole (seed 0, windows 2..9, both patience 1) against 20,000: -0.9% NDCG@20, +2.1% Recall@20 "
            "at 318 vs 678 s, and its 18 windows train in 943 s on one thread (docs/quality.md)",
        ),
        "holdout": (
            0.1,
            "early stopping scores a 10% slice of window t's TRAINING sessions, never window t+1",
        ),
        "patience": (
            1,
            "stop at the first epoch without a better held-back NDCG@20; the best epoch is kept. "
            "DIGINETICA, valid, 3 seeds, against patience 2: +0.1% +/- 0.5 NDCG@20, +0.4% +/- 0.8 "
            "Recall@20 at 90 vs 133 s of training per seed (the best epoch was the first in 5 of 6 windows)",
        ),
        "label_smoothing": (0.0, "no measured gain"),
        "weight_decay": (
            0.1,
            "the network's own item logits memorise training sessions and add noise to the counts on new "
            "sessions: regularised",
        ),
        "memory_lr": (1e-2, "the gates are a handful of weights facing a strong signal"),
        "head_selection": (
            False,
            "superseded by head_gate + stack, which learn the head's weight per session instead of "
            "switching it off per window",
        ),
        "stack": (
            5,
            "5 epochs of the item memory's combiner on the held-back sessions after each window's fit: "
            "there the network's logits are as good as on new sessions (it never trained on them), so "
            "the head gate and the count gates learn how far to trust each. DIGINETICA valid, 3 seeds, "
            "windows 3..8 (prototype on the pre-restructure code): stack + head gate 0.1404 / 0.2560 "
            "NDCG@20 / Recall@20, with rerank 0.1435 / 0.2593 (1.118x / 1.010x the count blend), "
            "against 0.1317 / 0.2386 without",
        ),
        "blend_guard": (
            True,
            "the floor under the model on a log too small for the network: from the window after a forward "
            "check (guard_split) finds the count blend better on NDCG@20 or Recall@20, the window's model "
            "serves as the blend, while its network and combiner train on. Valid, 3 seeds, against the "
            "recipe without it: DIGINETICA -0.4 % +/- 0.6 NDCG@20, -0.1 % +/- 0.2 Recall@20 (it served the "
            "blend in one window of one seed), NowPlaying1M as a whole +0.1 % +/- 0.1 / +0.3 % +/- 0.2 (the "
            "blend in 1, 4 and 0 of the first 6 windows of its seeds, never after)",
        ),
        "guard_split": (
            "next",
            "the guard reads the next window's training sessions scored with the counts of windows <= t (a "
            "forward check, as serving meets the next window), pooled over the windows so far, z > 1.645. The "
            "held-back slice (the guard's first form) never fired on DIGINETICA (valid, seed 0, windows 3..8: "
            "0 of 6) although the next window had the blend ahead on Recall@20 in two: a random slice of the "
            "window's own sessions, fitted by early stopping and stacking, flatters the model",
        ),
        "cooc_curve_fit": (
            "choose",
            "stacking fits the combiner with the co-occurrence curve and with plain log1p counts, and a "
            "forward check on the next window's training sessions (a training split, never an evaluation "
            "split) picks which serves from then on (z > 1.645 for the curve): the curve lifts one log and "
            "costs another, and only the next window tells them apart. Valid, 3 seeds, against the recipe "
            "without it: DIGINETICA identical in every window of every seed (the check never picked the "
            "curve, z -3.0 to +0.6), NowPlaying1M as a whole +3.2 % to +4.1 % NDCG@20 and +2.2 % to "
            "+4.8 % Recall@20 per seed (the curve picked from window 5 on, z 2.3-3.2 there, 6-9 at the "
            "end); the curve always on cost DIGINETICA 0.9-1.2 % (docs/quality.md, seventh session)",
        ),
        "model": {
            "objective": (
                "mlm",
                "masked LM (Transformers4Rec's best objective). Valid split, 3 seeds, against clm (the "
                "objective until 2026-12-05): with the two-hop fill DIGINETICA +3.1% +/- 2.6 NDCG@20, "
                "+5.3% +/- 2.1 Recall@20 (the fill alone +2.0% / +4.7%), NowPlaying1M as a whole +0.9% +/- "
                "1.3 / +2.8% +/- 0.4 (mlm alone +1.9% / +1.9%), and ~2x less training there (docs/quality.md)",
            ),
            "mask_prob": (
                0.3,
                "Transformers4Rec's best masking probability; 0.15 and 0.5 moved DIGINETICA by no more "
                "than the run-to-run noise",
            ),
            "memory": (
                True,
                "the ItemMemory (training/model/item_memory.py): co-occurrence, successor, repeat and popularity counts "
                "of the training sessions added to the logits through gates computed from XLNet's hidden "
                "state; without it the network alone stayed below most-popular on DIGINETICA (21k items, "
                "~1.5k sessions a day: too few clicks per item for embeddings)",
            ),
            "memory_hop2": (
                0.6,
                "an item's co-occurrence row with free slots takes up to 10 two-hop items (seen with an "
                "item it was seen with, never with it) at a pseudo-count below one co-occurrence: "
                "candidates the counts alone miss. Valid, 3 seeds: DIGINETICA +2.0% +/- 1.7 NDCG@20, "
                "+4.7% +/- 0.8 Recall@20 (0.3: +2.0% / +3.0%), NowPlaying1M +0.6% / +0.3% (0.3: -0.3% / "
                "-0.3%); the count blend holds the same tables and gains as much",
            ),
            "rerank": (
                True,
                "the network re-ranks the item memory's candidates (the context items, their "
                "co-occurrence lists, the last item's successors, the 128 most popular) and trains "
                "against them as hard negatives, instead of competing with the counts over the whole "
                "catalogue, where its own logits cost recall (docs/quality.md). DIGINETICA valid, "
                "3 seeds, windows 3..8 (prototype): rerank alone 0.1345 / 0.2525 NDCG@20 / Recall@20 vs "
                "0.1317 / 0.2386; with head_gate + stack 0.1435 / 0.2593 (1.118x / 1.010x the blend)",
            ),
            "head_gate": (
                True,
                "a per-session weight on the network's own item logits (starts at 1), which stacking "
                "fits on the held-back sessions: the head counts where it helps, not where it memorised "
                "(same measurement as stack; --head-selection, which switched the head off per "
                "window, gave 0.1414 / 0.2559 and chose off almost always)",
            ),
            "dropout": (0.5, "regularises the head's own item logits (see weight_decay)"),
            "embedding_init_std": (0.0, "start from zero item logits: the counts alone"),
            "cooc_curve": (
                3,
                "the co-occurrence term may read a learned curve of log1p(count), two slopes (up to one "
                "co-occurrence and beyond); cooc_curve_fit choose decides per log whether it serves. Two "
                "slopes beat eight on NowPlaying1M (valid, curve always on: +1.8 % / +2.8 % vs +1.3 % / "
                "+2.0 %) and learn the same bend on both logs: a first co-occurrence worth more than the "
                "logarithm, every further one far less",
            ),
            "scorer_hidden": (
                64,
                "a 2 x 64 MLP over each candidate's count features and the combiner's score re-ranks the 128 "
                "best candidates; fitted between windows on forward sessions (each window's training sessions "
                "scored by the model before it) and served while its newest three forward checks find it "
                "better (training/scorer_fit.py). Valid, 3 seeds: NowPlaying1M +0.6% +/- 1.2 NDCG@20 over the "
                "windows' mean, +3.0% pooled over sessions, +4.0 to +6.1% on the forward sessions (the "
                "networks alone -0.7 to +0.1%); DIGINETICA +2.4% +/- 0.7 / +0.9% +/- 1.2 (docs/quality.md)",
            ),
            "scorer_members": (
                3,
                "the scorer is the mean of three MLPs fitted with different seeds on the same pool (served as "
                "one MLP of 192 units): a fit on a small pool varies with its seed. Chosen on the forward "
                "sessions (training sessions only), 3 seeds, against one MLP: NowPlaying1M +2.1% +/- 0.4 "
                "NDCG@20, +1.0% +/- 0.3 Recall@20, DIGINETICA +1.4% +/- 0.4 / +0.5% +/- 0.4, every seed "
                "(the valid split's window means, NowPlaying1M -0.1% +/- 1.3 and DIGINETICA -0.8% +/- 1.1, are too "
                "noisy to resolve it); then the test split "
                "read once: NowPlaying1M 1.126x its blend on NDCG@20, DIGINETICA 1.174x (docs/quality.md)",
            ),
            "feature_norm": (
                True,
                "a LayerNorm per input feature (item embedding, continuous side features) before they "
                "are merged, as Transformers4Rec found side features help only so. Valid, 3 seeds, "
                "against the recipe without it: DIGINETICA +1.7% +/- 1.2 NDCG@20, +0.7% +/- 0.7 "
                "Recall@20, NowPlaying1M as a whole +1.9% / +0.3% (NDCG@20 up for every seed of both logs); "
                "on the side features only (--no-item-norm) +0.7% / +0.1% and +1.3% / +0.6%. With it, "
                "dropping the side features, dropout 0.3, label smoothing 0.3, depth 1 or the "
                "count-started item rows no longer helped on DIGINETICA (docs/quality.md)",
            ),
        },
    },
}


def _values(recipe: dict[str, Any]) -> dict[str, Any]:
    out = {k: value_reason[0] for k, value_reason in recipe.items() if k != "model"}
    out["model"] = {k: value_reason[0] for k, value_reason in recipe["model"].items()}
    return out


# name -> the settings as TrainConfig keyword arguments ("model": ModelConfig overrides)
RECIPES: dict[str, dict[str, Any]] = {name: _values(r) for name, r in _RECIPES.items()}
# the TrainConfig fields whose default depends on the recipe (every recipe sets each of them)
RECIPE_FIELDS: tuple[str, ...] = tuple(k for k in RECIPES["reference"] if k != "model")
assert all(set(r) == set(RECIPES["reference"]) for r in RECIPES.values()), "recipes must set the same fields"


def reason(recipe: str, key: str, model: bool = False) -> str:
    """Why `recipe` sets `key` (a ModelConfig field with model=True) as it does."""
    return (_RECIPES[recipe]["model"] if model else _RECIPES[recipe])[key][1]


def default_recipe(schema: dict[str, Any]) -> str:
    """The recipe for a DATA folder: reference for synthetic data (schema source "synthetic"), else real."""
    return "reference" if str(schema.get("source", "")) == "synthetic" else "real"


def resolve_settings(
    schema: dict[str, Any],
    recipe: str = "auto",
    params: dict[str, Any] | None = None,
    cli: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Recipe < --config file (`params`) < explicit command-line flags (`cli`): TrainConfig kwargs.

    Each layer is {TrainConfig field: value, "model": {ModelConfig setting: value}}; a value of
    None means "not given" (the layer below stays). "recipe" names the recipe used (+config
    when a file was read); a file's "recipe" picks the recipe when `recipe` is "auto"."""
    name = recipe
    if name == "auto":  # a config file names the recipe it was tuned on (training.tune: "real")
        name = str((params or {}).get("recipe") or default_recipe(schema))
    if name not in RECIPES:
        raise RunError(f"--recipe must be auto, {' or '.join(RECIPES)}, got {recipe!r}")
    out = {k: v for k, v in RECIPES[name].items() if k != "model"}
    model = dict(RECIPES[name]["model"])
    for layer in (params or {}, cli or {}):
        for k, v in layer.items():
            if k == "model":
                model.update({mk: mv for mk, mv in v.items() if mv is not None})
            elif v is not None and k != "recipe":
                out[k] = v
    out["model"] = model
    out["recipe"] = name if not params else f"{name}+config"
    return out
