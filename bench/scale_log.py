"""Large click logs for the scale benchmark: sessions with topic structure over a Zipf catalogue.

    python -m bench.scale_log --items 1000000 --clicks 5000000 --days 14 --out /tmp/clicks-1m.parquet

The catalogue has `items` items whose popularity follows Zipf's law
(weight of the item of popularity rank r: (r + 1) ** -zipf) and `topics` topics
(each item belongs to one, at random). A session picks a topic with the
probability of that topic's total weight; each click stays in the session's
topic with probability `in_topic` (item drawn by Zipf weight inside the topic)
or is a click anywhere (drawn by global Zipf weight). So co-occurrence counts
and embeddings both have something to find, as in a shop: people browse a
category, with the bestsellers of the whole shop mixed in.

Session lengths are 2 + geometric (mean `mean_len`, at most `max_len`); a
session starts at a uniform time over `days` days and its clicks are 10-120 s
apart. Raw item ids are a random permutation of 10**6 .. 10**6 + 10 * items
(so ids say nothing of popularity), session ids count from 1. Columns:
session_id, item_id, timestamp (epoch seconds), the names `python -m
training.prepare --input` reads with `--time-unit s`. Written as parquet (or
CSV when `--out` ends in .csv). Everything is vectorised numpy: 5M clicks take
a few seconds; the same arguments give the same file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EPOCH_START = 1_700_000_000  # 2023-11-14, any fixed start works
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class ScaleLogConfig:
    items: int = 20_000  # catalogue size (not every item need be clicked)
    clicks: int = 1_000_000  # approximate number of clicks (whole sessions are kept)
    days: int = 14
    topics: int = 0  # 0: one topic per 200 items
    zipf: float = 0.9  # popularity exponent
    in_topic: float = 0.8  # probability that a click stays in the session's topic
    mean_len: float = 5.0  # mean clicks per session
    max_len: int = 50
    seed: int = 0

    def check(self) -> None:
        for name in ("items", "clicks", "days", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.topics < 0:
            raise ValueError(f"topics must be >= 0, got {self.topics}")
        if not 0.0 <= self.in_topic <= 1.0:
            raise ValueError(f"in_topic must be in [0, 1], got {self.in_topic}")
        if self.mean_len < 2.0:
            raise ValueError(f"mean_len must be >= 2 (sessions have at least 2 clicks), got {self.mean_len}")
        if self.zipf < 0:
            raise ValueError(f"zipf must be >= 0, got {self.zipf}")


def generate(cfg: ScaleLogConfig) -> dict[str, np.ndarray]:
    """The log as columns session_id, item_id, timestamp (int64), rows grouped by session in time order."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    V = cfg.items
    T = cfg.topics or max(1, V // 200)
    weight = (np.arange(V, dtype=np.float64) + 1.0) ** -cfg.zipf  # (V,) by popularity rank
    topic = rng.integers(0, T, size=V)  # (V,)
    # one concatenated CDF: items sorted by (topic, rank); value = topic + cumulative share inside it,
    # so a draw inside topic t is searchsorted(cdf, t + u) for u ~ U(0, 1)
    by_topic = np.lexsort((np.arange(V), topic))  # (V,) item ranks grouped by topic
    # inside a topic the draw is flatter than the global law (weight ** 0.5): a topic's
    # best seller would otherwise fill whole sessions with one item
    w_sorted = np.sqrt(weight[by_topic])
    t_sorted = topic[by_topic]
    topic_weight = np.bincount(topic, weights=weight, minlength=T)  # (T,) how often a session picks it
    flat_total = np.bincount(t_sorted, weights=w_sorted, minlength=T)  # (T,)
    within = np.cumsum(w_sorted) - np.repeat(np.cumsum(flat_total) - flat_total, np.bincount(topic, minlength=T))
    cdf_topic = t_sorted + within / np.maximum(flat_total[t_sorted], 1e-300)  # (V,) increasing
    cdf_global = np.cumsum(weight) / weight.sum()  # (V,)

    # sessions: 2 + geometric extra clicks, truncated, until about `clicks` clicks
    p_more = 1.0 / (cfg.mean_len - 1.0)  # geometric on {1, 2, ...} with mean mean_len - 1
    n_sessions = max(1, int(cfg.clicks / cfg.mean_len))
    lengths = np.minimum(1 + rng.geometric(p_more, size=n_sessions), cfg.max_len)  # (S,)
    total = int(lengths.sum())
    session_of_click = np.repeat(np.arange(n_sessions), lengths)  # (N,)
    # topic of each session, by topic weight
    s_topic = np.searchsorted(np.cumsum(topic_weight) / topic_weight.sum(), rng.random(n_sessions), side="right")
    s_topic = np.minimum(s_topic, T - 1)
    stay = rng.random(total) < cfg.in_topic  # (N,)
    u = rng.random(total)
    in_t = np.minimum(np.searchsorted(cdf_topic, s_topic[session_of_click] + u, side="right"), V - 1)
    anywhere = np.minimum(np.searchsorted(cdf_global, u, side="right"), V - 1)
    rank = np.where(stay, by_topic[in_t], anywhere)  # (N,) popularity rank of the clicked item
    # a click repeating the previous one (prepare would drop it) is redrawn once from the whole catalogue
    again = np.zeros(total, dtype=bool)
    again[1:] = (rank[1:] == rank[:-1]) & (session_of_click[1:] == session_of_click[:-1])
    redraw = np.minimum(np.searchsorted(cdf_global, rng.random(int(again.sum())), side="right"), V - 1)
    rank[again] = redraw
    raw_ids = 1_000_000 + rng.choice(10 * V, size=V, replace=False)  # (V,) raw id of each rank
    # time: session start uniform over the days, clicks 10-120 s apart
    start = EPOCH_START + rng.integers(0, cfg.days * SECONDS_PER_DAY, size=n_sessions)
    gaps = rng.integers(10, 121, size=total)
    first = np.cumsum(lengths) - lengths
    gaps[first] = 0
    offset = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first], lengths)
    return {
        "session_id": (session_of_click + 1).astype(np.int64),
        "item_id": raw_ids[rank].astype(np.int64),
        "timestamp": (start[session_of_click] + offset).astype(np.int64),
    }


