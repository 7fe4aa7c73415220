"""export/inference.py: the traced inference module (TopKRanker, trace_ranker, save_traced), on the CPU and
on a GPU (no server)."""

from __future__ import annotations

import pytest
import torch
from tritonclient.grpc import model_config_pb2

from export.inference import (
    TopKRanker,
    baked_devices,
    example_inputs,
    feature_order,
    save_traced,
    trace_ranker,
)
from export.repository import ExportConfig, export_repository
from tests.triton_util import parse_config
from training.checkpoint import load_run
from training.names import (
    FIRST_REAL_ID,
    ITEM_LIST,
    OOV_ID,
    TORCH_MODEL,
)

K = 10


@pytest.fixture(scope="module")
def ranker(artifacts, schema):
    model, _ = load_run(artifacts[1])
    return TopKRanker(model, feature_order(schema), K, schema["categorical"][ITEM_LIST],
                      schema["categorical"], schema["max_sequence_length"])  # fmt: skip


@pytest.fixture(scope="module")
def traced_file(ranker, schema, tmp_path_factory):
    traced = trace_ranker(ranker, example_inputs(schema, batch=8))
    return save_traced(traced, tmp_path_factory.mktemp("traced") / "model.pt")


def sessions_of_every_length(schema: dict, repeat: int = 1) -> tuple[torch.Tensor, ...]:
    """One session of each length 1..L (times `repeat`), real ids, zero padding."""
    L = int(schema["max_sequence_length"])
    x = example_inputs(schema, batch=L * repeat)
    lengths = torch.tensor([1 + i % L for i in range(L * repeat)])
    real = torch.arange(L)[None, :] < lengths[:, None]
    feats = [torch.where(real, t, torch.zeros((), dtype=t.dtype)) for t in x[:-1]]
    return (*feats, lengths)


# --- inference module ------------------------------------------------------------
def test_served_run_has_the_item_memory_in_its_trace(artifacts, traced_file):
    """The serving artifacts are trained with the item memory (the real-data recipe's model):
    its count tables are filled and travel inside the traced model."""
    model, meta = load_run(artifacts[1])
    assert meta["model_config"]["memory"] is True
    assert model.item_memory.cooc_val.sum() > 0 and model.item_memory.pop.sum() > 0
    traced = torch.jit.load(str(traced_file))
    buffers = dict(traced.named_buffers())
    name = next(k for k in buffers if k.endswith("item_memory.cooc_val"))
    assert torch.equal(buffers[name], model.item_memory.cooc_val)


@pytest.mark.parametrize("batch_repeat", [1, 3], ids=["20-sessions", "60-sessions"])
def test_traced_matches_eager_for_every_length(ranker, traced_file, schema, batch_repeat):
    traced = torch.jit.load(str(traced_file))
    inputs = sessions_of_every_length(schema, batch_repeat)  # traced with batch 8: other batch sizes here
    with torch.inference_mode():
        want_scores, want_ids = ranker(*inputs)
        got_scores, got_ids = traced(*inputs)
    assert got_ids.dtype == torch.int64 and got_scores.dtype == torch.float32
    assert got_ids.shape == got_scores.shape == (len(inputs[-1]), K)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-5, rtol=0)
    assert (got_ids >= FIRST_REAL_ID).all(), "a special id (pad/null/OOV) was ranked"
    assert (got_ids < schema["categorical"][ITEM_LIST]).all()
    assert (got_scores[:, :-1] >= got_scores[:, 1:]).all(), "scores are not sorted best first"


def test_traced_single_session_equals_its_row_in_a_batch(traced_file, schema):
    traced = torch.jit.load(str(traced_file))
    inputs = sessions_of_every_length(schema)
    with torch.inference_mode():
        batch_scores, batch_ids = traced(*inputs)
        for i in (0, 7, 19):
            s, ids = traced(*[t[i : i + 1] for t in inputs])
            assert torch.equal(ids[0], batch_ids[i])
            torch.testing.assert_close(s[0], batch_scores[i], atol=1e-5, rtol=0)


def test_padding_does_not_change_a_ranking(traced_file, schema):
    traced = torch.jit.load(str(traced_file))
    inputs = sessions_of_every_length(schema)
    noisy = [t.clone() for t in inputs]
    L = int(schema["max_sequence_length"])
    pad = torch.arange(L)[None, :] >= inputs[-1][:, None]
    for t in noisy[:-1]:
        t[pad] = FIRST_REAL_ID if t.dtype == torch.int64 else 0.5
    with torch.inference_mode():
        a, b = traced(*inputs), traced(*noisy)
    assert torch.equal(a[1], b[1])


