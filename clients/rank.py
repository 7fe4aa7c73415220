"""Rank the next item of every session in a file of interactions, over gRPC.

    python -m clients.rank --url 127.0.0.1:8001 --input data/synthetic/interactions.parquet --top-k 5
    python -m clients.rank --url 127.0.0.1:8001 --input clicks.csv --json --batch-sessions 64 --concurrency 4

FILE is CSV or parquet with the columns of DATA/interactions.parquet (one row
per interaction; rows of a session in time order; extra columns are ignored).
Whole sessions are sent together, `--batch-sessions` per request (default:
the most the server accepts, the model step's max_batch_size), up to
`--concurrency` requests in flight. The server must be live and the model
ready; a request answered UNAVAILABLE (a full queue) is sent again up to
`--retries` times with exponential backoff. Behind TLS or a proxy:
    python -m clients.rank --url ranker.example:443 --input clicks.parquet --ssl \
        --root-certificates ca.pem --header authorization="Bearer $TOKEN"
Prints one line per session: a table, or
with `--json` one JSON object per line:
    {"session_id": 70000, "item_ids": [220, 269, ...], "scores": [1.22, 0.99, ...]}
Exit status: 0 when every session was ranked, 1 on any error (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.ranking import BACKOFF_CAP_S, RankError, Rankings, rank_sessions
from training.cli import command_line, help_meta


def parse_header(text: str) -> tuple[str, str]:
    """`--header KEY=VALUE` -> (KEY, VALUE); the value may itself hold '='."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (e.g. --header authorization='Bearer TOKEN')"
        )
    return key.strip(), value


@dataclass
class RankCommand:
    input: Path = field(metadata=help_meta("interactions, CSV or parquet"))
    url: str = field(default="127.0.0.1:8001", metadata=help_meta("tritonserver gRPC endpoint host:port"))
    top_k: int | None = field(
        default=None, metadata=help_meta("items per session (default: all the server returns)")
    )
    as_json: bool = field(
        default=False, metadata=help_meta("one JSON object per session and line", flags=["--json"])
    )
    batch_sessions: int | None = field(
        default=None,
        metadata=help_meta(
            "sessions per request (default: the server's limit, the model step's max_batch_size)"
        ),
    )
    concurrency: int = field(default=1, metadata=help_meta("requests in flight"))
    timeout: float = field(default=60.0, metadata=help_meta("seconds per call to the server"))
    retries: int = field(
        default=3, metadata=help_meta("attempts after the first when the server answers UNAVAILABLE")
    )
    backoff: float = field(
        default=0.05,
        metadata=help_meta(
            "seconds: the waits before retries are up to backoff, 2*backoff, 4*backoff, ... "
            f"(at most {BACKOFF_CAP_S} s), jittered"
        ),
    )
    ssl: bool = field(default=False, metadata=help_meta("connect over TLS"))
    root_certificates: Path | None = field(
        default=None, metadata=help_meta("PEM root certificates (with --ssl)")
    )
    private_key: Path | None = field(default=None, metadata=help_meta("PEM client private key (with --ssl)"))
    certificate_chain: Path | None = field(
        default=None, metadata=help_meta("PEM client certificate chain (with --ssl)")
    )
    header: list[tuple[str, str]] = field(
        default_factory=list,
        metadata=help_meta(
            "extra header sent with every call, e.g. for a proxy (repeatable)",
            parse=parse_header,
            append=True,
            metavar="KEY=VALUE",
        ),
    )

    def __post_init__(self) -> None:
        names = [key for key, _ in self.header]
        if len(set(names)) < len(names):
            raise ValueError(f"--header: a name is given more than once in {names}")


def read_interactions(path: Path) -> dict[str, np.ndarray]:
    """CSV or parquet -> column name -> numpy array (nulls become NaN/None and are rejected later)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        table = pq.read_table(path)
    elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        delimiter = "\t" if ".tsv" in name else ","
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    else:
        raise ValueError(f"--input {path}: expected a .csv, .tsv or .parquet file")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def format_table(ranked: Rankings, digits: int = 3) -> str:
    k = ranked.item_ids.shape[1] if len(ranked) else 0
    lines = [f"{'session_id':>12}  top-{k} item_id (score), best first"]
    for i in range(len(ranked)):
        pairs = "  ".join(
            f"{item} ({score:.{digits}f})" for item, score in zip(ranked.item_ids[i], ranked.scores[i])
        )
        lines.append(f"{ranked.session_id[i]:>12}  {pairs}")
    return "\n".join(lines)


parse_args = command_line(RankCommand, "python -m clients.rank", __doc__)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        columns = read_interactions(Path(a.input))
        ranked = rank_sessions(
            a.url,
            columns,
            top_k=a.top_k,
            batch_sessions=a.batch_sessions,
            concurrency=a.concurrency,
            timeout_s=a.timeout,
            retries=a.retries,
            backoff_s=a.backoff,
            ssl=a.ssl,
            root_certificates=a.root_certificates,
            private_key=a.private_key,
            certificate_chain=a.certificate_chain,
            headers=dict(a.header),
        )
    except (RankError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.as_json:
        out = sys.stdout
        for record in ranked.records():
            out.write(json.dumps(record) + "\n")
    else:
        print(format_table(ranked))
    print(f"ranked {len(ranked)} sessions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
