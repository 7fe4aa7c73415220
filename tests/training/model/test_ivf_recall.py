"""The IVF stage carries two-stage ranking's recall at realistic settings (issue 19).

50,000 items whose vectors form 500 clusters (as learned item vectors do), the default index
settings (lists of 256, 4 probed, 64 kept) and 128 popular ids, no item memory; each session's
query points at the cluster of its last item (as a trained model's does). The exact top 20 by
the network's score must be among the session's candidates (`SessionModel.rank_candidates`):
measured 0.97 of them; the other sources alone (the session's items and the popular ids)
hold 0.06, so an IVF stage that returns only padding, or the wrong lists, fails this.
"""

from __future__ import annotations

import torch

from training.model import ModelConfig, SessionModel
from training.names import FIRST_REAL_ID

V, E, L, B = 50_000, 64, 20, 256


def test_ivf_stage_finds_the_exact_top_20():
    cfg = ModelConfig(categorical={"item_id-list": V}, max_len=L, rank="two_stage")
    assert (cfg.ivf_list_size, cfg.ivf_probe, cfg.ivf_keep, cfg.rank_popular) == (256, 4, 64, 128)
    torch.manual_seed(0)
    m = SessionModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(500, E, generator=g)
    table = (centers[torch.randint(0, 500, (V,), generator=g)] + 0.7 * torch.randn(V, E, generator=g)) * 0.1
    items = torch.randint(FIRST_REAL_ID, V, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    items = torch.where(torch.arange(L)[None, :] < lengths[:, None], items, 0)
    last = items.gather(1, (lengths - 1)[:, None]).squeeze(1)
    q = table[last] * 10 + 0.5 * torch.randn(B, E, generator=g)  # (B, E) head inputs
    with torch.no_grad():
        m.embeddings["item_id-list"].weight.copy_(table)
        m.prepare_ranking()
        cand = m.rank_candidates(items, lengths, q)  # (B, C)
        scores = q @ table.t()
        scores[:, :FIRST_REAL_ID] = float("-inf")
        exact = scores.topk(20, dim=1).indices  # (B, 20)
    recall = float((exact[:, :, None] == cand[:, None, :]).any(2).float().mean())
    print(f"exact top-20 among the two-stage candidates: {recall:.3f}")
    assert recall >= 0.8
