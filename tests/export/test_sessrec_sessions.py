"""The stateful step's session store (export/sessrec_sessions.py), without Triton: what a session holds,
START/END, the idle timeout, the LRU cap, bad clicks, memory; and that the kept rows transform exactly
like the whole session (the synthetic workflow and DIGINETICA's timestamp-derived one)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from export.sessrec_sessions import RESEND, SessionNotHeld, SessionStore
from training.names import INTERACTIONS_FILE, RESEND_WITH_START, SESSION_COL

COLS = {"item_id": "int64", "age_days": "float32"}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def click(*items: int) -> dict[str, np.ndarray]:
    return {"item_id": np.array(items, dtype=np.int64), "age_days": np.array(items, dtype=np.float32) / 10}


def store(max_sessions=3, max_len=4, idle=60.0, clock=None) -> SessionStore:
    return SessionStore(COLS, max_len=max_len, max_sessions=max_sessions, idle_timeout_s=idle, clock=clock or Clock())


def test_clicks_accumulate_and_keep_the_last_max_len():
    s = store()
    cols, clicks, _ = s.update(7, click(1), start=True)
    assert cols["item_id"].tolist() == [1] and clicks == 1
    s.update(7, click(2, 3), start=False)
    cols, clicks, _ = s.update(7, click(4, 5), start=False)
    assert cols["item_id"].tolist() == [2, 3, 4, 5] and clicks == 5
    assert cols["age_days"].dtype == np.float32 and np.allclose(cols["age_days"], [0.2, 0.3, 0.4, 0.5])
    assert s.held(7)["item_id"].tolist() == [2, 3, 4, 5]
    cols, clicks, _ = s.update(7, click(*range(10, 20)), start=False)  # more rows than max_len at once
    assert cols["item_id"].tolist() == [16, 17, 18, 19] and clicks == 15


def test_start_resets_and_end_forgets():
    s = store()
    s.update(7, click(1, 2), start=True)
    cols, clicks, _ = s.update(7, click(9), start=True)
    assert cols["item_id"].tolist() == [9] and clicks == 1
    assert s.end(7) and 7 not in s and not s.end(7)


@pytest.mark.parametrize("key", [8, "visitor-8"])
def test_a_click_for_a_session_not_held_says_resend_with_start(key):
    s = store()
    with pytest.raises(SessionNotHeld, match=RESEND) as e:
        s.update(key, click(1), start=False)
    assert RESEND_WITH_START in str(e.value) and isinstance(e.value, ValueError)
    assert len(s) == 0


def test_sessions_never_mix():
    s = store(max_sessions=10)
    s.update(1, click(1), start=True)
    s.update("1", click(100), start=True)  # an int and a str id are different sessions
    s.update(2, click(2), start=True)
    s.update(1, click(11), start=False)
    s.update(2, click(22), start=False)
    assert s.held(1)["item_id"].tolist() == [1, 11]
    assert s.held(2)["item_id"].tolist() == [2, 22]
    assert s.held("1")["item_id"].tolist() == [100]


def test_idle_sessions_are_evicted_without_an_end():
    clock = Clock()
    s = store(idle=60.0, clock=clock)
    s.update(1, click(1), start=True)
    clock.t += 30
    s.update(2, click(2), start=True)
    clock.t += 31  # session 1 idle 61 s, session 2 idle 31 s
    s.update(3, click(3), start=True)
    assert 1 not in s and 2 in s and 3 in s and s.evicted_idle == 1
    with pytest.raises(SessionNotHeld):
        s.update(1, click(4), start=False)
    clock.t += 29  # session 2 idle 60 s: not more than the timeout
    s.update(2, click(5), start=False)
    assert s.held(2)["item_id"].tolist() == [2, 5]


def test_the_least_recently_used_session_goes_at_the_cap():
    s = store(max_sessions=3)
    for key in (1, 2, 3):
        s.update(key, click(key), start=True)
    s.update(1, click(11), start=False)  # 1 is now the most recent; 2 the least
    s.update(4, click(4), start=True)
    assert sorted(s.slots) == [1, 3, 4] and s.evicted_lru == 1 and len(s) == 3
    assert s.held(4)["item_id"].tolist() == [4]  # the freed slot holds nothing of session 2
    with pytest.raises(SessionNotHeld):
        s.update(2, click(2), start=False)


def test_a_bad_click_leaves_the_session_as_it_was():
    s = store()
    s.update(7, click(1, 2), start=True)

    def refuse(columns):
        raise ValueError("column 'age_days' has value nan")

    for start in (False, True):
        with pytest.raises(ValueError, match="nan"):
            s.update(7, click(3), start=start, check=refuse)
        assert s.held(7)["item_id"].tolist() == [1, 2]
        with pytest.raises(ValueError, match="nan"):  # more rows than fit: the shifted copy is not kept either
            s.update(7, click(*range(30, 36)), start=start, check=refuse)
        assert s.held(7)["item_id"].tolist() == [1, 2] and s.held(7)["age_days"].tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError):
        s.update(8, click(3), start=True, check=refuse)
    assert 8 not in s
    _, clicks, out = s.update(7, click(3), start=False, check=lambda c: c["item_id"].sum())
    assert out == 6 and clicks == 3


def test_memory_is_preallocated_lazily_and_stated():
    s = SessionStore(COLS, max_len=20, max_sessions=1000, idle_timeout_s=1.0)
    assert s.bytes_per_session() == 20 * (8 + 4) + 4 + 8 + 8
    assert {k: v.shape for k, v in s.rows.items()} == {"item_id": (1000, 20), "age_days": (1000, 20)}


# --- the kept rows transform like the whole session ------------------------------------------------
def _replay_through_store(data, limit_sessions: int) -> tuple[int, int]:
    """Every prefix of the first `limit_sessions` sessions: the store's rows through the compiled workflow
    vs the whole prefix through it. Returns (prefixes, differing prefixes)."""
    from export.sessrec_steps import preprocess
    from training.data.serving_transform import ServingTransform

    t = ServingTransform.load(data).compiled
    features = [*t.categorical, *t.continuous]
    rows = pd.read_parquet(data / INTERACTIONS_FILE)
    raw = [c for c in t.raw_inputs if c != t.session_col]
    s = SessionStore({c: t.raw_inputs[c] for c in raw}, max_len=t.max_len, max_sessions=64, idle_timeout_s=60.0)

    def run(columns):
        cols = dict(columns, **{t.session_col: np.zeros(len(columns[raw[0]]), dtype=np.int64)})
        return preprocess(cols, t, features, 10_000, 1, t.session_col, t.session_col, t.lengths_name)

    n = bad = 0
    for sid, g in list(rows.groupby(SESSION_COL, sort=False))[:limit_sessions]:
        for j in range(len(g)):
            new = {c: g[c].to_numpy()[j : j + 1].astype(t.raw_inputs[c]) for c in raw}
            _, clicks, got = s.update(sid, new, start=j == 0, check=run)
            whole = run({c: g[c].to_numpy()[: j + 1].astype(t.raw_inputs[c]) for c in raw})
            n += 1
            bad += clicks != j + 1 or any(not np.array_equal(got[f], whole[f]) for f in [*features, t.lengths_name])
    return n, bad


def test_kept_rows_transform_like_the_whole_session(tiny_synthetic_data):
    n, bad = _replay_through_store(tiny_synthetic_data, 200)
    assert n > 500 and bad == 0


@pytest.mark.diginetica
def test_kept_rows_transform_like_the_whole_session_on_diginetica(diginetica_data):
    """Timestamp-derived weekday_sin and age_days (ItemFirstSeen), sessions longer than max_len."""
    n, bad = _replay_through_store(diginetica_data, 300)
    assert n > 1000 and bad == 0
