"""Rows -> sessions, in order of first appearance: the one implementation.

    g = group_by_first_appearance(session_ids)    # session_ids: [N] one key per row
    g.session_ids                                 # [S] keys, in order of first appearance
    rows = g.row_order[g.starts[s] : g.starts[s] + g.counts[s]]   # rows of session s, input order

Defined in `training.data.sessrec_transform` (numpy only; it is copied verbatim into the
served preprocess step) and re-exported here for the gRPC client (clients.plan_requests).
"""

from training.data.sessrec_transform import SessionGroups, group_by_first_appearance

__all__ = ["SessionGroups", "group_by_first_appearance"]
