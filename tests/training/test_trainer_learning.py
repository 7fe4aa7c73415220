"""The Trainer learns (issue 17): the real training loop beats the untrained model and every count baseline.

tests/training/test_learning.py trains with its own loop; this runs `training.trainer.Trainer` itself
(AdamW / SparseAdam and their schedules, clipping, the packed loss, early stopping, stacking,
evaluation) on a DATA folder written here, so it fails when any of them stops learning.

The planted pattern (the idea of tests/training/test_learning.py, made proof against the item
memory): P context items c_1..c_P, two hub items x and z, P targets f(c_1)..f(c_P):

    c_i, c_j, x, f(c_i)      or      c_i, c_j, z, f(c_j)      (i != j, hub uniform)

After x the answer is the target of the item two steps back, after z of the item one step
back. Counts cannot tell which: every co-occurrence, successor and popularity count is
symmetric in the two context items, and the item memory's learned position weights pick
the same side after x and after z (its gates scale a whole count term, not a position), so
the count baselines, the count blend and an untrained model (or one whose network never
trained: only the memory's combiner, e.g. by stacking) get at best one session in two at
rank 1. Reading the hub *and* the order is the network's job. Metric: MRR@20 on window 2's
valid sessions (rank 1 in every session: 1.0; the right target of two tied: <= 0.75).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.evaluate import REPORTED
from training.names import FIRST_REAL_ID, ITEM_LIST, SESSIONS_DIR
from training.recipes import resolve_settings
from training.runtime import Dist

P = 4
CONTEXT = np.arange(FIRST_REAL_ID, FIRST_REAL_ID + P)  # c_1..c_P
HUB_FIRST, HUB_SECOND = FIRST_REAL_ID + P, FIRST_REAL_ID + P + 1  # x, z
TARGET = np.arange(FIRST_REAL_ID + P + 2, FIRST_REAL_ID + 2 * P + 2)  # f(c_i)
V = int(TARGET[-1]) + 1  # specials 0..2 included
METRIC = "mrr@20"


def planted_sessions(n: int, seed: int) -> np.ndarray:
    """(n, 4) sessions c_i, c_j, x, f(c_i) or c_i, c_j, z, f(c_j), i != j uniform, hub uniform."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, P, n)
    j = (i + rng.integers(1, P, n)) % P  # != i
    first = rng.random(n) < 0.5
    hub = np.where(first, HUB_FIRST, HUB_SECOND)
    target = np.where(first, TARGET[i], TARGET[j])
    return np.stack([CONTEXT[i], CONTEXT[j], hub, target], axis=1).astype(np.int64)


