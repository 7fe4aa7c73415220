"""Data stage: click log -> fitted NVTabular workflow -> per-window session splits.

Usage:
    python -m training.prepare --synthetic --seed 0 --out data/synthetic [--num-rows 100000]
    python -m training.prepare --input clicks.tsv --session-col sessionId --item-col itemId \\
        --time-col Time --order-col timeframe --time-unit s --out data/diginetica
    python -m training.prepare --input raw.csv --sep ';' --time-col eventdate --time-unit date \\
        --order-col timeframe --out data/diginetica-raw
    ... --workers 2              run the workflow on a local dask.distributed cluster
    ... --dask-scheduler HOST:PORT   run it on an existing cluster
    ... --config prepare.json    settings from a JSON file; explicit flags win

The flags are the fields of `training.data.prepare.PrepareConfig` (training/cli.py
derives them); the stage itself, its output (docs/contracts.md) and its split rule
are in training/data/prepare.py.

Exit codes: 0 ok, 2 bad input or flags (the message names the flag or column, a sample
bad value and what was expected), 1 anything else (a bug: traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training import cli
from training.data.prepare import BAD_INPUT, PrepareConfig, format_summary, prepare

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(
        PrepareConfig,
        prog="python -m training.prepare",
        description="Click log -> fitted NVTabular workflow -> DATA/sessions_by_day/<window>/{train,valid,test}.parquet",
        epilog=(
            "Split rule: per session, u = splitmix64(splitmix64(seed) ^ session_id) >> 11 / 2**53; "
            "train if u < 0.8, valid if u < 0.9, else test (same result for any partitioning). "
            "Exit code 2 on bad input or flags."
        ),
        config_flag=True,
    )


def config_from_args(argv: list[str] | None = None) -> PrepareConfig:
    """Defaults < --config FILE < explicit flags (training/cli.py)."""
    return cli.parse_with(build_parser(), PrepareConfig, argv)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    try:
        summary = prepare(cfg)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.quiet:
        print(format_summary(summary))
        print(f"wrote {Path(cfg.out)} in {summary['timings_s']['total']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
