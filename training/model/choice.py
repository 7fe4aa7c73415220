"""What loss and ranking "auto" picks: by the measured cost of each, not a fixed item count.

`ModelConfig.__post_init__` resolves loss / rank "auto" with `auto_loss` / `auto_rank` once the
schema (the catalogue size V) is known; the trainer writes `explain(settings, resolved)` to
meta.json ("choices"), so a run says what it picked and why. docs/throughput.md has the
measurements (`python -m bench.choice`, 1 thread; DIGINETICA accuracy, 3 seeds, valid).

* loss: the full softmax's step work grows with V (the (targets, V) logits, their softmax and
  gradients); the sampled loss scores U <= targets + `negatives` columns whatever V. The two
  cost the same around V ~ negatives (bench.choice: full / sampled per step 0.9-1.0x at 1-2k
  ids, 1.2-2.2x at 5k, 1.8-3.7x at 10k, 2-6x at 20k), so "auto" picks sampled from
  SAMPLED_PER_NEGATIVE x negatives ids (4,096 at the default 2,048), where it is clearly faster:
  no size trains much slower than a larger one. The logQ-corrected loss is unbiased
  (tests/test_sampled_expectation.py) and, where measured on real logs, costs no accuracy.
* rank: exact ranking scores every item per session, two-stage a fixed number C of candidates
  (`candidate_count`: the session, the memory's neighbour lists, the popular items, the IVF
  keep) plus the IVF list heads. A 1-session request costs the same around V ~ 20-25 C
  (bench.choice: 1-session exact / two-stage 0.9x at 5k and 1.1x at 20k with the memory
  (C = 812), 1.2x at 10-20k without (C = 212); 2-5x at 100-200k), so "auto" picks two-stage
  from TWO_STAGE_PER_CANDIDATE x C ids. Evaluation then ranks as served (training/evaluate.py)
  and reports the exact metrics and their agreement too.
An explicit `sampled_min_items` / `two_stage_min_items` replaces the cost rule by a fixed size.
"""

from __future__ import annotations

from typing import Any

SAMPLED_PER_NEGATIVE = 2  # loss "auto": sampled from this many ids per shared negative
TWO_STAGE_PER_CANDIDATE = 25  # rank "auto": two-stage from this many ids per candidate


def candidate_count(cfg: Any) -> int:
    """Candidates per session of two-stage ranking (`ranking.candidates`) for a config with schema."""
    memory = cfg.rank_context * cfg.memory_k + cfg.memory_k if cfg.memory else 0
    return cfg.max_len + memory + cfg.rank_popular + cfg.ivf_keep


def sampled_threshold(cfg: Any) -> int:
    """Item ids from which loss "auto" is sampled."""
    if cfg.sampled_min_items is not None:
        return int(cfg.sampled_min_items)
    return SAMPLED_PER_NEGATIVE * cfg.negatives


def two_stage_threshold(cfg: Any) -> int:
    """Item ids from which rank "auto" is two-stage."""
    if cfg.two_stage_min_items is not None:
        return int(cfg.two_stage_min_items)
    return TWO_STAGE_PER_CANDIDATE * candidate_count(cfg)


def auto_loss(cfg: Any) -> str:
    return "sampled" if cfg.n_items >= sampled_threshold(cfg) else "full"


def auto_rank(cfg: Any) -> str:
    if cfg.rerank and cfg.memory:  # only the memory's candidates are ranked: their exact top-k
        return "two_stage"
    return "two_stage" if cfg.n_items >= two_stage_threshold(cfg) else "exact"


def _loss_reason(cfg: Any) -> str:
    at = sampled_threshold(cfg)
    rule = (
        f"sampled_min_items = {at:,}"
        if cfg.sampled_min_items is not None
        else f"{SAMPLED_PER_NEGATIVE} x negatives ({cfg.negatives:,}) = {at:,} ids, where a sampled step "
        "costs clearly less than a full one (docs/throughput.md)"
    )
    side = ">=" if cfg.n_items >= at else "<"
    return f"{cfg.n_items:,} item ids {side} {rule}"


def _rank_reason(cfg: Any) -> str:
    if cfg.rerank and cfg.memory:
        return "re-ranking: only the item memory's candidates are ranked, two_stage scores just those"
    at = two_stage_threshold(cfg)
    rule = (
        f"two_stage_min_items = {at:,}"
        if cfg.two_stage_min_items is not None
        else f"{TWO_STAGE_PER_CANDIDATE} x {candidate_count(cfg):,} candidates per session = {at:,} ids, "
        "where a two-stage request costs less than an exact one (docs/throughput.md)"
    )
    side = ">=" if cfg.n_items >= at else "<"
    return f"{cfg.n_items:,} item ids {side} {rule}"


def explain(settings: Any, resolved: Any) -> dict[str, dict[str, str]]:
    """{"loss" | "rank": {"setting", "value", "reason"}}: what was asked (settings, without the
    schema) and what the config with the schema (`resolved`) uses, and why."""
    out = {}
    for name, reason in (("loss", _loss_reason), ("rank", _rank_reason)):
        asked = getattr(settings, name)
        why = reason(resolved) if asked == "auto" else f"set explicitly ({name} {asked})"
        out[name] = {"setting": asked, "value": getattr(resolved, name), "reason": why}
    return out
