"""One table of ablation rows over several logs, from `bench.ablation` JSON files (issue 17).

    python -m bench.ablation_table --out table.md \\
        --log DIGINETICA dg_rows.json dg_more.json \\
        --log NowPlaying1M np_rows.json "np_night.json:ref=mlm_hop2_0.6:clm=hop2_0.6"

Each --log names a log and the ablation JSONs that hold its rows; a row is read from the
first file that has it. A file may name its reference row (`:ref=ROW`, default `recipe`,
the row the effects are measured against), take only some rows (`:rows=A,B`, table
names) and take rows under another name (`:NEW=OLD`: the file's row OLD is the table's
row NEW, for a row that ran under another name with the same settings). A row's effect is its per-seed difference to the file's
reference row over the seeds both ran (paired: same seeds, same sessions), mean and
standard deviation over seeds, as `bench.ablation` gives it. A file's reference row
should be the same recipe in every file of a log: the table lists each file's reference
score so that a reader can check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.ablation import REFERENCE_ROW, ROWS, paired_effect

SHOWN = ("ndcg@20", "recall@20")


def parse_source(spec: str) -> tuple[Path, str, dict[str, str], set[str] | None]:
    """`FILE[:ref=ROW][:rows=A,B][:NEW=OLD...]` -> (file, reference row, table row -> file row,
    the table rows to take from it or None for all)."""
    path, *opts = spec.split(":")
    ref, names, only = REFERENCE_ROW, {}, None
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key or not value:
            raise SystemExit(
                f"ablation_table: {spec!r}: option {opt!r} is not KEY=VALUE (ref=ROW, rows=A,B or NEW=OLD)"
            )
        if key == "ref":
            ref = value
        elif key == "rows":
            only = set(value.split(","))
        else:
            names[key] = value
    return Path(path), ref, names, only


def effects(summary: dict[str, Any], row: str, ref: str) -> dict[str, tuple[float, float, int]]:
    """Per-seed paired difference of `row` to `ref` in one ablation JSON: metric -> (mean, stdev, seeds)."""
    rows = summary["rows"]
    for name in (row, ref):
        if name not in rows:
            raise SystemExit(f"ablation_table: row {name!r} not in the file (rows: {sorted(rows)})")
    a, b = rows[row]["per_seed"], rows[ref]["per_seed"]
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit(f"ablation_table: rows {row!r} and {ref!r} share no seed")
    return {m: (*e, len(seeds)) for m, e in paired_effect(a, b, seeds, SHOWN).items()}


def build(logs: list[list[str]]) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, list[str]]]:
    """(row order, log -> row -> effects, log -> reference lines)."""
    order: list[str] = []
    table: dict[str, dict[str, Any]] = {}
    refs: dict[str, list[str]] = {}
    for log, *specs in logs:
        if not specs:
            raise SystemExit(f"ablation_table: --log {log} names no JSON file")
        table[log], refs[log] = {}, []
        for spec in specs:
            path, ref, names, only = parse_source(spec)
            summary = json.loads(path.read_text())
            if ref not in summary["rows"]:
                raise SystemExit(f"ablation_table: {path}: no reference row {ref!r}")
            base = summary["rows"][ref]["mean"]["model"]
            refs[log].append(
                f"{log}: {path.name}, reference row {ref!r}: "
                + ", ".join(f"{m} {base[m][0]:.4f} ± {base[m][1]:.4f}" for m in SHOWN)
            )
            back = {old: new for new, old in names.items()}
            for file_row in summary["rows"]:
                row = back.get(file_row, file_row)
                if file_row == ref or (file_row in names and file_row not in back):
                    continue  # the reference, or a name another row of the file takes
                if (only is not None and row not in only) or row in table[log]:
                    continue  # not asked for, or an earlier file has it
                table[log][row] = effects(summary, file_row, ref)
                if row not in order:
                    order.append(row)
    return order, table, refs


def markdown(order: list[str], table: dict[str, dict[str, Any]], refs: dict[str, list[str]]) -> str:
    logs = list(table)
    head = "| row | what changes | " + " | ".join(f"{log} {m}" for log in logs for m in SHOWN) + " |"
    lines = [head, "|---|---|" + "---|" * (len(logs) * len(SHOWN))]
    for row in order:
        what = ROWS[row][1] if row in ROWS else ""
        cells = []
        for log in logs:
            e = table[log].get(row)
            for m in SHOWN:
                cells.append("-" if e is None else f"{100 * e[m][0]:+.1f} % ± {100 * e[m][1]:.1f}")
        lines.append(f"| {row} | {what} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"* {r}" for log in logs for r in refs[log]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--log",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME_OR_FILE",
        help="a log's name, then its ablation JSONs (FILE[:ref=ROW][:rows=A,B][:NEW=OLD...])",
    )
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    a = p.parse_args(argv)
    text = markdown(*build(a.log))
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
