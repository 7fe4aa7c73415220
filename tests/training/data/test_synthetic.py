"""The synthetic generator reproduces the reference example and its statistics."""

import math

import numpy as np
import pandas as pd
import pytest

from training.data import synthetic
from training.names import AGE_COL, CATEGORY_COL, ITEM_COL, SESSION_COL, WEEKDAY_COL, WINDOW_COL


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return synthetic.generate(100_000, seed=0)


def reference_notebook_frame(num_rows: int, seed: int) -> pd.DataFrame:
    """Transformers4Rec getting-started 01-ETL cell 9, seeded (draw order as in the notebook)."""
    rs = np.random.RandomState(seed)
    item = np.clip(rs.lognormal(3.0, 1.0, num_rows).astype(np.int32), 1, 50000)
    df = pd.DataFrame(rs.randint(70000, 90000, num_rows), columns=["session_id"])
    df["item_id"] = item
    df["category"] = pd.cut(df["item_id"], bins=334, labels=np.arange(1, 335)).astype(np.int32)
    df["age_days"] = rs.uniform(0, 1, num_rows).astype(np.float32)
    df["weekday_sin"] = rs.uniform(0, 1, num_rows).astype(np.float32)
    map_day = dict(zip(df.session_id.unique(), rs.randint(1, 10, size=df.session_id.nunique())))
    df["day"] = df.session_id.map(map_day)
    return df


def test_reproduces_the_reference_notebook_draws(log):
    ref = reference_notebook_frame(100_000, seed=0)
    ref = ref.iloc[np.argsort(ref["session_id"].to_numpy(), kind="stable")].reset_index(drop=True)
    for col in log.columns:
        np.testing.assert_array_equal(log[col].to_numpy(), ref[col].to_numpy(), err_msg=col)


def test_columns_and_dtypes(log):
    assert list(log.columns) == [SESSION_COL, ITEM_COL, CATEGORY_COL, AGE_COL, WEEKDAY_COL, WINDOW_COL]
    assert [str(t) for t in log.dtypes] == ["int64", "int64", "int64", "float32", "float32", "int64"]
    assert len(log) == 100_000


def test_value_ranges(log):
    assert log[SESSION_COL].between(70_000, 89_999).all()
    assert log[ITEM_COL].between(1, 50_000).all()
    assert log[CATEGORY_COL].between(1, 334).all()
    assert log[WINDOW_COL].between(1, 9).all()
    assert set(log[WINDOW_COL]) == set(range(1, 10))
    for c in (AGE_COL, WEEKDAY_COL):
        assert ((log[c] >= 0) & (log[c] < 1)).all()
        assert abs(log[c].mean() - 0.5) < 0.01


def test_long_tailed_items_and_binned_categories(log):
    # int(lognormal(3, 1)): median exp(3) ~ 20 before truncation, heavy right tail
    assert 18 <= log[ITEM_COL].median() <= 20
    assert log[ITEM_COL].max() > 1_000
    # category = equal-width bin of the item id: monotone in the item id, bin 1 for small ids
    by_item = log.groupby(ITEM_COL)[CATEGORY_COL].agg(["min", "max"])
    assert (by_item["min"] == by_item["max"]).all()
    assert by_item["min"].is_monotonic_increasing
    assert by_item["min"].iloc[0] == 1 and by_item["min"].iloc[-1] == 334


def test_session_statistics(log):
    sizes = log.groupby(SESSION_COL).size()
    lam = 100_000 / 20_000  # Poisson(5) rows per session id
    expected_sessions = 20_000 * (1 - math.exp(-lam))
    assert abs(len(sizes) - expected_sessions) < 150
    assert abs(sizes.mean() - lam / (1 - math.exp(-lam))) < 0.05
    # length distribution: zero-truncated Poisson(5)
    for k in (1, 2, 5, 10):
        p = math.exp(-lam) * lam**k / math.factorial(k) / (1 - math.exp(-lam))
        assert abs((sizes == k).mean() - p) < 0.01, k
    kept = (sizes >= 2).sum()  # sessions the workflow keeps
    assert 19_000 < kept < 19_400


def test_day_is_per_session_and_uniform(log):
    days = log.groupby(SESSION_COL)[WINDOW_COL].agg(["min", "max"])
    assert (days["min"] == days["max"]).all()
    share = days["min"].value_counts(normalize=True)
    assert (abs(share - 1 / 9) < 0.01).all()


def test_sessions_are_contiguous_in_generation_order():
    log = synthetic.generate(5_000, seed=3)
    sid = log[SESSION_COL].to_numpy()
    assert (np.diff(sid) >= 0).all()
    # inside a session the rows keep their generation order (stable sort of the raw draws)
    rs = np.random.RandomState(3)
    items = np.clip(rs.lognormal(3.0, 1.0, 5_000).astype(np.int32), 1, 50_000)
    sessions = rs.randint(70_000, 71_000, 5_000)
    for s in np.unique(sessions)[:50]:
        np.testing.assert_array_equal(
            log.loc[log[SESSION_COL] == s, ITEM_COL].to_numpy(), items[sessions == s]
        )


def test_seeded():
    a, b, c = synthetic.generate(2_000, 7), synthetic.generate(2_000, 7), synthetic.generate(2_000, 8)
    pd.testing.assert_frame_equal(a, b)
    assert not a[ITEM_COL].equals(c[ITEM_COL])


@pytest.mark.parametrize("rows, sessions", [(3_000, None), (1_000, 50)])
def test_num_sessions_scales_with_rows(rows, sessions):
    log = synthetic.generate(rows, 0, num_sessions=sessions)
    n_ids = sessions or rows // 5
    assert log[SESSION_COL].between(70_000, 70_000 + n_ids - 1).all()
    assert abs(log.groupby(SESSION_COL).size().mean() - rows / n_ids) < 0.2 * rows / n_ids + 0.2


@pytest.mark.parametrize("kwargs", [{"num_rows": 0}, {"num_rows": 10, "num_sessions": 0}])
def test_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="must be >= 1"):
        synthetic.generate(**kwargs)
