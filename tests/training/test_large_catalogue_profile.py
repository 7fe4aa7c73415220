"""Nothing of size O(V) in a training step or in early stopping's evaluation at 1M known items
(item memory on, sampled loss, two-stage ranking), once the tables exist (issue 19).

Profiled (torch.profiler, shapes and memory) at V = 1,000,000: one whole optimizer step as the
trainer takes it (`Trainer._step`: backward, clip, AdamW + SparseAdam, schedules), and
`score_held` of held-back sessions after an epoch's step with the window's index kept
(`SessionModel.hold_ranking_index`, as `Trainer.fit` does). No op may allocate one float per
item (4 MB here), and no op that writes (copy, fill, clone, cat, masked fill) may touch a
tensor of V elements or more. The batches are small (16 sessions, 4 scored at once) so that
the per-batch tensors stay far below that; what grows with V shows.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from training.data.splits import SessionTensors
from training.evaluate import score_held
from training.model import ModelConfig, SessionModel, pack_sessions
from training.names import FIRST_REAL_ID
from training.trainer import Trainer

ITEM = "item_id-list"
V = 1_000_000
L = 10
WRITES = {
    "aten::copy_",
    "aten::fill_",
    "aten::zero_",
    "aten::clone",
    "aten::cat",
    "aten::masked_fill",
    "aten::masked_fill_",
    "aten::_to_copy",
    "aten::zeros_like",
    "aten::ones_like",
    "aten::full_like",
    "aten::empty_like",
}


def _model() -> SessionModel:
    cfg = ModelConfig(
        categorical={ITEM: V},
        embedding_dim=16,
        d_model=16,
        d_output=16,
        d_inner=32,
        n_head=2,
        n_layer=1,
        objective="clm",
        memory=True,
        memory_k=4,
        max_len=L,
        loss="sampled",
        negatives=256,
        rank="two_stage",
        ivf_list_size=4096,  # a cheap index for the test (245 lists); the default is 256
        ivf_probe=2,
        ivf_keep=32,
    )
    torch.manual_seed(0)
    m = SessionModel(cfg)
    rng = np.random.default_rng(0)
    pop = torch.from_numpy(rng.zipf(1.3, V).clip(max=10**6).astype(np.float32))
    idx = torch.from_numpy(rng.integers(FIRST_REAL_ID, V, (V, 4)).astype(np.int32))
    m.item_memory.set_tables(idx, torch.ones(V, 4), idx, torch.ones(V, 4), pop)
    return m


def _sessions(n: int, seed: int) -> SessionTensors:
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(rng.integers(2, L + 1, n))
    items = torch.from_numpy(rng.integers(FIRST_REAL_ID, V, (n, L)))
    items = torch.where(torch.arange(L)[None, :] < lengths[:, None], items, 0)
    return SessionTensors({ITEM: items}, lengths, torch.arange(n))


def _o_v(prof) -> list[str]:
    """Ops that allocate >= 4 bytes per item or write a tensor of >= V elements."""
    bad = []
    for e in prof.events():
        if e.cpu_memory_usage >= 4 * V:
            bad.append(f"{e.name} allocates {e.cpu_memory_usage / 1e6:.1f} MB")
        if e.name in WRITES:
            for shape in e.input_shapes:
                if shape and int(np.prod(shape)) >= V:
                    bad.append(f"{e.name} writes {shape}")
    return bad


@pytest.mark.slow  # ~15-40 s: a 1M-item model, its count tables and two-stage index
def test_no_o_v_work_in_a_step_or_early_stopping_at_1m_items():
    m = _model()
    dense, sparse = m.param_groups()
    params = list(dense.values())
    opts = [
        torch.optim.AdamW(params, lr=1e-3, fused=True),
        torch.optim.SparseAdam(list(sparse.values()), lr=1e-3),
    ]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    trainer = SimpleNamespace(  # what Trainer._step reads
        scaler=torch.amp.GradScaler("cpu", enabled=False), cfg=SimpleNamespace(max_grad_norm=1.0)
    )
    gen = torch.Generator().manual_seed(0)
    train, held = _sessions(16, 1), _sessions(12, 2)
    packed = pack_sessions(train.feats, train.lengths)

    def step() -> None:
        m.train()
        Trainer._step(trainer, m.packed_loss(packed, generator=gen), opts, scheds, params)

    cpu = torch.device("cpu")
    m.hold_ranking_index(True)  # as Trainer.fit: the window's index is built by its first evaluation
    step()  # the tables exist: sampler CDF, column map, optimizer moments
    score_held(m, held, cpu, 4, select_head=False)  # the window's two-stage index
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as p_step:
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as p_eval:
        score_held(m, held, cpu, 4, select_head=False)
    m.hold_ranking_index(False)
    assert not _o_v(p_step), _o_v(p_step)
    assert not _o_v(p_eval), _o_v(p_eval)
    # the check sees O(V) work: rebuilding the index from the changed table (what holding avoids)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as p_rebuild:
        score_held(m, held, cpu, 4, select_head=False)
    assert _o_v(p_rebuild)
