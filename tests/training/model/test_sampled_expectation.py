"""The sampled loss with the logQ correction matches the full loss in expectation at partial sampling.

The other sampled-loss tests hold with every item a candidate (the correction is then exactly
0) or check the correction's formula; this one checks what it is for (issue 19): at V = 400
with 20 negatives a step scores ~1/5 of the catalogue, and the mean of the sampled loss over
many draws must be the full loss of the same weights (measured: full 5.99, sampled with logQ
6.04; without the correction 4.21, log of the candidates instead of log V). Dropping or
misplacing the correction, or computing log P(j in U) wrongly, fails it.
"""

from __future__ import annotations

import pytest
import torch

from tests.training.model.test_sampled import fill_counts, make_model, packed_batch, sessions

N_ITEMS = 400
DRAWS = 200


@pytest.mark.parametrize("memory", [False, True])
def test_sampled_loss_matches_the_full_loss_in_expectation(memory):
    items, lengths = sessions(8, N_ITEMS, seed=11)  # ~40 targets: all of them are columns
    full = make_model("full", "clm", memory, n_items=N_ITEMS).eval()  # eval: no dropout noise
    samp = make_model("sampled", "clm", memory, n_items=N_ITEMS, negatives=20).eval()
    samp.load_state_dict(full.state_dict())
    with torch.no_grad():  # item vectors with spread, as after training: the softmax is not flat
        for m in (full, samp):
            m.embeddings["item_id-list"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    fill_counts(full, items, lengths)
    fill_counts(samp, items, lengths)
    _, _, p = packed_batch(items, lengths, "clm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        want = float(full.packed_loss(p))
        cols, _ = samp.sample_candidates(p.feats["item_id-list"][p.segment > 0], g)
        draws = torch.tensor([float(samp.packed_loss(p, generator=g)) for _ in range(DRAWS)])
    share = cols.numel() / N_ITEMS
    mean, se = float(draws.mean()), float(draws.std()) / DRAWS**0.5
    print(
        f"memory={memory}: full {want:.3f}, sampled {mean:.3f} +- {se:.3f} ({share:.0%} of the items scored)"
    )
    assert share < 0.5  # partial sampling: a candidate set well below the catalogue
    assert abs(mean - want) < 0.03 * want + 4 * se  # the estimate's own (Jensen) bias is ~1%