def test_traced_guard_clamps_out_of_range_inputs(artifacts, ranker, traced_file, schema):
    """libtorch variant: ids outside [0, cardinality) and lengths outside [1, L] must not index out of
    range in the traced graph (a device-side assert on a GPU). They are clamped (id -> OOV, length ->
    [1, L]) inside the trace; valid inputs give exactly the unguarded model's scores."""
    traced = torch.jit.load(str(traced_file))
    model, _ = load_run(artifacts[1])
    plain = TopKRanker(model, feature_order(schema), K, schema["categorical"][ITEM_LIST])  # no guard
    inputs = sessions_of_every_length(schema)
    with torch.inference_mode():
        want_s, want_i = plain(*inputs)
        got_s, got_i = traced(*inputs)
    assert torch.equal(got_i, want_i) and torch.equal(got_s, want_s)
    bad = [t.clone() for t in inputs]
    cards = [schema["categorical"].get(n) for n in feature_order(schema)]
    for t, card in zip(bad[:-1], cards):
        if card:
            t[0, 0], t[1, 0] = card + 1000, -5
    bad[-1][2], bad[-1][3] = 0, 10_000
    with torch.inference_mode():
        s, ids = traced(*bad)
        oov = [t.clone() for t in bad]
        for t, card in zip(oov[:-1], cards):
            if card:
                t[0, 0], t[1, 0] = OOV_ID, OOV_ID
        oov[-1][2], oov[-1][3] = 1, schema["max_sequence_length"]
        s2, ids2 = plain(*oov)
    assert torch.equal(ids, ids2) and torch.isfinite(s).all()


@pytest.mark.parametrize("k", [0, -1, 10_000])
def test_ranker_rejects_k_outside_the_real_items(artifacts, schema, k):
    model, _ = load_run(artifacts[1])
    with pytest.raises(ValueError, match="top-k must be in"):
        TopKRanker(model, feature_order(schema), k, schema["categorical"][ITEM_LIST])


def test_save_traced_is_a_function_of_the_module(traced_file, tmp_path):
    module = torch.jit.load(str(traced_file))
    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        paths.append(save_traced(module, tmp_path / sub / "model.pt"))
    a, b = paths
    assert a.read_bytes() == b.read_bytes()
    torch.jit.load(str(a))  # still a valid archive after pinning serialization_id


def test_cpu_trace_holds_only_cpu_device_constants(traced_file):
    assert baked_devices(torch.jit.load(str(traced_file))) <= {"cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_export_needs_cuda_to_trace(artifacts, tmp_path):
    data, run = artifacts
    cfg = ExportConfig(run=run, data=data, out=tmp_path / "repo", torch_backend="libtorch", instance_kind="gpu")
    with pytest.raises(RuntimeError, match="traced on a GPU"):
        export_repository(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_libtorch_export(artifacts, schema, traced_file, tmp_path):
    data, run = artifacts
    out = export_repository(
        ExportConfig(run=run, data=data, out=tmp_path / "repo", top_k=K, torch_backend="libtorch", instance_kind="gpu")
    )
    cfg = parse_config(out / TORCH_MODEL / "config.pbtxt")
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    gpu = torch.jit.load(str(out / TORCH_MODEL / "1" / "model.pt"), map_location="cuda:0")
    cpu = torch.jit.load(str(traced_file))
    inputs = sessions_of_every_length(schema)
    with torch.inference_mode():
        want_s, want_i = cpu(*inputs)
        got_s, got_i = gpu(*[t.cuda() for t in inputs])
    assert torch.equal(got_i.cpu(), want_i)
    torch.testing.assert_close(got_s.cpu(), want_s, atol=1e-4, rtol=0)
    # ids out of range straight into the libtorch model: clamped in the graph, no device-side assert
    bad = [t.clone().cuda() for t in inputs]
    for t, name in zip(bad[:-1], feature_order(schema)):
        if name in schema["categorical"]:
            t[0, 0], t[1, 0] = schema["categorical"][name] + 10_000, -3
    bad[-1][2] = 10_000
    with torch.inference_mode():
        s, _ = gpu(*bad)
    torch.cuda.synchronize()
    assert torch.isfinite(s).all()
