"""The reference example's synthetic click log (Transformers4Rec
getting-started-session-based, notebook 01, cell 9), seeded.

    item_id     = clip(int32(lognormal(3, 1)), 1, 50000)          long tail
    session_id  = uniform integer in [70000, 70000 + num_sessions)
    category    = equal-width bin of item_id into 334 bins, labels 1..334 (pd.cut)
    age_days, weekday_sin = uniform(0, 1) float32
    day         = per session, uniform in 1..9

Draws come from `np.random.RandomState(seed)` in the reference's order, so with the
default sizes (100,000 rows, 20,000 session ids) seed S reproduces the reference run
`np.random.seed(S)` exactly. `num_sessions` defaults to num_rows / 5 (about five
rows per session id, as in the reference) so that other sizes keep realistic sessions.

Rows are returned grouped by session (a stable sort, so each session keeps its
generation order, which plays the role of time order; the reference groups the
unsorted frame, which gives the same lists).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.names import AGE_COL, CATEGORY_COL, ITEM_COL, SESSION_COL, WEEKDAY_COL, WINDOW_COL

REFERENCE_ROWS = 100_000
FIRST_SESSION_ID = 70_000
ROWS_PER_SESSION_ID = 5  # reference: 100,000 rows over 20,000 session ids
MAX_ITEM_ID = 50_000
NUM_CATEGORIES = 334
NUM_DAYS = 9
CONTINUOUS = (AGE_COL, WEEKDAY_COL)


def generate(num_rows: int = REFERENCE_ROWS, seed: int = 0, num_sessions: int | None = None) -> pd.DataFrame:
    """Columns session_id, item_id, category (int64), age_days, weekday_sin (float32),
    day (int64), grouped by session in generation order."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if num_sessions is None:
        num_sessions = max(1, num_rows // ROWS_PER_SESSION_ID)
    if num_sessions < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
    rng = np.random.RandomState(seed)
    item = np.clip(rng.lognormal(3.0, 1.0, num_rows).astype(np.int32), 1, MAX_ITEM_ID)
    session = rng.randint(FIRST_SESSION_ID, FIRST_SESSION_ID + num_sessions, num_rows)
    if item.min() == item.max():  # pd.cut needs a range; one bin value then
        category = np.ones(num_rows, dtype=np.int64)
    else:
        category = pd.cut(item, bins=NUM_CATEGORIES, labels=np.arange(1, NUM_CATEGORIES + 1)).astype(np.int64)
    age = rng.uniform(0, 1, num_rows).astype(np.float32)
    weekday = rng.uniform(0, 1, num_rows).astype(np.float32)
    codes, uniques = pd.factorize(session)  # codes in order of first appearance, like .unique()
    day_of_session = rng.randint(1, NUM_DAYS + 1, size=len(uniques))
    frame = pd.DataFrame(
        {
            SESSION_COL: session.astype(np.int64),
            ITEM_COL: item.astype(np.int64),
            CATEGORY_COL: np.asarray(category, dtype=np.int64),
            AGE_COL: age,
            WEEKDAY_COL: weekday,
            WINDOW_COL: day_of_session[codes].astype(np.int64),
        }
    )
    order = np.argsort(frame[SESSION_COL].to_numpy(), kind="stable")
    return frame.take(order).reset_index(drop=True)
