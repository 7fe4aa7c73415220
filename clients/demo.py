"""The main job end to end on CPU: prepare -> train -> export -> serve -> query.

    python -m clients.demo --data data/synthetic --run runs/synthetic --repo model_repository

(`make demo` runs exactly this after `make setup`.)

1. generates the reference example's synthetic click log and runs the NVTabular
   workflow on it (`training.prepare`), printing the per-window summary;
2. trains the XLNet masked-LM model window by window with the reference protocol
   (`training.train`), printing per-window metrics next to the baselines;
3. writes the native Triton ensemble (`python -m export`);
4. starts the tritonserver binary from the nvidia-pytriton wheel on 127.0.0.1
   (free ports), replays a few real sessions of the last window's validation
   split over gRPC and prints their top-k next items in RAW item ids;
5. checks those answers against the in-process model and stops the server.

Pass `--input FILE` plus the column flags of `training.prepare` via
`--prepare-args` to run the same job on a real click log.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.cli import command_line, help_meta


@dataclass
class DemoConfig:
    data: Path = field(default=Path("data/synthetic"), metadata=help_meta("DATA folder to (re)write"))
    run: Path = field(default=Path("runs/synthetic"), metadata=help_meta("RUN folder to (re)write"))
    repo: Path = field(default=Path("model_repository"), metadata=help_meta("model repository to (re)write"))
    seed: int = field(default=0, metadata=help_meta("seed of the synthetic data and of training"))
    prepare_args: str = field(
        default="--synthetic", metadata=help_meta("arguments for training.prepare (without --out/--seed)")
    )
    train_args: str = field(
        default="", metadata=help_meta("extra arguments for training.train, e.g. '--epochs 1'")
    )
    sessions: int = field(default=5, metadata=help_meta("sessions to rank through the server"))
    top_k: int = field(default=10, metadata=help_meta("items shown per session"))


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def pick_sessions(data: Path, how_many: int) -> dict[str, np.ndarray]:
    """Raw interaction rows of `how_many` sessions from the last window's validation split."""
    import pyarrow.parquet as pq

    from training.names import INTERACTIONS_FILE, SESSION_COL, SESSIONS_DIR, WINDOW_COL

    windows = sorted(int(p.name) for p in (data / SESSIONS_DIR).iterdir() if p.name.isdigit())
    for w in reversed(windows):
        valid = pq.read_table(data / SESSIONS_DIR / str(w) / "valid.parquet", columns=[SESSION_COL])
        if valid.num_rows:
            wanted = valid.column(SESSION_COL).to_numpy()[:how_many]
            break
    else:
        raise SystemExit(f"{data}: no validation sessions in any window")
    table = pq.read_table(data / INTERACTIONS_FILE)
    cols = {c: table.column(c).to_numpy() for c in table.column_names if c != WINDOW_COL}
    keep = np.isin(cols[SESSION_COL], wanted)
    return {c: v[keep] for c, v in cols.items()}


parse_args = command_line(DemoConfig, "python -m clients.demo", __doc__)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from clients.rank import format_table
    from clients.ranking import rank_sessions
    from export.__main__ import main as export_main
    from export.tritonserver import ServerConfig, TritonServer
    from training.prepare import main as prepare_main
    from training.train import main as train_main

    t0 = time.perf_counter()
    _banner("1/4 prepare: click log -> NVTabular workflow -> sessions_by_day")
    rc = prepare_main([*shlex.split(args.prepare_args), "--seed", str(args.seed), "--out", str(args.data)])
    if rc:
        return rc

    _banner("2/4 train: XLNet masked LM, window by window (CPU unless a GPU is there)")
    rc = train_main(
        [
            "--data",
            str(args.data),
            "--out",
            str(args.run),
            "--seed",
            str(args.seed),
            "--no-progress",
            *shlex.split(args.train_args),
        ]
    )
    if rc:
        return rc

    _banner("3/4 export: native Triton ensemble preprocess -> model -> postprocess")
    rc = export_main(["--run", str(args.run), "--data", str(args.data), "--out", str(args.repo)])
    if rc:
        return rc

    _banner("4/4 serve on 127.0.0.1 and rank real sessions over gRPC")
    rows = pick_sessions(args.data, args.sessions)
    cfg = ServerConfig(repo=args.repo, grpc_port=0, http_port=0, metrics_port=0)
    with TritonServer(cfg) as server:
        print(f"tritonserver ready: gRPC {server.grpc_url}  HTTP {server.http_url}", flush=True)
        ranked = rank_sessions(server.grpc_url, rows, top_k=args.top_k)
        print(format_table(ranked))
    print("server stopped", flush=True)

    mismatch = _check_offline(args.run, args.data, rows, ranked)
    if mismatch:
        print(f"ERROR: served rankings differ from the in-process model: {mismatch}", file=sys.stderr)
        return 1
    print(f"served rankings = in-process model rankings for {len(ranked)} sessions")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _check_offline(run: Path, data: Path, rows: dict[str, np.ndarray], ranked) -> str | None:
    """Rank the same raw rows in-process; return a description of the first difference."""
    import torch

    from training.checkpoint import load_run
    from training.data.serving_transform import ServingTransform
    from training.names import LENGTHS_TENSOR, SESSION_COL

    model, _ = load_run(run)
    model.eval()
    transform = ServingTransform.load(data)
    feats = transform(rows)
    vocab = transform.item_vocabulary()
    k = ranked.item_ids.shape[1]
    with torch.inference_mode():
        tensors = {n: torch.from_numpy(feats[n]) for n in model.cfg.feature_names}
        scores = model.next_item_scores(tensors, torch.from_numpy(feats[LENGTHS_TENSOR]))
        top_scores, top_ids = torch.topk(scores, k, dim=1)
    if not np.array_equal(feats[SESSION_COL], ranked.session_id):
        return f"session order {feats[SESSION_COL].tolist()} vs {ranked.session_id.tolist()}"
    if not np.array_equal(vocab[top_ids.numpy()], ranked.item_ids):
        return "item ids"
    if not np.allclose(top_scores.numpy(), ranked.scores, atol=1e-5, rtol=0):
        return "scores beyond 1e-5"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
