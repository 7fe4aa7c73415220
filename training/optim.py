"""SparseAdam for the item table, row by row: the same update as torch.optim.SparseAdam, bit for bit.

torch's SparseAdam reads and writes the rows a step touched through sparse tensors: two
`sparse_mask` gathers and three sparse additions, each a coalesced COO tensor of its own. On the
CPU that was ~9% of the real recipe's step (docs/throughput.md section 3c). Here the same
arithmetic runs on the coalesced gradient's row indices with `index_select` / `index_add_`
(the indices are unique, so an index_add_ is the sparse addition's a + b); the state (step,
exp_avg, exp_avg_sq) is SparseAdam's, so optim.pt files load either way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RowSparseAdam(torch.optim.SparseAdam):
    """torch.optim.SparseAdam with its update done on rows (tested equal to it bit for bit)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            sign = -1.0 if group.get("maximize", False) else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = p.grad if sign > 0 else -p.grad
                _row_update(p, grad.coalesce(), state, beta1, beta2, group["lr"], group["eps"])
        return loss


def _row_update(
    param: Tensor, grad: Tensor, state: dict, beta1: float, beta2: float, lr: float, eps: float
) -> None:
    """torch.optim._functional.sparse_adam for one coalesced (rows, ...) gradient, on its rows."""
    values = grad._values()
    if values.numel() == 0:
        return
    if grad.sparse_dim() != 1:  # not row-sparse: torch's own update
        torch.optim._functional.sparse_adam(
            [param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]],
            eps=eps, beta1=beta1, beta2=beta2, lr=lr, maximize=False,
        )  # fmt: skip
        return
    rows = grad._indices()[0]
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    old_avg = exp_avg.index_select(0, rows)
    avg_update = values.sub(old_avg).mul_(1 - beta1)
    exp_avg.index_add_(0, rows, avg_update)
    old_sq = exp_avg_sq.index_select(0, rows)
    sq_update = values.pow(2).sub_(old_sq).mul_(1 - beta2)
    exp_avg_sq.index_add_(0, rows, sq_update)
    numer = avg_update.add_(old_avg)
    denom = sq_update.add_(old_sq).sqrt_().add_(eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param.index_add_(0, rows, -step_size * numer.div_(denom))


def pad_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After `SessionModel.grow`: zero rows appended to every per-parameter state tensor
    (AdamW's exp_avg / exp_avg_sq, ...) whose parameter gained rows; scalars (step) kept."""
    for p in model.parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() == p.dim() and v.dim() > 0 and v.shape != p.shape:
                if v.shape[1:] != p.shape[1:] or v.shape[0] > p.shape[0]:
                    raise RuntimeError(
                        f"optimizer state {k} {tuple(v.shape)} cannot follow parameter {tuple(p.shape)}"
                    )
                state[k] = torch.cat([v, v.new_zeros((p.shape[0] - v.shape[0], *v.shape[1:]))])
