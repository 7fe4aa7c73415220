"""TrainConfig.item_init "cooc": new item rows start from the co-occurrence counts (training/item_init.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.item_init import cooc_vectors, init_new_rows
from training.names import FIRST_REAL_ID


def _two_groups(V: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Items 3..6 are seen together, items 7..10 are seen together, item 11 with nothing."""
    idx = torch.zeros(V, 3, dtype=torch.int32)
    val = torch.zeros(V, 3)
    for group in ([3, 4, 5, 6], [7, 8, 9, 10]):
        for a in group:
            others = [b for b in group if b != a]
            idx[a] = torch.tensor(others, dtype=torch.int32)
            val[a] = torch.tensor([4.0, 2.0, 1.0])
    return idx, val


def test_cooc_vectors_put_items_seen_together_close_and_empty_rows_at_zero():
    idx, val = _two_groups()
    x = cooc_vectors(idx, val, dim=2, seed=0)
    assert x.shape == (12, 2)
    assert torch.equal(x[:FIRST_REAL_ID], torch.zeros(FIRST_REAL_ID, 2))
    assert torch.equal(x[11], torch.zeros(2))
    same = F.cosine_similarity(x[3], x[5], 0)
    other = F.cosine_similarity(x[3], x[8], 0)
    assert same > 0.9 and other.abs() < 0.1, (same, other)
    assert torch.equal(x, cooc_vectors(idx, val, dim=2, seed=0))  # its own seeded draw
    torch.manual_seed(1)
    before = torch.rand(3)
    torch.manual_seed(1)
    cooc_vectors(idx, val, dim=2, seed=5)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left alone


def test_cooc_vectors_of_empty_tables_are_zero():
    idx, val = torch.zeros(6, 2, dtype=torch.int32), torch.zeros(6, 2)
    assert torch.equal(cooc_vectors(idx, val, dim=4, seed=0), torch.zeros(6, 4))


def test_new_rows_follow_the_map_the_trained_rows_define():
    """Trained rows that are an exact linear image of the count vectors: the new rows are the same
    image of theirs; trained rows, rows without counts and special ids stay as they were."""
    gen = torch.Generator().manual_seed(0)
    V, dim, E, old_v = 60, 3, 5, 40
    x = torch.randn(V, dim, generator=gen)
    x[[45, 50]] = 0.0  # two new items without any count
    w_true = torch.randn(dim, E, generator=gen)
    weight = torch.randn(V, E, generator=gen)
    weight[FIRST_REAL_ID:old_v] = x[FIRST_REAL_ID:old_v] @ w_true
    before = weight.clone()
    n = init_new_rows(weight, x, old_v, init_std=0.05)
    assert n == V - old_v - 2
    assert torch.equal(weight[:old_v], before[:old_v])
    assert torch.equal(weight[[45, 50]], before[[45, 50]])
    keep = [i for i in range(old_v, V) if i not in (45, 50)]
    assert torch.allclose(weight[keep], x[keep] @ w_true, atol=1e-4)


def test_first_window_rows_are_the_count_vectors_at_the_initial_spread():
    idx, val = _two_groups()
    x = cooc_vectors(idx, val, dim=4, seed=0)
    weight = torch.randn(12, 4) * 0.05
    before = weight.clone()
    assert init_new_rows(weight, x, 0, init_std=0.05) == 8  # every item with counts; none trained yet
    rows = list(range(3, 11))
    assert torch.allclose(weight[rows], x[rows] * (0.05 / x[rows].std()))
    assert torch.equal(weight[:FIRST_REAL_ID], before[:FIRST_REAL_ID]) and torch.equal(weight[11], before[11])
    with pytest.raises(ValueError, match="width 6"):
        init_new_rows(torch.zeros(12, 6), x, 0, init_std=0.05)


@pytest.mark.parametrize("item_init", ["random", "cooc"])
def test_trainer_starts_each_windows_new_rows_from_the_counts(
    tiny_synthetic_data, tmp_path, monkeypatch, item_init
):
    """The trainer calls it once per trained window, after the vocabulary grew and the memory holds the
    fitted sessions' counts, on the rows that window added (old_v = the rows before it); "random" never."""
    import training.item_init as init_mod
    from tests.training.train_util import tiny_cfg
    from training.train import train

    calls = []
    real = init_mod.init_new_rows

    def spy(weight, x, old_v, init_std):
        before = weight.clone()
        n = real(weight, x, old_v, init_std)
        calls.append((old_v, weight.shape[0], n, torch.equal(weight[:old_v], before[:old_v]), x))
        return n

    monkeypatch.setattr(init_mod, "init_new_rows", spy)
    cfg = tiny_cfg(
        tiny_synthetic_data, tmp_path / "run", epochs=1, item_init=item_init, train_on="cumulative",
        model={"memory": True}, evaluate=False, baselines=False,
    )  # fmt: skip
    rows = [r for r in train(cfg)["windows"] if r.get("sessions_trained")]
    if item_init == "random":
        assert calls == [] and all("item_rows_from_counts" not in r for r in rows)
        return
    assert rows and len(calls) == len(rows)
    sizes = [c[1] for c in calls]
    for i, ((old_v, V, n, kept, x), r) in enumerate(zip(calls, rows)):
        assert V == r["items_known"] and r["item_rows_from_counts"] == n
        assert old_v == (sizes[i - 1] if i else FIRST_REAL_ID)  # the rows trained before this window
        assert kept  # trained rows untouched
        assert x.abs().sum() > 0  # the memory already held the window's counts
    assert calls[0][2] > 0  # the first window's items all start from their counts
