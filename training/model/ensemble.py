"""Several trained SessionModels that rank together (TrainConfig.members; training/members.py).

Every member re-ranks the item memory's candidates (`ItemMemory.session_candidates`), which the
count tables alone decide; the members are trained on the same windows, so they hold the same
tables and a session gets the same candidates from each (checked in eager mode). The ensemble's
score of a candidate is the mean over members of its log-softmax over the session's candidates:
each member's scores are first made a distribution, so a member whose logits run larger does not
outvote the others. `shared_tables` points every member at the first member's count buffers, so
a loaded ensemble (and its traced TorchScript) holds one copy of them.

The interface is the part of SessionModel that evaluation and serving call: `cfg`,
`item_memory` (the count tables, the count blend's), `candidate_scores`, `next_item_topk`,
`prepare_ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from training.model import ranking
from training.model.config import ModelConfig
from training.model.item_memory import ItemMemory
from training.model.session_model import SessionModel
from training.names import FIRST_REAL_ID


def mean_log_softmax(scores: Sequence[Tensor]) -> Tensor:
    """(B, C) scores of each member (-inf: not a candidate) -> (B, C) the mean of their
    log-softmax over each row; -inf where any member gives -inf (and in a row without a finite score)."""
    finite = torch.isfinite(scores[0])
    total = torch.log_softmax(scores[0], dim=1)
    for s in scores[1:]:
        finite = finite & torch.isfinite(s)
        total = total + torch.log_softmax(s, dim=1)
    mean = total / len(scores)
    return torch.where(finite, mean, torch.full_like(mean, float("-inf")))


def unfit_member(m: SessionModel) -> str | None:
    """Why `m` cannot be an ensemble member (None: it can): the members must rank the same candidates,
    the item memory's under re-ranking, served in two stages."""
    if m.item_memory is None or not m.cfg.rerank or m.cfg.rank != "two_stage":
        return (
            "needs the item memory with re-ranking served in two stages (memory and rerank on, rank "
            f"two_stage; got memory {m.item_memory is not None}, rerank {m.cfg.rerank}, rank {m.cfg.rank!r}), "
            "so that every member ranks the same candidates"
        )
    return None


class Ensemble(nn.Module):
    """Members that rank the same candidates: scores = `mean_log_softmax` of theirs."""

    def __init__(self, members: Sequence[SessionModel]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        for k, m in enumerate(members):
            if problem := unfit_member(m):
                raise ValueError(f"ensemble member {k}: {problem}")
            if m.cfg.item_feature != members[0].cfg.item_feature or m.cfg.n_items != members[0].cfg.n_items:
                raise ValueError(
                    f"ensemble member {k}: item feature {m.cfg.item_feature!r} with {m.cfg.n_items} ids, "
                    f"expected member 0's {members[0].cfg.item_feature!r} with {members[0].cfg.n_items}"
                )
        self.members = nn.ModuleList(members)

    @property
    def cfg(self) -> ModelConfig:
        return self.members[0].cfg

    @property
    def item_memory(self) -> ItemMemory:
        return self.members[0].item_memory

    def shared_tables(self) -> None:
        """Point every member's count buffers at member 0's (they must be equal): one copy in memory
        and in a trace."""
        first = self.members[0].item_memory
        for k, m in enumerate(self.members[1:], start=1):  # every table checked before any is shared
            for name in ItemMemory.TABLES:
                if not torch.equal(getattr(m.item_memory, name), getattr(first, name)):
                    raise ValueError(
                        f"ensemble member {k}: its count table {name!r} differs from member 0's; the members "
                        "were not trained on the same windows"
                    )
        for m in self.members[1:]:
            for name in ItemMemory.TABLES:
                setattr(m.item_memory, name, getattr(first, name))

    def prepare_ranking(self) -> None:
        for m in self.members:
            m.prepare_ranking()

    def candidate_scores(
        self, feats: dict[str, Tensor], lengths: Tensor, product: bool = False
    ) -> tuple[Tensor, Tensor]:
        """As `SessionModel.candidate_scores`: (scores (B, C), candidates (B, C)); the scores are the
        members' `mean_log_softmax`."""
        outs = [m.candidate_scores(feats, lengths, product) for m in self.members]
        cand = outs[0][1]
        if not torch.jit.is_tracing():
            for k, (_, c) in enumerate(outs[1:], start=1):
                if c.shape != cand.shape or not torch.equal(c, cand):
                    raise RuntimeError(
                        f"ensemble member {k} ranks other candidates than member 0: their count tables differ"
                    )
        return mean_log_softmax([s for s, _ in outs]), cand

    def next_item_topk(self, feats: dict[str, Tensor], lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """As `SessionModel.next_item_topk` under re-ranking: the top-k of `candidate_scores`."""
        n_pop = min(self.cfg.rank_popular, self.cfg.n_items - FIRST_REAL_ID)
        if not 1 <= k <= n_pop:
            raise ValueError(
                f"re-ranking top-k: k={k} must be in [1, {n_pop}] (the popular candidates guarantee k real "
                "items; raise rank_popular)"
            )
        return ranking.candidate_top_k(*self.candidate_scores(feats, lengths), k)
