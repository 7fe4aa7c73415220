"""RowSparseAdam: torch.optim.SparseAdam's update on rows, bit for bit (training/optim.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.optim import RowSparseAdam


def _run(opt_cls, steps: int = 6, **kw) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    table = nn.Embedding(50, 8, sparse=True)
    opt = opt_cls(table.parameters(), lr=0.05, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (40,), generator=gen)  # repeats: the gradient needs coalescing
        w = torch.randn(40, 8, generator=gen)
        opt.zero_grad()
        (table(ids) * w).sum().backward()
        opt.step()
    state = opt.state[table.weight]
    return table.weight.detach().clone(), state


def test_row_update_equals_torch_sparse_adam_bit_for_bit():
    ours, s_ours = _run(RowSparseAdam)
    ref, s_ref = _run(torch.optim.SparseAdam)
    assert not torch.equal(ours, _run(RowSparseAdam, steps=0)[0])  # it moved
    assert torch.equal(ours, ref)
    assert s_ours["step"] == s_ref["step"] == 6
    assert torch.equal(s_ours["exp_avg"], s_ref["exp_avg"])
    assert torch.equal(s_ours["exp_avg_sq"], s_ref["exp_avg_sq"])


def test_maximize_and_betas_follow_torch():
    ours, _ = _run(RowSparseAdam, betas=(0.8, 0.95), maximize=True)
    ref, _ = _run(torch.optim.SparseAdam, betas=(0.8, 0.95), maximize=True)
    assert torch.equal(ours, ref)


def test_state_loads_into_torch_sparse_adam():
    """optim.pt written with either optimizer resumes with the other: the same state layout."""
    table = nn.Embedding(10, 4, sparse=True)
    ours = RowSparseAdam(table.parameters(), lr=0.1)
    table(torch.tensor([1, 2, 2])).sum().backward()
    ours.step()
    ref = torch.optim.SparseAdam(table.parameters(), lr=0.1)
    ref.load_state_dict(ours.state_dict())
    assert ref.state[table.weight]["step"] == 1
    assert torch.equal(ref.state[table.weight]["exp_avg"], ours.state[table.weight]["exp_avg"])


def test_dense_gradient_is_refused():
    p = nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        RowSparseAdam([p], lr=0.1).step()
