"""export/sessrec_steps.py: the step functions the preprocess, model and postprocess steps run (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from export.sessrec_steps import (
    RequestError,
    check_raw_columns,
    concat_requests,
    preprocess,
    split_rows,
    to_raw_item_ids,
)
from training.names import (
    FIRST_REAL_ID,
    LENGTHS_TENSOR,
    OUT_ENCODED_IDS,
    OUT_SESSION_ID,
    SESSION_COL,
)


# --- step functions -----------------------------------------------------------------
def _columns(n_rows: int = 3) -> dict[str, np.ndarray]:
    return {"session_id": np.array([5, 5, 9][:n_rows], dtype=np.int64), "item_id": np.arange(n_rows, dtype=np.int64)}


@pytest.mark.parametrize(
    "columns, match",
    [
        ({"session_id": np.zeros(0, np.int64), "item_id": np.zeros(0, np.int64)}, "'session_id' has 0 rows"),
        ({"session_id": np.zeros(3, np.int64), "item_id": np.zeros(2, np.int64)}, "'item_id' has 2 rows"),
        ({"session_id": np.zeros(11, np.int64), "item_id": np.zeros(11, np.int64)}, "maximum of 10"),
    ],
    ids=["zero-rows", "length-mismatch", "too-many-rows"],
)
def test_check_raw_columns_rejects(columns, match):
    with pytest.raises(RequestError, match=match):
        check_raw_columns(columns, list(columns), max_rows=10)


STEP_NAMES = (SESSION_COL, OUT_SESSION_ID, LENGTHS_TENSOR)


def _fake_transform(columns):
    sessions, first = np.unique(columns["session_id"], return_index=True)
    sessions = sessions[np.argsort(first)]
    return {
        SESSION_COL: sessions,
        "item_id-list": np.ones((len(sessions), 4), np.int64),
        LENGTHS_TENSOR: np.ones(len(sessions), np.int64),
    }


def test_preprocess_shapes_and_session_limit():
    out = preprocess(_columns(), _fake_transform, ["item_id-list"], 10, 2, *STEP_NAMES)
    assert out[OUT_SESSION_ID].tolist() == [5, 9]
    assert out[LENGTHS_TENSOR].shape == (2, 1)
    with pytest.raises(RequestError, match="'session_id' holds 2 sessions, more than .* maximum of 1"):
        preprocess(_columns(), _fake_transform, ["item_id-list"], 10, 1, *STEP_NAMES)


def test_concat_and_split_round_trip():
    reqs = [[np.full((n, 3), n), np.arange(n)] for n in (1, 4, 2)]
    batch, sizes = concat_requests(reqs)
    assert sizes == [1, 4, 2] and batch[0].shape == (7, 3)
    parts = split_rows(batch, sizes)
    for req, part in zip(reqs, parts):
        for a, b in zip(req, part):
            np.testing.assert_array_equal(a, b)
    single, _ = concat_requests(reqs[:1])
    assert single[0].flags.writeable


def test_to_raw_item_ids():
    vocab = np.array([-1, -1, -1, 100, 200, 300])
    np.testing.assert_array_equal(to_raw_item_ids(vocab, np.array([[5, 3]]), FIRST_REAL_ID, OUT_ENCODED_IDS), [[300, 100]])
    for bad in (2, 6):
        with pytest.raises(RequestError, match=f"input '{OUT_ENCODED_IDS}': encoded item ids must be in"):
            to_raw_item_ids(vocab, np.array([[bad]]), FIRST_REAL_ID, OUT_ENCODED_IDS)
