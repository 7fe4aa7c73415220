"""The cost behind loss / rank "auto": a training step and a served request against the catalogue size.

    python -m bench.choice --out bench_results/choice.json
    python -m bench.choice --out c.json --items 2000 20000 --reps 5 --recipe reference

For every catalogue size V in --items, a model of the chosen recipe's shape ("real": clm, item
memory with K neighbours per item filled with random tables; "reference": mlm, no memory) and
fixed random batches of 128 sessions (lengths 1-20, Zipf-popular items), then, interleaved rep
by rep so that both sides see the same machine load:

* train: one optimizer step (packed loss, backward, clip, AdamW; SparseAdam for the item table
  of the sampled loss) with loss "full" and with loss "sampled": CPU milliseconds per step;
* serve: `next_item_topk` (k 20, eager, inference mode) with rank "exact" and "two_stage"
  (index built first): CPU milliseconds of a 1-session and of a 64-session call.

Reports the minimum and the median over reps (CPU time: robust to preemption on shared
cores) and the ratio full / sampled and exact / two-stage. The sizes where the ratio crosses 1
are what `training/model/choice.py` uses; docs/throughput.md has the table.
"""

from __future__ import annotations

import training.runtime  # noqa: F401  (first: OMP_WAIT_POLICY, THP before torch is imported)

# isort: split
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from training.model import ModelConfig, SessionModel, mask_positions, pack_sessions
from training.names import FIRST_REAL_ID

ITEM = "item_id-list"
DEFAULT_ITEMS = (500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
MAX_LEN = 20


def zipf_items(n: int, V: int, g: torch.Generator) -> Tensor:
    """n ids in [3, V) with P(rank r) ~ 1 / r (a click log's popularity)."""
    w = 1.0 / torch.arange(1, V - FIRST_REAL_ID + 1, dtype=torch.float64)
    return torch.multinomial(w, n, replacement=True, generator=g) + FIRST_REAL_ID


def make_model(V: int, recipe: str, loss: str, rank: str, k: int, g: torch.Generator) -> SessionModel:
    settings: dict[str, Any] = {"loss": loss, "rank": rank}
    if recipe == "real":
        settings.update(objective="clm", memory=True, memory_k=k, dropout=0.5, embedding_init_std=0.01)
    cfg = ModelConfig(categorical={ITEM: V}, max_len=MAX_LEN, **settings)
    model = SessionModel(cfg)
    pop = torch.zeros(V)
    pop[FIRST_REAL_ID:] = 1e4 / torch.arange(1, V - FIRST_REAL_ID + 1, dtype=torch.float32)
    if model.item_memory is not None:
        kk = model.cfg.memory_k
        ids = zipf_items(V * kk, V, g).view(V, kk).to(torch.int32)
        vals = torch.rand(V, kk, generator=g) * 20
        model.item_memory.set_tables(ids, vals, ids.flip(1), vals, pop)
    elif loss == "sampled":
        model.set_sample_counts(pop)
    return model


def batches(V: int, n: int, mlm: bool, g: torch.Generator) -> list[tuple[dict, Tensor, Tensor | None]]:
    out = []
    for _ in range(n):
        lengths = torch.randint(1, MAX_LEN + 1, (128,), generator=g)
        lengths = torch.where(torch.rand(128, generator=g) < 0.6, lengths.clamp(max=5), lengths)
        items = zipf_items(128 * MAX_LEN, V, g).view(128, MAX_LEN)
        items = torch.where(torch.arange(MAX_LEN)[None, :] < lengths[:, None], items, 0)
        width = int(lengths.max())
        feats = {ITEM: items[:, :width]}
        masked = mask_positions(feats[ITEM], lengths, 0.15, g).masked if mlm else None
        out.append((feats, lengths, masked))
    return out


class Stepper:
    """One optimizer step of a model, as the trainer takes it."""

    def __init__(self, model: SessionModel):
        self.model = model.train()
        dense, sparse = model.param_groups()
        self.params = list(dense.values())
        self.opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(self.params, lr=1e-3, fused=True)]
        if sparse:
            self.opts.append(torch.optim.SparseAdam(list(sparse.values()), lr=1e-3))
        self.gen = torch.Generator().manual_seed(5) if model.cfg.loss == "sampled" else None

    def __call__(self, batch) -> None:
        feats, lengths, masked = batch
        loss = self.model.packed_loss(pack_sessions(feats, lengths, masked), generator=self.gen)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, 1.0)
        for o in self.opts:
            o.step()


