"""Non-neural baselines, evaluated on exactly the model's evaluation sessions.

Counts come from the training sessions of every window <= t (added window by
window with `BaselineCounts.add_sessions`):

* popular:       score = number of occurrences of the item in training sessions;
* cooc_knn:      score = number of training sessions in which the candidate
                 appears together with the input's last item (for the last
                 item itself: sessions where it appears at least twice),
                 ties broken by popularity;
* successor_knn: score = how often the candidate directly followed the input's
                 last item in a training session, ties broken by popularity.

Special ids (pad, null, OOV) are never ranked; items never seen in training
get -inf and a target never seen in training counts as a miss (rank +inf).
An input with no item (a one-click session) falls back to popularity.
Vectorised with numpy / scipy.sparse; scores are built in chunks of sessions.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from training.metrics import metrics_from_ranks, pessimistic_ranks_np
from training.names import FIRST_REAL_ID, PAD_ID

BASELINES = ("popular", "cooc_knn", "successor_knn")


def _valid(items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.arange(items.shape[1])[None, :] < lengths[:, None]  # (N, L)


class BaselineCounts:
    """Cumulative item statistics over the training sessions added so far."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.pop = np.zeros(n_items, dtype=np.int64)  # (V,)
        self.cooc = sp.csr_matrix((n_items, n_items), dtype=np.int64)  # (V, V)
        self.succ = sp.csr_matrix((n_items, n_items), dtype=np.int64)  # (V, V)
        self.n_sessions = 0

    def add_sessions(self, items: np.ndarray, lengths: np.ndarray) -> None:
        """Add N right-padded training sessions: items (N, L) encoded ids, lengths (N,)."""
        items = np.asarray(items, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        n, L = items.shape
        V = self.n_items
        valid = _valid(items, lengths)
        rows = np.broadcast_to(np.arange(n)[:, None], (n, L))[valid]
        vals = items[valid]
        self.pop += np.bincount(vals, minlength=V)
        # session x item occurrence counts, then binary presence
        occ = sp.csr_matrix((np.ones(vals.size, dtype=np.int64), (rows, vals)), shape=(n, V))
        occ.sum_duplicates()
        present = occ.copy()
        present.data[:] = 1
        cooc = (present.T @ present).tocsr()  # (V, V) sessions containing both (diag: containing the item)
        repeated = np.asarray((occ >= 2).sum(0)).ravel().astype(np.int64)  # sessions with the item twice
        cooc = cooc - sp.diags(cooc.diagonal()) + sp.diags(repeated)
        self.cooc = (self.cooc + cooc).tocsr()
        # successor pairs (t -> t+1) inside each session
        nxt = valid[:, 1:] & valid[:, :-1]
        a, b = items[:, :-1][nxt], items[:, 1:][nxt]
        succ = sp.csr_matrix((np.ones(a.size, dtype=np.int64), (a, b)), shape=(V, V))
        succ.sum_duplicates()
        self.succ = (self.succ + succ).tocsr()
        self.n_sessions += n

    def scores(self, name: str, last_items: np.ndarray) -> np.ndarray:
        """(B,) last input item (PAD_ID if the input is empty) -> (B, V) float64 scores."""
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
        pop = self.pop.astype(np.float64)
        tie = pop / (pop.max() + 1.0)  # in [0, 1): breaks ties of integer counts by popularity
        b = len(last_items)
        if name == "popular":
            s = np.broadcast_to(pop, (b, self.n_items)).copy()
        else:
            mat = self.cooc if name == "cooc_knn" else self.succ
            s = mat[last_items].toarray().astype(np.float64) + tie[None, :]
            s[last_items == PAD_ID] = tie  # no input item: popularity
        s[:, self.pop == 0] = -np.inf  # never seen in training
        s[:, :FIRST_REAL_ID] = -np.inf  # special ids are never ranked
        return s

    def ranks(
        self, name: str, last_items: np.ndarray, targets: np.ndarray, chunk: int | None = None
    ) -> np.ndarray:
        """Pessimistic rank of each target (+inf when the target was never seen in training).

        Scores are built `chunk` sessions at a time (default: ~4M scores, 32 MB).
        """
        chunk = chunk or max(1, 4_000_000 // self.n_items)
        last_items = np.asarray(last_items, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        out = np.empty(len(targets), dtype=np.float64)
        for i in range(0, len(targets), chunk):
            s = self.scores(name, last_items[i : i + chunk])
            out[i : i + chunk] = pessimistic_ranks_np(s, targets[i : i + chunk])
        out[(self.pop[targets] == 0) | (targets < FIRST_REAL_ID)] = np.inf
        return out


def last_input_items(items: np.ndarray, input_lengths: np.ndarray) -> np.ndarray:
    """(N, L) items, (N,) input lengths -> (N,) last input item, PAD_ID for an empty input."""
    items = np.asarray(items, dtype=np.int64)
    lengths = np.asarray(input_lengths, dtype=np.int64)
    last = items[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
    return np.where(lengths > 0, last, PAD_ID)


def evaluate_baselines(
    counts: BaselineCounts, input_items: np.ndarray, input_lengths: np.ndarray, targets: np.ndarray
) -> dict[str, dict[str, float]]:
    """Metrics of every baseline on the evaluation sessions (inputs = all but the last item)."""
    last = last_input_items(input_items, input_lengths)
    return {name: metrics_from_ranks(counts.ranks(name, last, targets)) for name in BASELINES}


def _top_k_rows(mat: sp.csr_matrix, k: int, tie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of every row of a count matrix by (count, tie): (V, k) int32 ids, (V, k) float32 counts.

    Rows with fewer than k entries are padded with column PAD_ID and count 0.
    """
    mat = mat.tocsr()
    mat.sum_duplicates()
    n = mat.shape[0]
    rows = np.repeat(np.arange(n), np.diff(mat.indptr))
    cols, vals = mat.indices, mat.data.astype(np.float64)
    order = np.lexsort((-tie[cols], -vals, rows))  # by row, then count desc, then popularity desc
    rows, cols, vals = rows[order], cols[order], vals[order]
    rank = np.arange(rows.size) - mat.indptr[rows]
    keep = (rank < k) & (vals > 0)
    idx = np.full((n, k), PAD_ID, dtype=np.int32)
    val = np.zeros((n, k), dtype=np.float32)
    idx[rows[keep], rank[keep]] = cols[keep]
    val[rows[keep], rank[keep]] = vals[keep]
    return idx, val


def memory_tables(counts: BaselineCounts, k: int) -> dict[str, np.ndarray]:
    """The count tables of the model's ItemMemory (training/model.py) from the training counts.

    cooc_idx/cooc_val: per item the k items co-occurring in most training sessions
    (same definition as cooc_knn), succ_idx/succ_val: the k most frequent direct
    successors (successor_knn), pop: occurrences (popular); ties by popularity.
    """
    tie = counts.pop.astype(np.float64)
    cooc_idx, cooc_val = _top_k_rows(counts.cooc, k, tie)
    succ_idx, succ_val = _top_k_rows(counts.succ, k, tie)
    return dict(
        cooc_idx=cooc_idx,
        cooc_val=cooc_val,
        succ_idx=succ_idx,
        succ_val=succ_val,
        pop=counts.pop.astype(np.float32),
    )
