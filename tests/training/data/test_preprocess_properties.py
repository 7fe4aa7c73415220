"""Property-based tests (hypothesis) of the preprocessing function: ServingTransform and export.sessrec_steps.preprocess.

Any generated batch of interactions either transforms to tensors that satisfy
the model's contract (docs/contracts.md "Serving transform"):
- `session_id` [S] int64 in order of first appearance,
- every list feature [S, L] (categorical int64 with ids in [0, cardinality),
  continuous float32, finite), right-padded: positions >= lengths are exactly 0,
- `lengths` [S] int64 = min(rows of the session, L), in [1, L],
- the item ids are the last <= L interactions of the session in row order,
  encoded through the fitted vocabulary (unknown ids -> OOV),
or raises the documented error (`training.data.serving_transform.InputError`, a ValueError,
naming the column; export.sessrec_steps.RequestError for the per-request limits) —
never anything else. Batches built to be valid must transform; batches with a
planted defect must raise.

No server. max_examples is kept modest: CI has 2 cores.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export.sessrec_steps import RequestError, preprocess
from training.data.serving_transform import InputError, ServingTransform
from training.names import FIRST_REAL_ID, ITEM_LIST, LENGTHS_TENSOR, OOV_ID, OUT_SESSION_ID, SESSION_COL

INT64_MAX = np.iinfo(np.int64).max
SETTINGS = dict(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def transform(tiny_synthetic_data) -> ServingTransform:
    return ServingTransform.load(tiny_synthetic_data)


@pytest.fixture(scope="module")
def known_items(transform) -> np.ndarray:
    vocab = transform.item_vocabulary()
    return vocab[vocab >= 0]


# --- strategies ----------------------------------------------------------------------------
# Raw ids: mostly small (some seen by the workflow), some huge, some the int64 extremes.
ids = st.one_of(
    st.integers(0, 400),
    st.integers(0, INT64_MAX),
    st.sampled_from([0, 1, 2, 3, INT64_MAX, INT64_MAX - 1]),
)
finite_floats = st.floats(
    min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32
)


@st.composite
def valid_batches(draw, max_rows: int = 80) -> dict[str, np.ndarray]:
    """Interaction rows as a client sends them (raw_inputs dtypes), sessions interleaved in any order."""
    n = draw(st.integers(1, max_rows))
    pool = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    sessions = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    items = draw(st.lists(ids, min_size=n, max_size=n))
    return {
        "session_id": np.array(sessions, dtype=np.int64),
        "item_id": np.array(items, dtype=np.int64),
        "category": np.array(draw(st.lists(ids, min_size=n, max_size=n)), dtype=np.int64),
        "age_days": np.array(draw(st.lists(finite_floats, min_size=n, max_size=n)), dtype=np.float32),
        "weekday_sin": np.array(draw(st.lists(finite_floats, min_size=n, max_size=n)), dtype=np.float32),
    }


@st.composite
def batches_with_known_items(draw, known: np.ndarray) -> dict[str, np.ndarray]:
    """Like valid_batches, with most item ids drawn from the fitted vocabulary (so the encoding is exercised)."""
    cols = draw(valid_batches())
    n = len(cols["item_id"])
    picks = draw(st.lists(st.integers(0, len(known) - 1), min_size=n, max_size=n))
    use_known = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    cols["item_id"] = np.where(use_known, known[picks], cols["item_id"]).astype(np.int64)
    return cols


# A defect planted in a valid batch: (name, column it concerns, edit). Each must give InputError naming the column.
def _set(col, value, dtype=None):
    def edit(cols, row):
        arr = cols[col].astype(dtype) if dtype else cols[col].copy()
        arr[row % len(arr)] = value
        cols[col] = arr
        return cols

    return edit


def _as(col, dtype):
    def edit(cols, row):
        cols[col] = cols[col].astype(dtype)
        return cols

    return edit


def _drop(col):
    def edit(cols, row):
        del cols[col]
        return cols

    return edit


def _shorter(col):
    def edit(cols, row):
        cols[col] = cols[col][:-1] if len(cols[col]) > 1 else np.concatenate([cols[col], cols[col]])
        return cols

    return edit


def _rank(col, shape):
    def edit(cols, row):
        cols[col] = cols[col].reshape(shape(len(cols[col])))
        return cols

    return edit


DEFECTS = [
    ("negative item id", "item_id", _set("item_id", -1)),
    ("negative category", "category", _set("category", -7)),
    ("negative session id", "session_id", _set("session_id", -(2**62))),
    ("uint64 beyond int64", "item_id", _set("item_id", 2**63 + 5, np.uint64)),
    ("NaN continuous", "age_days", _set("age_days", np.nan)),
    ("+inf continuous", "weekday_sin", _set("weekday_sin", np.inf)),
    ("-inf continuous", "age_days", _set("age_days", -np.inf)),
    ("float64 overflowing float32", "weekday_sin", _set("weekday_sin", 1e300, np.float64)),
    ("NaN id as float", "item_id", _set("item_id", np.nan, np.float64)),
    ("fractional id", "category", _set("category", 2.5, np.float64)),
    ("float id beyond int64", "session_id", _set("session_id", 1e19, np.float64)),
    ("bool ids", "session_id", _as("session_id", bool)),
    ("string ids", "item_id", _as("item_id", str)),
    ("object continuous", "age_days", _as("age_days", object)),
    ("missing column", "category", _drop("category")),
    ("column of another length", "weekday_sin", _shorter("weekday_sin")),
    ("2-D column", "item_id", _rank("item_id", lambda n: (1, n) if n > 1 else (1, 1, 1))),
    ("scalar column", "session_id", lambda cols, row: {**cols, "session_id": np.int64(3)}),
]


def reference(cols: dict[str, np.ndarray], known: np.ndarray, vocab: np.ndarray, max_len: int):
    """Session ids (first appearance), lengths and encoded item lists, by plain Python loops."""
    encode = {int(raw): enc for enc, raw in enumerate(vocab.tolist()) if raw >= 0}
    order, rows = [], {}
    for i, s in enumerate(cols[SESSION_COL].tolist()):
        if s not in rows:
            order.append(s)
            rows[s] = []
        rows[s].append(i)
    items = {s: [encode.get(int(cols["item_id"][i]), OOV_ID) for i in r[-max_len:]] for s, r in rows.items()}
    return order, {s: min(len(r), max_len) for s, r in rows.items()}, items, rows


def assert_contract(
    out: dict, cols: dict, transform: ServingTransform, lengths_key: str = LENGTHS_TENSOR
) -> None:
    L = transform.max_len
    vocab = transform.item_vocabulary()
    order, lengths, items, rows = reference(cols, None, vocab, L)
    S = len(order)
    sid_key = OUT_SESSION_ID if OUT_SESSION_ID in out else SESSION_COL
    assert out[sid_key].dtype == np.int64 and out[sid_key].tolist() == order
    got_len = out[lengths_key].reshape(-1)
    assert out[lengths_key].dtype == np.int64 and got_len.tolist() == [lengths[s] for s in order]
    assert ((got_len >= 1) & (got_len <= L)).all()
    pad = np.arange(L)[None, :] >= got_len[:, None]  # [S, L]
    for name, card in transform.categorical.items():
        a = out[name]
        assert a.shape == (S, L) and a.dtype == np.int64, name
        assert (a[pad] == 0).all(), f"{name}: padding is not exactly 0"
        assert ((a >= 0) & (a < card)).all(), f"{name}: ids outside [0, {card})"
        assert (a[~pad] >= OOV_ID).all(), f"{name}: a real position holds a pad/null id"
    for name in transform.continuous:
        a = out[name]
        assert a.shape == (S, L) and a.dtype == np.float32, name
        assert np.isfinite(a).all() and (a[pad] == 0).all(), name
    raw_col = {f"{c}-list": c for c in ("age_days", "weekday_sin")}
    for i, s in enumerate(order):
        n = lengths[s]
        assert out[ITEM_LIST][i, :n].tolist() == items[s], f"session {s}: item ids"
        for name in transform.continuous:
            want = cols[raw_col[name]][rows[s][-L:]].astype(np.float32)
            np.testing.assert_array_equal(out[name][i, :n], want, err_msg=f"session {s}: {name}")
        assert (out[ITEM_LIST][i, :n] >= FIRST_REAL_ID).sum() == sum(
            1 for x in items[s] if x >= FIRST_REAL_ID
        )


# --- ServingTransform ------------------------------------------------------------------------
@settings(**SETTINGS)
@given(data=st.data())
def test_valid_batches_satisfy_the_contract(transform, known_items, data):
    cols = data.draw(batches_with_known_items(known_items))
    out = transform(cols)
    assert_contract(out, cols, transform)


@settings(**SETTINGS)
@given(cols=valid_batches(max_rows=30), defect=st.sampled_from(DEFECTS), row=st.integers(0, 1000))
def test_a_planted_defect_raises_input_error_naming_the_column(transform, cols, defect, row):
    _, column, edit = defect
    bad = edit(dict(cols), row)
    with pytest.raises(InputError) as info:
        transform(bad)
    assert f"'{column}'" in str(info.value), (defect[0], str(info.value))


@settings(**SETTINGS)
@given(data=st.data())
def test_any_batch_transforms_or_raises_input_error(transform, known_items, data):
    """Valid, defective or oddly typed (castable dtypes, [N, 1] columns, extra columns): never another exception."""
    cols = data.draw(batches_with_known_items(known_items))
    if data.draw(st.booleans()):
        defect = data.draw(st.sampled_from(DEFECTS))
        cols = defect[2](cols, data.draw(st.integers(0, 1000)))
    if data.draw(st.booleans()) and "item_id" in cols and cols["item_id"].ndim == 1:
        cols["item_id"] = cols["item_id"].reshape(-1, 1)  # [N, 1] is accepted
    if data.draw(st.booleans()):
        cols["extra"] = np.zeros(3)  # extra columns are ignored
    if data.draw(st.booleans()) and "category" in cols and cols["category"].dtype == np.int64:
        if cols["category"].size and cols["category"].max() < 2**31:
            cols["category"] = cols["category"].astype(np.int32)  # safely castable
    try:
        out = transform(cols)
    except InputError as e:
        assert re.search(r"'(session_id|item_id|category|age_days|weekday_sin)'", str(e)), str(e)
        return
    flat = {
        k: (v.reshape(-1) if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[1] == 1 else v)
        for k, v in cols.items()
    }
    assert_contract(out, {k: np.asarray(v) for k, v in flat.items()}, transform)


# --- export.sessrec_steps.preprocess (what the preprocess step runs per request) ---------------------------
@settings(**SETTINGS)
@given(data=st.data(), max_rows=st.integers(1, 60), max_sessions=st.integers(1, 8))
def test_preprocess_step_contract_or_request_error(transform, known_items, data, max_rows, max_sessions):
    """Triton delivers the declared dtypes and rank; values and sizes are the client's."""
    cols = data.draw(batches_with_known_items(known_items))
    if data.draw(st.booleans()):
        name, _, edit = data.draw(
            st.sampled_from(
                [
                    d
                    for d in DEFECTS
                    if d[0]
                    in {
                        "negative item id",
                        "negative category",
                        "negative session id",
                        "NaN continuous",
                        "+inf continuous",
                        "-inf continuous",
                        "column of another length",
                    }
                ]
            )
        )
        cols = edit(cols, data.draw(st.integers(0, 1000)))
    if data.draw(st.integers(0, 9)) == 0:
        cols = {k: v[:0] for k, v in cols.items()}  # 0 rows
    features = [*transform.categorical, *transform.continuous]
    try:
        out = preprocess(
            cols, transform, features, max_rows, max_sessions, SESSION_COL, OUT_SESSION_ID, LENGTHS_TENSOR
        )
    except (RequestError, InputError) as e:
        assert re.search(r"'(session_id|item_id|category|age_days|weekday_sin)'", str(e)), str(e)
        n = {len(v) for v in cols.values()}
        if len(n) == 1 and 0 < n.pop() <= max_rows and isinstance(e, RequestError):
            assert "sessions" in str(e) and len(set(cols[SESSION_COL].tolist())) > max_sessions
        return
    assert len(cols[SESSION_COL]) <= max_rows and len(out[OUT_SESSION_ID]) <= max_sessions
    assert out[LENGTHS_TENSOR].shape == (len(out[OUT_SESSION_ID]), 1)
    assert all(out[f].flags.c_contiguous for f in features)
    assert_contract(out, cols, transform)
