"""Random right-padded sessions for model tests (one helper, imported by the test modules that need it)."""

from __future__ import annotations

import numpy as np

from training.names import FIRST_REAL_ID


def random_sessions(n: int, n_items: int, seed: int, max_len: int, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(items (n, max_len) int64 right-padded with 0, lengths (n,)): lengths uniform in [min_len, max_len],
    real ids uniform in [FIRST_REAL_ID, n_items)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    items = np.zeros((n, max_len), dtype=np.int64)
    for s in range(n):
        items[s, : lengths[s]] = rng.integers(FIRST_REAL_ID, n_items, lengths[s])
    return items, lengths


def ranker_inputs(frame, features: list[str], categorical, max_len: int) -> tuple[np.ndarray, tuple]:
    """Split rows (one session per row, list columns) -> (session ids, the ranker's padded inputs:
    one [S, max_len] tensor per feature in `features` order, then lengths [S])."""
    import torch

    from training.names import ITEM_LIST, SESSION_COL

    tensors = []
    for name in features:
        dtype = np.int64 if name in categorical else np.float32
        padded = np.zeros((len(frame), max_len), dtype=dtype)
        for i, values in enumerate(frame[name]):
            padded[i, : len(values)] = values
        tensors.append(torch.from_numpy(padded))
    lengths = torch.tensor([len(v) for v in frame[ITEM_LIST]], dtype=torch.int64)
    return frame[SESSION_COL].to_numpy(), (*tensors, lengths)