def write_split(path: Path, sessions: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    items = pa.array([list(s) for s in sessions], type=pa.list_(pa.int64()))
    pq.write_table(pa.table({ITEM_LIST: items}), path)


def write_planted_data(data: Path) -> Path:
    """A prepared DATA folder (docs/contracts.md): window 1 trains, window 2's valid split evaluates."""
    for w, seed in ((1, 1), (2, 2)):
        for split, n, off in (("train", 8000, 0), ("valid", 200, 10), ("test", 10, 20)):
            write_split(data / SESSIONS_DIR / str(w) / f"{split}.parquet", planted_sessions(n, seed + off))
    schema = {
        "max_sequence_length": 4,
        "categorical": {ITEM_LIST: V},
        "item_list": ITEM_LIST,
        "continuous": [],
        "windows": [1, 2],
        "source": "planted pattern (tests/training/test_trainer_learning.py)",
        "vocabulary_by_window": {ITEM_LIST: {"1": V, "2": V}},
    }
    (data / "schema.json").write_text(json.dumps(schema))
    return data


@pytest.fixture(scope="module")
def planted_data(tmp_path_factory) -> Path:
    return write_planted_data(tmp_path_factory.mktemp("planted") / "data")


# The real recipe (cumulative, early stopping on 10% held back, AdamW with weight
# decay, constant LR, clipping, a LayerNorm per input feature; with the item memory: head gate, stacking,
# rerank), with a model of the pattern's size and settings that learn it in a few hundred steps: lr 3e-3
# with weight decay 0.033 (the recipe's lr x decay), no dropout, random item vectors (the recipe's zero
# init and dropout 0.5 need several times the steps here).
# Not lr 1e-2 (used until the LayerNorm joined the recipe): the LayerNorm reads only the direction of an
# item vector, so an Adam step of ~lr on vectors of std 0.05 turns the normalised input by ~20 % per step;
# at 1e-2 the real variant never left the counts' plateau (MRR@20 0.78, docs/quality.md); at 3e-3
# every variant learned it by epoch 2 (real and sampled: epoch 1), seeds 0-4 (real) and 0-2 (full, sampled).
# patience 2 (the recipe's is 1): in 3 short epochs one held-back score a little below the last (the
# sampled softmax's noise) must not end the run before the pattern is learnt.
SMALL = dict(epochs=3, batch_size=64, lr=3e-3, weight_decay=0.033, patience=2)
# Objective clm (the recipe's until 2026-12-05; it is masked LM 0.3 since): this order-only pattern is
# learnt by clm's loss on every next item within 3 epochs; masked LM reached MRR@20 0.50-0.74 in 3
# epochs here (full, sampled, real), short of the 0.95 the test asks.
SMALL_MODEL = dict(embedding_dim=32, d_output=32, d_model=32, n_head=2, n_layer=1, d_inner=64, dropout=0.0,
                   embedding_init_std=0.05, objective="clm")  # fmt: skip
VARIANTS = {
    # the network alone, the full softmax, under a cosine schedule (restarts every 2 epochs)
    "full": dict(cycles_per_epoch=0.5, model=dict(memory=False, loss="full")),
    # the network alone, the sampled softmax (SparseAdam on the item table beside AdamW)
    "sampled": dict(model=dict(memory=False, loss="sampled", negatives=8)),
    # the real recipe: item memory, rerank, head gate, stacking 5 epochs. memory_lr 1e-3, not the recipe's
    # 10 x lr: the head gate closes on the network's logits while they are still noise (random item
    # vectors) and throttles its learning; at 1e-2 the held-back score stayed on the counts' plateau for
    # 3-6 epochs depending on the seed (recorded in docs/quality.md). Width 64: learned by epoch 2 for seeds 0-2
    "real": dict(
        memory_lr=1e-3, model=dict(loss="full", embedding_dim=64, d_output=64, d_model=64, d_inner=128)
    ),
}


def run_trainer(data: Path, out: Path, variant: str, train: bool = True) -> dict:
    """The metrics row of window 1 -> 2 from `Trainer.run` (train=False: the untrained model, fit skipped)."""
    from training.config import TrainConfig
    from training.trainer import Trainer

    kw = VARIANTS[variant]
    flags = {**SMALL, **{k: v for k, v in kw.items() if k != "model"}}
    flags["model"] = {**SMALL_MODEL, **kw["model"]}
    flags.update(data=str(data), out=str(out), end_window=2, threads=1, progress=False)
    flags.setdefault("seed", 0)
    cfg = TrainConfig(**resolve_settings({"source": "planted"}, "real", None, flags))
    assert cfg.stack == 5 and cfg.model.rerank and cfg.model.head_gate and cfg.holdout == 0.1
    trainer = Trainer(cfg, Dist())
    if not train:
        trainer.fit = lambda t, st, held=None, pool=None, lag=None: {}  # evaluate the model as built (tables filled)
    return trainer.run()["windows"][0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_trainer_learns_what_counts_cannot(planted_data, tmp_path, variant):
    untrained = run_trainer(planted_data, tmp_path / "untrained", variant, train=False)
    row = run_trainer(planted_data, tmp_path / "run", variant)
    counts = {name: row["baselines"][name][METRIC] for name in REPORTED}
    msg = (
        f"{variant}: trained {row[METRIC]:.3f}, untrained {untrained[METRIC]:.3f}, counts {counts}, row {row}"
    )
    assert max(counts.values()) <= 0.8, msg  # the pattern holds: counts cannot order the two targets
    assert untrained[METRIC] <= 0.8, msg
    assert row[METRIC] >= 0.95, msg
    assert row[METRIC] >= untrained[METRIC] + 0.15, msg
    assert all(row[METRIC] >= c + 0.15 for c in counts.values()), msg
