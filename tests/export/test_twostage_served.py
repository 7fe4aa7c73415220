"""A real tritonserver serves a two-stage model (issue 19): exported, served, and equal to the
in-process two-stage ranking on every validation session.

The serving artifacts' run (item memory on) is copied with rank "two_stage" and a candidate set
smaller than the catalogue (rank_popular 20, lists of 16, 2 probed, 10 kept, the last item's
co-occurrence list), so the served top 20 is really two-stage: it differs from the exact
ranking for some sessions, and the export bakes the IVF index into model.pt.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from clients import rank_sessions
from export.inference import TopKRanker, feature_order
from export.repository import export_repository
from tests.export.test_serving import validation_sessions
from tests.triton_util import MAX_SESSIONS, K, running_server, served_config
from training.checkpoint import META_FILE, load_run
from training.names import ITEM_LIST, POSTPROCESS_MODEL, SESSION_COL

pytestmark = pytest.mark.triton

TWO_STAGE = dict(
    rank="two_stage", rank_popular=20, ivf_list_size=16, ivf_probe=2, ivf_keep=10, rank_context=1
)


def test_tritonserver_serves_a_two_stage_model(artifacts, schema, interactions, tmp_path):
    data, run = artifacts
    two = tmp_path / "run"
    shutil.copytree(run, two)
    meta = json.loads((two / META_FILE).read_text())
    meta["model_config"].update(TWO_STAGE)
    (two / META_FILE).write_text(json.dumps(meta))
    model, _ = load_run(two)
    assert model.cfg.rank == "two_stage"

    sids, inputs = validation_sessions(data, schema)
    n_items = schema["categorical"][ITEM_LIST]
    ranker = TopKRanker(model, feature_order(schema), K, n_items)
    exact, _ = load_run(run)
    with torch.inference_mode():
        want_scores, want_encoded = ranker(*inputs)
        exact_encoded = TopKRanker(exact, feature_order(schema), K, n_items)(*inputs)[1]
    assert model._rank_sizes[2] == 10 and model.ivf_members.numel() > 0  # an IVF index was built
    assert (want_encoded != exact_encoded).any(), "the candidate set covers the catalogue: not two-stage"

    repo = export_repository(served_config(two, data, tmp_path / "model_repository"))
    vocab = np.load(repo / POSTPROCESS_MODEL / "1" / "item_vocabulary.npy")
    rows = interactions[interactions[SESSION_COL].isin(set(sids.tolist()))]
    with running_server(repo) as server:
        ranked = rank_sessions(server.grpc_url, rows, batch_sessions=MAX_SESSIONS, concurrency=2)
    order = pd.Index(ranked.session_id).get_indexer(sids)
    assert (order >= 0).all()
    np.testing.assert_array_equal(ranked.item_ids[order], vocab[want_encoded.numpy()])
    np.testing.assert_allclose(ranked.scores[order], want_scores.numpy(), atol=1e-5, rtol=0)