def cpu_ms(fn, *args) -> float:
    t0 = time.process_time()
    fn(*args)
    return (time.process_time() - t0) * 1e3


def stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs)}


def measure(V: int, recipe: str, reps: int, k: int, train_max: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(V)
    mlm = recipe == "reference"
    losses = ("full", "sampled") if V <= train_max else ("sampled",)
    steppers = {loss: Stepper(make_model(V, recipe, loss, "exact", k, g)) for loss in losses}
    if "full" in steppers:
        steppers["sampled"].model.load_state_dict(steppers["full"].model.state_dict())
    data = batches(V, 4, mlm, g)
    train: dict[str, list[float]] = {loss: [] for loss in steppers}
    for s in steppers.values():  # warm-up
        s(data[0])
    rep_batches = max(1, min(4, reps))
    for r in range(reps):
        for loss, s in steppers.items():
            train[loss].append(cpu_ms(s, data[r % rep_batches]))
    out: dict[str, Any] = {"items": V, "train_ms": {k_: stats(v) for k_, v in train.items()}}
    if "full" in train:
        out["train_full_over_sampled"] = (
            out["train_ms"]["full"]["median"] / out["train_ms"]["sampled"]["median"]
        )
    base = steppers["sampled"].model
    rankers = {}
    for rank in ("exact", "two_stage"):
        m = make_model(V, recipe, "full", rank, k, g)
        m.load_state_dict(base.state_dict())
        if m.item_memory is not None and base.item_memory is not None:
            m.item_memory.set_tables(**base.item_memory.tables())
        m.eval()
        m.prepare_ranking()
        rankers[rank] = m
    serve_ms: dict[str, dict[str, list[float]]] = {r: {"1": [], "64": []} for r in rankers}
    with torch.inference_mode():
        for b in ("1", "64"):
            feats, lengths, _ = data[0]
            f = {ITEM: feats[ITEM][: int(b)]}
            ln = lengths[: int(b)]
            for m in rankers.values():
                m.next_item_topk(f, ln, 20)
            for _ in range(reps):
                for rank, m in rankers.items():
                    serve_ms[rank][b].append(cpu_ms(m.next_item_topk, f, ln, 20))
    out["serve_ms"] = {r: {b: stats(v) for b, v in d.items()} for r, d in serve_ms.items()}
    out["serve_exact_over_two_stage"] = {
        b: out["serve_ms"]["exact"][b]["median"] / out["serve_ms"]["two_stage"][b]["median"]
        for b in ("1", "64")
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.choice", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--items", type=int, nargs="+", default=list(DEFAULT_ITEMS), help="catalogue sizes")
    p.add_argument("--recipe", choices=("real", "reference"), default="real", help="model shape")
    p.add_argument("--reps", type=int, default=8, help="interleaved repetitions per size")
    p.add_argument("--memory-k", type=int, default=100, help="real recipe: neighbours per item")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--train-max",
        type=int,
        default=50_000,
        help="the full loss only up to this size (seconds a step above)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    # random count tables give some targets scores far above the rest, and their softmax gradients
    # become subnormal floats, which made the full loss's matmuls 8x slower here; real data did not
    # (DIGINETICA: the same time and results with this on): flushed, so the comparison is of the work
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    rows = []
    for V in a.items:
        row = measure(V, a.recipe, a.reps, a.memory_k, a.train_max)
        row["load"] = float(Path("/proc/loadavg").read_text().split()[0])
        rows.append(row)
        tr = row["train_ms"]
        line = (
            f"V={V:>8} train ms full {tr['full']['median'] if 'full' in tr else float('nan'):8.1f} sampled "
        )
        line += f"{tr['sampled']['median']:8.1f} (x{row.get('train_full_over_sampled', float('nan')):.2f})"
        s = row["serve_ms"]
        line += (
            f" | serve ms 1-sess exact {s['exact']['1']['median']:7.2f} two-stage "
            f"{s['two_stage']['1']['median']:7.2f}; 64-sess exact {s['exact']['64']['median']:8.1f} "
            f"two-stage {s['two_stage']['64']['median']:8.1f}"
        )
        print(line + f" (load {row['load']:.1f})", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": a.recipe, "threads": a.threads, "rows": rows}, indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
