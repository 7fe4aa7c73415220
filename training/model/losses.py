"""Training losses over a set of columns, as functions over tensors (SessionModel.packed_loss calls them).

The columns are every item (loss "full"), the sampled ones (loss "sampled", whose
cross-entropy with the logQ correction is sampled.py's), or a re-ranked row's candidates
(ModelConfig.rerank). logits (M, N) float32 with -inf where a column is not one of the
row's (special ids; items outside a re-ranked row's candidates); target_col (M,) the
column of each row's target, always finite. Both return the mean over the M rows
(0 for no rows, still connected to the graph).

    softmax_loss(logits, target_col, label_smoothing)   cross-entropy (ModelConfig.loss_fn "ce")
    gbce_loss(logits, target_col, n_items, t)           gSASRec's generalised BCE ("gbce")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_loss(logits: Tensor, target_col: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy; label_smoothing eps: (1 - eps) * CE + eps * the mean over the row's
    columns (the finite ones) of -log p."""
    denom = max(int(target_col.numel()), 1)
    if label_smoothing <= 0.0:
        return F.cross_entropy(logits, target_col, reduction="sum") / denom
    logp = F.log_softmax(logits, dim=-1)  # (M, N)
    nll = -logp.gather(1, target_col[:, None]).squeeze(1)  # (M,)
    ok = torch.isfinite(logits)  # (M, N) the row's columns
    uniform = -torch.where(ok, logp, 0.0).sum(1) / ok.sum(1)  # (M,)
    return ((1.0 - label_smoothing) * nll + label_smoothing * uniform).sum() / denom


def gbce_loss(logits: Tensor, target_col: Tensor, n_items: int, t: float) -> Tensor:
    """Generalised binary cross-entropy (Petrov & Macdonald, "gSASRec", RecSys'23), mean over rows:

        -beta * log sigmoid(s_target) - sum over the row's other columns j of log(1 - sigmoid(s_j))

    beta = alpha * (t * (1 - 1/alpha) + 1/alpha) = 1 - t * (1 - alpha), alpha = negatives /
    (n_items - 1) the row's sampling rate (negatives: its finite columns but the target;
    n_items: the real items of the catalogue). Over every item alpha = 1 and this is plain
    BCE; with few negatives beta -> 1 - t, which tempers the overconfidence that sampled
    negatives teach (t = 0 is BCE). The paper draws negatives uniformly; sampled.py draws them
    by popularity (sample_alpha 0 gives uniform), and no logQ correction is applied here.
    """
    denom = max(int(target_col.numel()), 1)
    negatives = torch.isfinite(logits).sum(1) - 1  # (M,)
    alpha = negatives.float() / max(n_items - 1, 1)
    beta = 1.0 - t * (1.0 - alpha)  # (M,)
    pos = logits.gather(1, target_col[:, None]).squeeze(1)  # (M,)
    # -log(1 - sigmoid(s)) = softplus(s): 0 at -inf, so the columns that are not the row's add nothing
    neg = F.softplus(logits).scatter(1, target_col[:, None], 0.0).sum(1)  # (M,)
    return (beta * F.softplus(-pos) + neg).sum() / denom
