"""Rows -> sessions, in order of first appearance: the one implementation.

    g = group_by_first_appearance(session_ids)    # session_ids: [N] one key per row
    g.session_ids                                 # [S] keys, in order of first appearance
    rows = g.row_order[g.starts[s] : g.starts[s] + g.counts[s]]   # rows of session s, input order

Used by the serving transform (training.serving_transform) and the gRPC client
(clients.plan_requests). Imports only numpy: it can be copied unchanged into a
Triton model folder.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SessionGroups(NamedTuple):
    session_ids: np.ndarray  # [S] the distinct keys, in order of first appearance
    row_order: np.ndarray  # [N] row indices grouped by session (stable: input order inside a session)
    starts: np.ndarray  # [S] position in row_order of each session's first row
    counts: np.ndarray  # [S] rows per session


def group_by_first_appearance(keys: np.ndarray) -> SessionGroups:
    """Group the rows of `keys` ([N]) by key; sessions ordered by their first row, rows kept in input order."""
    uniq, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
    by_first = np.argsort(first_idx, kind="stable")  # sessions by first appearance
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[by_first] = np.arange(len(uniq))
    session = rank[inverse]  # [N] session rank of each row
    order = np.argsort(session, kind="stable")  # rows grouped by session, input order inside
    counts = np.bincount(session, minlength=len(uniq))  # rows per session, in rank order
    return SessionGroups(uniq[by_first], order, np.cumsum(counts) - counts, counts)
