"""The main job end to end on CPU: prepare -> train -> export -> serve -> query, statelessly and click by click.

    python -m clients.demo --data data/topics --run runs/topics --repo model_repository

(`make demo` runs exactly this after `make setup`.)

1. writes a synthetic click log whose sessions have structure (training/data/topics.py: items in
   topics, shoppers browsing a topic, sometimes switching) and runs the NVTabular workflow on it
   (`training.prepare --input`, like a real log), printing the per-window summary;
2. trains the XLNet model window by window (`training.train`, the recipe for real logs: item memory,
   early stopping), printing per-window metrics next to the baselines;
3. writes the native Triton ensembles (`python -m export`);
4. starts the tritonserver binary from the nvidia-pytriton wheel on 127.0.0.1 (free ports), ranks a
   few real sessions of the last window's validation split over gRPC (`session_ranker`: whole
   sessions) and prints their top-k next items in RAW item ids, checked against the in-process model;
5. replays one of those sessions click by click through `session_ranker_stateful` (the server holds
   the session; each request carries the newest click only, clients.SessionRanker): after every click
   the top-k of the whole session so far, each item with its topic (category), so the rankings
   visibly follow the session; checked against the stateless answers of the same prefixes; stops the
   server.

`--prepare-args "--synthetic"` runs the reference example's generator instead (the reference
protocol: its clicks are drawn independently of the session, so every session gets much the same
popular items); `--prepare-args "--input FILE ..."` (the column flags of `training.prepare`) a real
click log.
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
    data: Path = field(default=Path("data/topics"), metadata=help_meta("DATA folder to (re)write"))
    run: Path = field(default=Path("runs/topics"), metadata=help_meta("RUN folder to (re)write"))
    repo: Path = field(default=Path("model_repository"), metadata=help_meta("model repository to (re)write"))
    seed: int = field(default=0, metadata=help_meta("seed of the synthetic data and of training"))
    prepare_args: str = field(
        default="",
        metadata=help_meta(
            "arguments for training.prepare (without --out/--seed); empty: the topic log of "
            "training/data/topics.py, written next to --data"
        ),
    )
    train_args: str = field(
        default="--epochs 4", metadata=help_meta("extra arguments for training.train, e.g. '--epochs 1'")
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


def _prepare_argv(args: DemoConfig) -> list[str]:
    """training.prepare's arguments: --prepare-args, or the topic log (written now) read as a click log."""
    if args.prepare_args.strip():
        return [*shlex.split(args.prepare_args), "--seed", str(args.seed), "--out", str(args.data)]
    from training.data.topics import TopicsConfig, prepare_args, write

    log = write(TopicsConfig(out=Path(args.data).with_name(Path(args.data).name + "-log.parquet"), seed=args.seed))
    print(f"topic click log: {log} (training/data/topics.py)", flush=True)
    return [*prepare_args(log), "--seed", str(args.seed), "--out", str(args.data)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from clients.rank import format_table
    from clients.ranking import rank_sessions
    from export.__main__ import main as export_main
    from export.tritonserver import ServerConfig, TritonServer
    from training.prepare import main as prepare_main
    from training.train import main as train_main

    t0 = time.perf_counter()
    _banner("1/5 prepare: click log -> NVTabular workflow -> sessions_by_day")
    rc = prepare_main(_prepare_argv(args))
    if rc:
        return rc

    _banner("2/5 train: XLNet window by window (CPU unless a GPU is there)")
    rc = train_main(
        ["--data", str(args.data), "--out", str(args.run), "--seed", str(args.seed), "--no-progress",
         *shlex.split(args.train_args)]
    )  # fmt: skip
    if rc:
        return rc

    _banner("3/5 export: native Triton ensembles (preprocess | preprocess_stateful) -> model -> postprocess")
    rc = export_main(["--run", str(args.run), "--data", str(args.data), "--out", str(args.repo)])
    if rc:
        return rc

    _banner("4/5 serve on 127.0.0.1 and rank real sessions over gRPC (whole sessions)")
    rows = pick_sessions(args.data, args.sessions)
    cfg = ServerConfig(repo=args.repo, grpc_port=0, http_port=0, metrics_port=0, model_control="explicit")
    with TritonServer(cfg) as server:
        print(f"tritonserver ready: gRPC {server.grpc_url}  HTTP {server.http_url}", flush=True)
        ranked = rank_sessions(server.grpc_url, rows, top_k=args.top_k)
        print(format_table(ranked))
        mismatch = _check_offline(args.run, args.data, rows, ranked)
        if mismatch:
            print(f"ERROR: served rankings differ from the in-process model: {mismatch}", file=sys.stderr)
            return 1
        print(f"served rankings = in-process model rankings for {len(ranked)} sessions")
        _banner("5/5 one session click by click: the server holds it, each request is the newest click")
        wrong = grow_session(server.grpc_url, args.data, rows, args.top_k)
    print("server stopped", flush=True)
    if wrong:
        print(f"ERROR: stateful rankings differ from the stateless ones: {wrong}", file=sys.stderr)
        return 1
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def grow_session(url: str, data: Path, rows: dict[str, np.ndarray], top_k: int) -> str | None:
    """Click through the longest of `rows`' sessions with clients.SessionRanker, printing after every
    click the ranking with each item's category (topic); compare with the stateless answers of the
    same prefixes. Returns a description of the first difference, or None."""
    import pandas as pd

    from clients.ranking import rank_sessions, same_ranking
    from clients.sessions import SessionRanker
    from training.names import CATEGORY_COL, INTERACTIONS_FILE, ITEM_COL, SESSION_COL

    sids, counts = np.unique(rows[SESSION_COL], return_counts=True)
    sid = int(sids[np.argmax(counts)])
    mine = {c: v[rows[SESSION_COL] == sid] for c, v in rows.items()}
    log = pd.read_parquet(Path(data) / INTERACTIONS_FILE, columns=[ITEM_COL, *([CATEGORY_COL] if CATEGORY_COL in rows else [])])
    topic = dict(zip(log[ITEM_COL], log[CATEGORY_COL])) if CATEGORY_COL in log else {}
    n = len(mine[SESSION_COL])
    prefixes = {c: np.concatenate([v[: j + 1] for j in range(n)]) for c, v in mine.items()}
    prefixes[SESSION_COL] = np.repeat(np.arange(1, n + 1), np.arange(1, n + 1))
    whole = rank_sessions(url, prefixes, top_k=top_k)
    print(f"session {sid}, {n} clicks; top-{top_k} after each click, each item as id(topic):")
    with SessionRanker(url, top_k=top_k) as ranker:
        for j in range(n):
            click = {c: v[j] for c, v in mine.items() if c != SESSION_COL}
            got = ranker.click(sid, click, end=j == n - 1)
            item = int(mine[ITEM_COL][j])
            shown = " ".join(f"{i}({topic.get(int(i), '?')})" for i in got.item_ids)
            same = sum(topic.get(int(i)) == topic.get(item) for i in got.item_ids) if topic else 0
            print(f"  click {j + 1}: {item}({topic.get(item, '?')}) -> {shown}"
                  + (f"   [{same}/{top_k} of its topic]" if topic else ""), flush=True)  # fmt: skip
            if not same_ranking(whole.item_ids[j], whole.scores[j], got.item_ids, got.scores):
                return f"click {j + 1}: {got.item_ids.tolist()} vs {whole.item_ids[j].tolist()}"
    print(f"stateful rankings = stateless rankings of the same {n} prefixes (one request per click, "
          f"{ranker.stats['requests']} requests, {ranker.stats['resent_not_held']} resent)")  # fmt: skip
    return None


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
