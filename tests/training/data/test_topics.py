"""The topic-structured synthetic click log of `make demo` (training/data/topics.py): seeded, structured
as documented, and prepared like a real click log."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data.topics import ITEM_ID_BASE, TopicsConfig, generate, main, prepare_args, topic_of
from training.names import CATEGORY_COL, ITEM_COL, SESSION_COL, TIME_COL


def test_seeded_and_shaped_as_documented():
    cfg = TopicsConfig(sessions=400, seed=3)
    a, b = generate(cfg), generate(TopicsConfig(sessions=400, seed=3))
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(generate(TopicsConfig(sessions=400, seed=4)))
    assert list(a.columns) == [SESSION_COL, ITEM_COL, CATEGORY_COL, TIME_COL]
    assert all(a[c].dtype == np.int64 for c in a.columns)
    assert a[SESSION_COL].nunique() == 400 and a.groupby(SESSION_COL).size().min() >= 2
    assert np.array_equal(a[CATEGORY_COL], topic_of(a[ITEM_COL]))
    assert a[CATEGORY_COL].between(1, cfg.topics).all() and (a[ITEM_COL] % ITEM_ID_BASE < cfg.items_per_topic).all()
    assert (a.groupby(SESSION_COL)[TIME_COL].diff().dropna() > 0).all()  # clicks in time order


def test_sessions_follow_their_topic():
    """Consecutive clicks mostly stay in the topic, and the next item of the catalogue is the most
    frequent successor: what a session-aware model can learn and most popular cannot."""
    f = generate(TopicsConfig(sessions=2000, seed=0))
    same_session = f[SESSION_COL].to_numpy()[1:] == f[SESSION_COL].to_numpy()[:-1]
    item = f[ITEM_COL].to_numpy()
    same_topic = topic_of(item[1:]) == topic_of(item[:-1])
    nxt = item[1:] == item[:-1] + 1
    assert same_topic[same_session].mean() > 0.85
    assert 0.45 < nxt[same_session].mean() < 0.75


def test_bad_settings_are_refused():
    for bad in ({"sessions": 0}, {"mean_length": 1.5}, {"p_next": 1.5}, {"items_per_topic": ITEM_ID_BASE}):
        with pytest.raises(ValueError):
            generate(TopicsConfig(**bad))


def test_the_log_prepares_like_a_real_click_log(tmp_path):
    """Written by the command, then `training.prepare --input` with prepare_args: the category column and
    the timestamp (from which the workflow derives weekday_sin and age_days) are the raw inputs."""
    from training.data.prepare import prepare
    from training.prepare import config_from_args
    from training.schema import Schema

    log = tmp_path / "topics.parquet"
    assert main(["--out", str(log), "--sessions", "300", "--days", "3"]) == 0
    prepare(config_from_args([*prepare_args(log), "--out", str(tmp_path / "data"), "--quiet"]))
    schema = Schema.load(tmp_path / "data")
    assert list(schema.raw_inputs) == [SESSION_COL, ITEM_COL, CATEGORY_COL, TIME_COL]
    assert list(schema.windows) == [1, 2, 3]
