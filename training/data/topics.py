"""A synthetic click log whose sessions have structure: topics (the data of `make demo`).

    python -m training.data.topics --out data/topics.parquet            # then prepare it as a real log:
    python -m training.prepare --input data/topics.parquet --category-col category --time-col timestamp \\
        --time-unit s --out data/topics

    frame = generate(TopicsConfig(sessions=6000, seed=0))             # session_id, item_id, category, timestamp

The reference example's generator (training/data/synthetic.py) draws every click independently from
one long-tailed popularity: no session says anything about its next click, so every model (and most
popular) ranks the same items for every session, which is right for the reference protocol and shows
nothing in a demo. Here:

- items belong to `topics` topics of `items_per_topic` items each; the raw item id is
  `ITEM_ID_BASE * (topic + 1) + rank` and the category column is the topic (1-based), so an id says
  which topic it belongs to at a glance;
- a session picks a topic (topic popularity is Zipf-like, so some topics are busier), starts at an
  item of it (low ranks more likely) and browses: the next click is the next item of the topic's
  catalogue with probability `p_next` (a shopper paging through), another item of the same topic
  otherwise, and with probability `p_switch` the shopper jumps to another topic for the rest of the
  session;
- session lengths are 2 + Poisson(`mean_length` - 2); sessions are spread evenly over `days` days,
  clicks 10-120 s apart, `timestamp` in epoch seconds (the workflow derives weekday_sin and item age
  from it, as for a real log).

Seeded (`np.random.default_rng(seed)`): the same config gives the same frame. A model that follows the
session ranks the current topic's items, and the item after the last click, at the top; most popular
cannot.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from training.cli import command_line, help_meta
from training.names import CATEGORY_COL, ITEM_COL, SESSION_COL, TIME_COL

ITEM_ID_BASE = 1000  # raw item id = ITEM_ID_BASE * (topic + 1) + rank within the topic
FIRST_SESSION_ID = 1
START_TIME = 1_699_920_000  # epoch seconds of the first day: 2023-11-14 00:00 UTC (windows are UTC days)
DAY_S = 86_400


@dataclass
class TopicsConfig:
    out: Path | None = field(default=None, metadata=help_meta("write the log here (.parquet or .csv)"))
    sessions: int = field(default=6000, metadata=help_meta("sessions to generate"))
    topics: int = field(default=24, metadata=help_meta("topics (= categories)"))
    items_per_topic: int = field(default=40, metadata=help_meta("items of each topic"))
    mean_length: float = field(default=6.0, metadata=help_meta("mean clicks per session (at least 2)"))
    p_next: float = field(default=0.6, metadata=help_meta("probability that the next click is the next item"))
    p_switch: float = field(default=0.08, metadata=help_meta("probability per click of switching topic"))
    days: int = field(default=9, metadata=help_meta("days the sessions are spread over (the windows)"))
    seed: int = field(default=0, metadata=help_meta("seed"))

    def check(self) -> None:
        for name in ("sessions", "topics", "items_per_topic", "days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.items_per_topic >= ITEM_ID_BASE:
            raise ValueError(f"items_per_topic must be < {ITEM_ID_BASE}, got {self.items_per_topic}")
        if self.mean_length < 2:
            raise ValueError(f"mean_length must be >= 2, got {self.mean_length}")
        for name in ("p_next", "p_switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def topic_of(item_id) -> np.ndarray:
    """The 1-based topic (category) of raw item ids of this generator."""
    return np.asarray(item_id) // ITEM_ID_BASE


def generate(cfg: TopicsConfig) -> pd.DataFrame:
    """Columns session_id, item_id, category, timestamp (int64), sessions in time order, clicks in order."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    n_items = cfg.items_per_topic
    topic_p = 1.0 / np.arange(1, cfg.topics + 1) ** 0.8
    topic_p /= topic_p.sum()
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.7  # within a topic, low ranks are more popular
    item_p /= item_p.sum()
    lengths = 2 + rng.poisson(cfg.mean_length - 2, cfg.sessions)
    starts = START_TIME + np.sort(rng.integers(0, cfg.days * DAY_S - 3600, cfg.sessions))
    sessions, items, times = [], [], []
    for s in range(cfg.sessions):
        topic = rng.choice(cfg.topics, p=topic_p)
        rank = rng.choice(n_items, p=item_p)
        t = int(starts[s])
        for _ in range(int(lengths[s])):
            sessions.append(FIRST_SESSION_ID + s)
            items.append(ITEM_ID_BASE * (topic + 1) + rank)
            times.append(t)
            t += int(rng.integers(10, 121))
            if rng.random() < cfg.p_switch:
                topic, rank = rng.choice(cfg.topics, p=topic_p), rng.choice(n_items, p=item_p)
            elif rng.random() < cfg.p_next:
                rank = (rank + 1) % n_items
            else:
                rank = rng.choice(n_items, p=item_p)
    item = np.asarray(items, dtype=np.int64)
    return pd.DataFrame(
        {
            SESSION_COL: np.asarray(sessions, dtype=np.int64),
            ITEM_COL: item,
            CATEGORY_COL: topic_of(item).astype(np.int64),
            TIME_COL: np.asarray(times, dtype=np.int64),
        }
    )


def prepare_args(path: Path) -> list[str]:
    """`python -m training.prepare` flags that read a log written by `write` (add --out)."""
    return ["--input", str(path), "--category-col", CATEGORY_COL, "--time-col", TIME_COL, "--time-unit", "s"]


def write(cfg: TopicsConfig) -> Path:
    """Generate and write the log to cfg.out (.parquet, or .csv); returns the path."""
    if cfg.out is None:
        raise ValueError("out: where to write the log (.parquet or .csv)")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = generate(cfg)
    if out.suffix == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    return out


parse_args = command_line(TopicsConfig, "python -m training.data.topics", __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        out = write(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {cfg.sessions} sessions over {cfg.topics} topics x {cfg.items_per_topic} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
