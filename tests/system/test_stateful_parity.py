"""Issue 18, item 4: DIGINETICA's evaluation sessions replayed click by click through the stateful ensemble
give exactly the rankings of sending each prefix statelessly: every session of the evaluation window, every
click, 0 differences. The real recipe (item memory, timestamp-derived weekday_sin and age_days: the state
the server keeps is the raw item ids and timestamps, from which the workflow derives the features)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from clients import SessionRanker
from export.repository import ExportConfig, export_repository
from tests.stateful_util import differences, replay_clicks, sessions_of, stateless_prefix_rankings
from tests.triton_util import K, start_server
from training.data.splits import split_path
from training.names import INTERACTIONS_FILE, SESSION_COL
from training.schema import Schema

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.diginetica]


def test_diginetica_click_by_click_equals_stateless_prefixes(diginetica_data, diginetica_run, tmp_path):
    data, run = diginetica_data, diginetica_run
    schema = Schema.load(data)
    window = json.loads((run / "metrics.json").read_text())["windows"][-1]["eval_window"]
    ids = pd.read_parquet(split_path(data, window, "valid"), columns=[SESSION_COL])[SESSION_COL]
    sessions = sessions_of(pd.read_parquet(data / INTERACTIONS_FILE), dict(schema.raw_inputs), ids)
    assert len(sessions) == len(ids) > 100
    repo = export_repository(ExportConfig(run=run, data=data, out=tmp_path / "repo", top_k=K))
    server = start_server(repo, model_control="explicit")
    try:
        want = stateless_prefix_rankings(server.grpc_url, sessions)
        with SessionRanker(server.grpc_url) as ranker:
            got = replay_clicks(ranker, sessions, threads=4)
            stats = dict(ranker.stats)
    finally:
        assert server.stop() == 0, server.log_tail()
    bad, same = differences(got, want)
    longest = max(len(g) for g in sessions.values())
    assert bad == [], f"{len(bad)} of {len(want)} prefixes ranked differently, e.g. {bad[:5]}"
    assert stats["requests"] == len(want), stats  # one request per click: nothing was resent
    print(f"DIGINETICA window {window}: {len(sessions)} sessions, {len(want)} clicks (longest session "
          f"{longest}), stateful = stateless rankings for all ({same} with identical item ids, the others swap items tied to 1e-5)")  # fmt: skip
