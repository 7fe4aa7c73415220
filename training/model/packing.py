"""Masked-LM masking and session packing: tensor functions of the training batch (not traced).

m = mask_positions(items, lengths, prob, generator)   # MaskedPositions: which positions to predict
p = pack_sessions(feats, lengths, m.masked)           # PackedSessions: several sessions per row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.names import FIRST_REAL_ID


@dataclass
class MaskedPositions:
    """Which positions the masked LM hides and predicts.

    masked:  [B, L] bool, True where the input vector is replaced by the mask
             embedding and a loss term is computed. Invariants (tested):
             * only real positions (< lengths) holding a real item id (>= 3);
             * a session with >= 2 such positions has >= 1 masked and >= 1 not masked;
             * a session with < 2 such positions (e.g. a one-click session) has
               none: with nothing left to condition on it cannot teach the model
               anything but popularity. The reference does the same (it forces
               one mask, then unmasks it because "never all" wins).
    targets: [M] int64, the item ids at the masked positions (row-major order).
    """

    masked: Tensor
    targets: Tensor


def mask_positions(
    items: Tensor,
    lengths: Tensor,
    prob: float,
    generator: torch.Generator | None = None,
    *,
    last: float = 0.0,
) -> MaskedPositions:
    """Bernoulli(prob) masking with >= 1 masked and never all masked per session.

    Like T4Rec's MaskedLanguageModeling: draw Bernoulli masks, force one
    uniformly chosen position, then unmask one uniformly chosen position in
    sessions where everything ended up masked. Pure tensor code, no loops.
    Random numbers come from `generator` (its device), so a run is reproducible.

    last > 0: each session with >= 2 maskable positions is, with probability `last`, masked at
    its last maskable position only (BERT4Rec, Sun et al. 2019, section 3.6: samples that mask the
    last item match the next-item task); drawn after the others, so last = 0 draws what it did.
    """
    B, L = items.shape
    dev = generator.device if generator is not None else items.device
    r = torch.rand(3, B, L, generator=generator, device=dev).to(items.device)  # (3, B, L)
    pos = torch.arange(L, device=items.device)
    maskable = (pos[None, :] < lengths[:, None]) & (items >= FIRST_REAL_ID)  # (B, L)
    n_maskable = maskable.sum(1)  # (B,)
    masked = (r[0] < prob) & maskable
    # force one uniformly chosen maskable position (argmax of iid uniforms)
    forced = torch.where(maskable, r[1], -1.0).argmax(1)  # (B,)
    masked = (masked | F.one_hot(forced, L).bool()) & maskable
    # never all: unmask one uniformly chosen position where all got masked
    all_masked = masked.sum(1) == n_maskable  # (B,)
    unmask = torch.where(maskable, r[2], -1.0).argmax(1)  # (B,)
    masked = masked & ~(F.one_hot(unmask, L).bool() & all_masked[:, None])
    if last > 0:
        pick = (torch.rand(B, generator=generator, device=dev).to(items.device) < last) & (n_maskable >= 2)
        final = torch.where(maskable, pos[None, :], -1).max(1).values.clamp(min=0)  # (B,)
        masked = torch.where(pick[:, None], F.one_hot(final, L).bool() & maskable, masked)
    return MaskedPositions(masked=masked, targets=items[masked])


@dataclass
class PackedSessions:
    """Several sessions per row, for training without computing on padding.

    XLNet only uses relative positions, so a session placed at any offset of a
    row, with attention restricted to its own positions, gives exactly the
    hidden states it gets alone in a padded row (tested).

    feats:   {name: (R, W)} packed features (0 after the last session of a row);
    segment: (R, W) int64, 0 = padding, s + 1 = the batch's session s;
    masked:  (R, W) bool, mlm positions to predict (None for clm).
    """

    feats: dict[str, Tensor]
    segment: Tensor
    masked: Tensor | None

    def to(self, device: torch.device) -> PackedSessions:
        """The same rows on `device` (copies overlap with compute where the memory is pinned)."""
        return PackedSessions(
            {k: v.to(device, non_blocking=True) for k, v in self.feats.items()},
            self.segment.to(device, non_blocking=True),
            None if self.masked is None else self.masked.to(device, non_blocking=True),
        )


def pack_sessions(feats: dict[str, Tensor], lengths: Tensor, masked: Tensor | None = None) -> PackedSessions:
    """Pack right-padded sessions (B, L) into rows of width max(lengths) (CPU tensors).

    First-fit decreasing: sessions sorted by length go to the first row with
    room. Typical sessions here hold ~5 items of 20, so this computes on ~2.5x
    fewer positions than the padded batch. Not traced; runs on the CPU.
    """
    lens = lengths.tolist()
    width = max(lens)
    free: list[int] = []  # room left in each row
    row_of = [0] * len(lens)
    off_of = [0] * len(lens)
    for s in sorted(range(len(lens)), key=lambda i: -lens[i]):
        n = lens[s]
        r = next((r for r, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(width)
        row_of[s], off_of[s] = r, width - free[r]
        free[r] -= n
    n_rows = len(free)
    L = next(iter(feats.values())).shape[1]
    valid = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    s_idx, p_idx = valid.nonzero(as_tuple=True)  # (T,), (T,) every real position
    dst = torch.tensor(row_of)[s_idx] * width + torch.tensor(off_of)[s_idx] + p_idx  # (T,) flat packed index

    def scatter(v: Tensor) -> Tensor:
        out = v.new_zeros(n_rows * width)
        out[dst] = v[s_idx, p_idx]
        return out.view(n_rows, width)

    return PackedSessions(
        feats={k: scatter(v) for k, v in feats.items()},
        segment=scatter((torch.arange(len(lens)) + 1)[:, None].expand(-1, L)),
        masked=None if masked is None else scatter(masked),
    )
