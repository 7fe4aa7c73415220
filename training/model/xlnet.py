"""The transformer body: HF XLNetModel with the position encodings computed once per batch,
and a cheaper CPU dropout (the two speed-ups of training; see SessionModel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import XLNetModel


class FastDropout(nn.Module):
    """Drop-in for XLNet's nn.Dropout with a cheaper random source on the CPU.

    torch's CPU dropout draws one Bernoulli per element from MT19937 and, for
    this small model, costs more than all its matmuls together (measured here:
    ~25 ns per element, a quarter of a training step). Here one 64-bit draw
    gives three 16-bit uniforms u and an element is kept iff u >= round(p * 2^16),
    so the drop probability is p to within 1e-5; where p is a multiple of 1/256 (the real
    recipe's 0.5) one draw gives seven bytes u and an element is kept iff u >= p * 256: exactly p. Same default generator (seeded
    by torch.manual_seed), same scaling by 1/(1-p). On other devices it is
    F.dropout; in eval mode the identity (nothing is traced).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        if (self.p * 256).is_integer():  # p a multiple of 1/256 (0.5, 0.25): bytes are exact, 2.3x fewer draws
            r8 = torch.empty((n + 6) // 7, 8, dtype=torch.uint8)  # (k, 8)
            r8.view(torch.int64).random_()  # 63 random bits per row: bytes 0..6 are uniform (little end)
            keep = torch.empty((n + 6) // 7, 7, dtype=x.dtype)
            torch.ge(r8[:, :7], int(self.p * 256), out=keep)
            return x * keep.view(-1)[:n].view(x.shape).mul_(1.0 / (1.0 - self.p))
        r = torch.empty((n + 2) // 3, 4, dtype=torch.int16)  # (k, 4)
        r.view(torch.int64).random_()  # 63 random bits per row: int16 columns 0..2 are uniform
        # the keep mask straight from the strided int16 view into x's dtype (no int16 copy, no bool
        # cast): the same draws and values as (u >= thr).to(dtype), 1.3x cheaper (docs/throughput.md)
        keep = torch.empty((n + 2) // 3, 3, dtype=x.dtype)
        torch.ge(r[:, :3], round(self.p * 65536) - 32768, out=keep)
        return x * keep.view(-1)[:n].view(x.shape).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _XLNet(XLNetModel):
    """HF XLNetModel, computing the relative position encodings once per batch.

    The stock model expands them to (2L, B, d) before dropout and projects all
    B copies in every layer; they only differ by their dropout mask. Here they
    stay (2L, 1, d) and broadcast: in eval mode the result is identical, in
    training the position-encoding dropout mask is shared by the batch's rows.
    Saves a (2L*B, d) x (d, d) projection per layer.
    """

    def relative_positional_encoding(self, qlen, klen, bsz=None, device=None):
        return super().relative_positional_encoding(qlen, klen, bsz=None, device=device)


def _use_fast_dropout(module: nn.Module) -> None:
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p))