def write(columns: dict[str, np.ndarray], out: Path) -> Path:
    """Parquet (or CSV for a .csv path), written to a temporary name and renamed."""
    import pyarrow as pa

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table = pa.table(columns)
    if out.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, tmp)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale_log", description=__doc__.split("\n\n")[0])
    d = ScaleLogConfig()
    p.add_argument("--items", type=int, default=d.items, help="catalogue size")
    p.add_argument("--clicks", type=int, default=d.clicks, help="approximate number of clicks")
    p.add_argument("--days", type=int, default=d.days, help="days the sessions spread over")
    p.add_argument("--topics", type=int, default=d.topics, help="topics (0: one per 200 items)")
    p.add_argument("--zipf", type=float, default=d.zipf, help="popularity exponent")
    p.add_argument("--in-topic", type=float, default=d.in_topic, help="probability a click stays in the topic")
    p.add_argument("--mean-len", type=float, default=d.mean_len, help="mean clicks per session (>= 2)")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest session")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--out", type=Path, required=True, help="output .parquet (or .csv)")
    a = p.parse_args(argv)
    cfg = ScaleLogConfig(a.items, a.clicks, a.days, a.topics, a.zipf, a.in_topic, a.mean_len, a.max_len, a.seed)
    try:
        cols = generate(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(cols, a.out)
    distinct = len(np.unique(cols["item_id"]))
    print(
        f"{a.out}: {len(cols['item_id']):,} clicks, {int(cols['session_id'][-1]):,} sessions, "
        f"{distinct:,} distinct items of {cfg.items:,}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
