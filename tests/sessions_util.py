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
