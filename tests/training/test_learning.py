"""Training learns: on a planted order-only pattern the trained model beats the untrained one.

The pattern (sessions built here, nothing read from disk): P "context" items c_1..c_P,
one hub item x and P target items f(c_1)..f(c_P). Every session is

    c_i, c_j, x, f(c_i)        (i != j drawn uniformly)

so the next item after x is the target of the item *three* steps back, the first of
the two context items. Counts cannot express it:

* successor / co-occurrence of the last item x: uniform over the P targets (cooc_knn,
  successor_knn rank every target in one tie, pessimistic rank P);
* co-occurrence of the whole context: the bag {c_i, c_j, x} is followed by f(c_i)
  and by f(c_j) equally often (each order is as frequent), so the summed counts tie,
  and the item memory's distance-decayed blend favours the *second* item's target.

Only the order of c_i and c_j tells the answer, which a sequence model reads from
the positions. The model is trained here with a plain AdamW loop on
`SessionModel.training_loss` (clm, the objective of the real recipe; with and without
the item memory, whose tables come from `memory_tables(BaselineCounts)` as in
training), seeded, on the CPU. Evaluation: pessimistic ranks of `next_item_scores`
on held-out sessions (input: the first three items, target: the fourth).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.baselines import BaselineCounts, last_input_items, memory_tables
from training.metrics import metrics_from_ranks, pessimistic_ranks
from training.model import ModelConfig, SessionModel
from training.names import FIRST_REAL_ID, ITEM_LIST

P = 6  # context items
CONTEXT = np.arange(FIRST_REAL_ID, FIRST_REAL_ID + P)  # c_1..c_P
HUB = FIRST_REAL_ID + P  # x
TARGET = np.arange(HUB + 1, HUB + 1 + P)  # f(c_i) = TARGET[i]
V = int(TARGET[-1]) + 1  # specials 0..2 included
STEPS = 250
BATCH = 64


def planted_sessions(n: int, seed: int) -> np.ndarray:
    """(n, 4) sessions c_i, c_j, x, f(c_i) with i != j uniform."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, P, n)
    j = (i + rng.integers(1, P, n)) % P  # != i
    return np.stack([CONTEXT[i], CONTEXT[j], np.full(n, HUB), TARGET[i]], axis=1).astype(np.int64)


def recall_at_1(ranks) -> float:
    return metrics_from_ranks(ranks, ks=(1,))["recall@1"]


@torch.no_grad()
def model_recall_at_1(model: SessionModel, held: np.ndarray) -> float:
    model.eval()
    inputs = torch.from_numpy(held[:, :3])
    scores = model.next_item_scores({ITEM_LIST: inputs}, torch.full((len(held),), 3))  # (N, V)
    return recall_at_1(pessimistic_ranks(scores, torch.from_numpy(held[:, 3])))


def train(model: SessionModel, train_sessions: np.ndarray, seed: int) -> None:
    """A plain AdamW loop: random batches, `training_loss` (clm), `STEPS` updates."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    items = torch.from_numpy(train_sessions)
    lengths = torch.full((len(items),), items.shape[1])
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(items), (BATCH,), generator=gen)
        loss = model.training_loss({ITEM_LIST: items[idx]}, lengths[idx], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "no_memory"])
def test_training_learns_an_order_only_pattern(memory):
    torch.manual_seed(0)
    train_sessions, held = planted_sessions(600, seed=1), planted_sessions(300, seed=2)
    cfg = ModelConfig(
        categorical={ITEM_LIST: V}, max_len=4, embedding_dim=32, d_output=32, d_model=32, n_head=2,
        n_layer=1, d_inner=64, dropout=0.0, objective="clm", memory=memory, memory_k=8,
    )  # fmt: skip
    model = SessionModel(cfg)
    counts = BaselineCounts(V)
    counts.add_sessions(train_sessions, np.full(len(train_sessions), 4))
    if memory:  # the count tables of the training sessions, as training/train.py builds them
        tables = memory_tables(counts, cfg.memory_k)
        model.item_memory.set_tables(**{k: torch.from_numpy(v) for k, v in tables.items()})

    untrained = model_recall_at_1(model, held)
    train(model, train_sessions, seed=0)
    trained = model_recall_at_1(model, held)

    # the counts on the same held-out sessions: every target ties with the P - 1 others
    inputs, in_len, targets = held[:, :3], np.full(len(held), 3), held[:, 3]
    last = last_input_items(inputs, in_len)
    count_only = {
        name: recall_at_1(counts.ranks(name, last, targets, inputs=(inputs, in_len)))
        for name in ("cooc_knn", "successor_knn", "vsknn")
    }
    msg = f"untrained {untrained:.3f}, trained {trained:.3f}, counts {count_only}"
    assert untrained <= 0.5, msg  # near chance (1/P, or 0 where ties count against the target)
    assert trained >= 0.9, msg
    assert trained >= untrained + 0.4, msg
    assert all(trained >= r + 0.4 for r in count_only.values()), msg
