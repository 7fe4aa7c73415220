"""Replay a run window by window through ONE live server, swapping whole-ensemble versions (issue 12).

    python -m clients.replay --data DATA --run RUN --repo REPO --out REPLAY.json [--eval-split valid]

RUN must be trained with `--keep-windows` (RUN/windows/<t>/ holds the model after window t).
For every trained window t (RUN/metrics.json rows, in order):

1. the state after t is exported as the next whole-repository version of REPO (the first
   window: a fresh export, version 1; then `add_ensemble_version`: preprocess with the
   vocabulary known after t, the model of RUN/windows/<t>, postprocess, ensemble);
2. the live server switches to it (`export.versions.swap_to`: steps first, then the ensemble
   re-pinned atomically; explicit model control, admin key);
3. every evaluation session of window t+1 (DATA/sessions_by_day/<t+1>/<split>.parquet) is
   sent as raw rows of DATA/interactions.parquet: the rows that make up the offline input,
   i.e. the session's rows minus the last one; a session longer than the stored max_len
   (schema.json max_sequence_length, 20) is stored as its last max_len rows, so only its
   last max_len - 1 rows before the last are sent (served = offline);
4. the served top-k (raw ids) is scored against the last click's raw id with the tie rule of
   training/metrics.py (pessimistic: a tie counts against the target; only ties inside the
   served top-k are visible here) and compared with the window's offline metrics in
   RUN/metrics.json.

A background thread keeps sending requests (a fixed set of sessions) during the whole
replay, swaps included, and counts every failed request (no retries anywhere: a failure is
a failure). A second one clicks through the same sessions on the stateful ensemble
(clients.SessionRanker, issue 18) and compares every answer with the stateless answer of the
same prefix from the same version: a switch mid-session must cost no failed click and no wrong
ranking (the ranker resends the session to the new version). REPLAY.json:
{"windows": [{"train_window", "eval_window", "version", "items_known", "sessions", "ndcg@20",
"recall@20", "mrr@20", "offline": {...}, "max_abs_diff", "items_seen", "failed_requests", "swap_seconds"}],
"skipped_windows": [t: trained nothing or knows < k items], "swaps": n, "background_requests": n, "background_failed_requests": n,
"stateful_background": {"clicks", "failed", "wrong", "compared", "requests", "resent_not_held", ...}}.
Exit status 1 when served != offline (beyond --tolerance) or any request failed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.cli import command_line, help_meta
from training.names import (
    FIRST_REAL_ID,
    INTERACTIONS_FILE,
    ITEM_COL,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    SESSION_COL,
    WINDOW_COL,
)

METRICS = ("ndcg@20", "recall@20", "mrr@20")
K = 20


@dataclass
class ReplayConfig:
    data: Path = field(metadata=help_meta("prepared DATA folder (schema.json, interactions.parquet)"))
    run: Path = field(
        metadata=help_meta("run trained with --keep-windows (RUN/windows/<t>) and metrics.json")
    )
    repo: Path = field(metadata=help_meta("model repository to write and serve (replaced)"))
    out: Path = field(metadata=help_meta("REPLAY.json to write"))
    eval_split: str = field(
        default="valid",
        metadata=help_meta(
            "split of window t+1 sent for window t (match training's --eval-split)", choices=("valid", "test")
        ),
    )
    batch_sessions: int = field(default=64, metadata=help_meta("sessions per evaluation request"))
    background_sessions: int = field(default=4, metadata=help_meta("sessions per background request"))
    tolerance: float = field(default=1e-6, metadata=help_meta("allowed |served - offline| per metric"))
    torch_backend: str = "python"  # the model step's backend (no flag: the embedded server runs "python")


def served_ranks(item_ids: np.ndarray, scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(S, k) served raw ids + scores, (S,) raw targets -> (S,) pessimistic ranks (inf: not served)."""
    ranks = np.full(len(targets), np.inf)
    for i, (ids, sc, t) in enumerate(zip(item_ids, scores, targets)):
        hit = np.flatnonzero(ids == t)
        if len(hit):
            ranks[i] = 1 + int((sc >= sc[hit[0]]).sum()) - 1  # ties inside the top-k count against it
    return ranks


def eval_requests(
    data: Path, window: int, split: str, max_len: int, interactions
) -> tuple[object, np.ndarray]:
    """(raw rows to send: the offline inputs of window's `split` sessions, raw targets per session in
    order of first appearance)."""
    import pandas as pd

    from training.data.splits import split_path

    sessions = pd.read_parquet(split_path(data, window, split), columns=[SESSION_COL])[SESSION_COL].to_numpy()
    rows = interactions[interactions[SESSION_COL].isin(set(sessions.tolist()))]
    parts, targets, order = [], [], []
    for sid, g in rows.groupby(SESSION_COL, sort=False):
        g = g.iloc[-max_len:]  # the stored list: the last max_len rows
        parts.append(g.iloc[:-1])  # offline input: all but the last
        targets.append(int(g[ITEM_COL].iloc[-1]))
        order.append(sid)
    if len(order) != len(set(sessions.tolist())):
        raise ValueError(
            f"window {window} {split}: {len(set(sessions.tolist())) - len(order)} sessions have no rows "
            f"in {data / INTERACTIONS_FILE}"
        )
    return pd.concat(parts), np.asarray(targets, dtype=np.int64)


def infer(client, frame, raw_inputs: dict[str, str], with_version: bool = False) -> tuple:
    """One request of raw rows to the ensemble (no readiness probe, no retry: the server's answer
    as it is; strict readiness is false while a version loads, yet the ensemble serves).
    Returns (session ids, item ids [S, k], scores [S, k]) (+ the ensemble version that answered
    with `with_version`); raises on any error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from training.names import ENSEMBLE_NAME

    inputs = []
    for name, dt in raw_inputs.items():
        values = frame[name].to_numpy().astype(dt)
        inp = grpcclient.InferInput(name, list(values.shape), np_to_triton_dtype(values.dtype))
        inp.set_data_from_numpy(values)
        inputs.append(inp)
    res = client.infer(ENSEMBLE_NAME, inputs, client_timeout=60.0)
    sids = res.as_numpy(OUT_SESSION_ID)
    want = frame[SESSION_COL].drop_duplicates().to_numpy()
    if not np.array_equal(sids, want):
        raise RuntimeError(f"answer holds sessions {sids[:5]}..., the request {want[:5]}...")
    out = (sids, res.as_numpy(OUT_ITEM_IDS), res.as_numpy(OUT_SCORES))
    return (*out, res.get_response().model_version) if with_version else out


class Background:
    """Sends requests in a loop from a thread until stopped; counts sent and failed ones."""

    def __init__(self, url: str, frame, raw_inputs: dict[str, str]):
        self.url, self.frame, self.raw_inputs = url, frame, raw_inputs
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        while not self._stop.is_set():
            try:
                infer(client, self.frame, self.raw_inputs)
            except Exception as e:  # noqa: BLE001  every failure is counted and reported
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {str(e)[:300]}")
            self.sent += 1
        client.close()

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StatefulBackground(Background):
    """Shoppers clicking through the stateful ensemble during the whole replay, swaps included: each
    session of `frame` click by click through clients.SessionRanker (a fresh session id per round, END
    on its last click), and after every click the same prefix sent whole to session_ranker. An answer
    counts as wrong when both came from the same ensemble version and differ (other item ids, or scores
    further than 1e-5 apart); a click that raises counts as failed. A switch makes the next click of a
    live session go to the new version, which does not hold it: the ranker resends (stats)."""

    def __init__(self, url: str, frame, raw_inputs: dict[str, str]):
        super().__init__(url, frame, raw_inputs)
        self.clicks = self.compared = self.wrong = 0
        self.stats: dict[str, int] = {}

    def _run(self) -> None:
        import tritonclient.grpc as grpcclient

        from clients.sessions import SessionRanker

        client = grpcclient.InferenceServerClient(self.url)
        cols = [c for c in self.raw_inputs if c != SESSION_COL]
        groups = [g for _, g in self.frame.groupby(SESSION_COL, sort=False)]
        with SessionRanker(self.url) as ranker:
            rounds = 0
            while not self._stop.is_set():
                rounds += 1
                for n, g in enumerate(groups):
                    key = rounds * 1_000_000 + n + 1
                    for j in range(len(g)):
                        if self._stop.wait(0.005):  # a shopper's pause, short: keeps the CPU for the replay
                            break
                        self._click(ranker, client, key, g, j, cols)
            self.stats = dict(ranker.stats)
        client.close()

    def _click(self, ranker, client, key: int, g, j: int, cols: list[str]) -> None:
        self.clicks += 1
        try:
            got = ranker.click(key, {c: g[c].to_numpy()[j] for c in cols}, end=j == len(g) - 1)
            whole = infer(client, g.iloc[: j + 1], self.raw_inputs, with_version=True)
        except Exception as e:  # noqa: BLE001  every failure is counted and reported
            self.failed += 1
            self.errors.append(f"{type(e).__name__}: {str(e)[:300]}")
            return
        _, ids, scores, version = whole
        if version == got.version:
            self.compared += 1
            if not (np.array_equal(ids[0], got.item_ids) and np.allclose(scores[0], got.scores, atol=1e-5, rtol=0)):
                self.wrong += 1
                self.errors.append(f"session {key} click {j + 1} on version {version}: stateful != stateless")


def replay(cfg: ReplayConfig, log=print) -> dict:
    import pandas as pd

    from export.repository import ExportConfig, add_ensemble_version, export_repository
    from export.tritonserver import ServerConfig, TritonServer
    from export.versions import swap_to
    from training.checkpoint import WINDOWS_DIR
    from training.schema import Schema

    schema = Schema.load(cfg.data)
    rows = json.loads((Path(cfg.run) / "metrics.json").read_text())["windows"]
    rows = [r for r in rows if (Path(cfg.run) / WINDOWS_DIR / str(r["train_window"]) / "meta.json").is_file()]
    # a window that trained nothing (no sessions: nothing known, e.g. DIGINETICA's window 1) or knows
    # fewer items than a top-k needs cannot be served: skipped, and said so in REPLAY.json
    skipped = [r["train_window"] for r in rows if r.get("skipped") or r.get("items_known", K + 3) < K + 3]
    rows = [r for r in rows if r["train_window"] not in skipped]
    if skipped:
        log(f"[replay] skipping windows {skipped}: nothing trained or fewer than {K} items known")
    if not rows:
        raise FileNotFoundError(f"{cfg.run} has no RUN/{WINDOWS_DIR}/<t>: train with --keep-windows")
    split = rows[0].get("eval_split", "valid")
    if split != cfg.eval_split:
        log(
            f"[replay] note: the run evaluated on {split!r}, the replay on {cfg.eval_split!r}: metrics will differ"
        )
    interactions = pd.read_parquet(Path(cfg.data) / INTERACTIONS_FILE)
    session_window = interactions.groupby(SESSION_COL)[WINDOW_COL].transform("min")

    def export(t: int, new: bool) -> int:
        ecfg = ExportConfig(
            run=cfg.run, data=cfg.data, out=cfg.repo, window=t, torch_backend=cfg.torch_backend
        )
        if new:
            return add_ensemble_version(ecfg)
        export_repository(ecfg)
        return 1

    t0 = rows[0]["train_window"]
    version = export(t0, new=False)
    first_window = interactions[
        interactions[SESSION_COL].isin(
            interactions[SESSION_COL].drop_duplicates().iloc[: cfg.background_sessions]
        )
    ]
    out_rows, swaps = [], 0
    server = TritonServer(
        ServerConfig(repo=cfg.repo, grpc_port=0, http_port=0, metrics_port=0, model_control="explicit")
    )
    import tritonclient.grpc as grpcclient

    raw = dict(schema.raw_inputs)
    with server, Background(server.grpc_url, first_window, raw) as bg, \
            StatefulBackground(server.grpc_url, first_window, raw) as sbg:  # fmt: skip
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for r in rows:
            t = r["train_window"]
            swap_s = 0.0
            if t != t0:
                version = export(t, new=True)
                swap_s = swap_to(server.http_url, cfg.repo, version, server.admin_headers)
                swaps += 1
            record = json.loads(
                (Path(cfg.repo) / "session_ranker" / str(version) / "sessrec_run.json").read_text()
            )
            frame, targets = eval_requests(
                Path(cfg.data), t + 1, cfg.eval_split, schema.max_len, interactions
            )
            failed, ids, scores = 0, [], []
            sids = frame[SESSION_COL].drop_duplicates().to_numpy()
            for i in range(0, len(sids), cfg.batch_sessions):
                part = frame[frame[SESSION_COL].isin(set(sids[i : i + cfg.batch_sessions].tolist()))]
                try:
                    _, got_ids, got_scores = infer(client, part, raw)
                    ids.append(got_ids)
                    scores.append(got_scores)
                except Exception as e:  # noqa: BLE001  counted, reported, and a miss for its sessions
                    failed += 1
                    log(f"[replay] window {t}: request failed: {e}")
                    n = len(sids[i : i + cfg.batch_sessions])
                    ids.append(np.full((n, K), -1, dtype=np.int64))
                    scores.append(np.zeros((n, K), dtype=np.float32))
            from training.metrics import metrics_from_ranks

            served = metrics_from_ranks(served_ranks(np.concatenate(ids), np.concatenate(scores), targets))
            offline = {m: r.get(m) for m in METRICS}
            diff = max(abs(served[m] - offline[m]) for m in METRICS if offline[m] is not None)
            out_rows.append({
                "train_window": t, "eval_window": t + 1, "version": version,
                "items_known": record["items_known"], "sessions": len(targets),
                # distinct items clicked in the sessions of windows <= t (a session's window is its first
                # click's, as for the splits and vocabulary_by_window), plus the special ids
                "items_seen": int(interactions.loc[session_window <= t, ITEM_COL].nunique()) + FIRST_REAL_ID,
                **{m: served[m] for m in METRICS}, "offline": offline, "max_abs_diff": diff,
                "failed_requests": failed, "swap_seconds": round(swap_s, 2),
            })  # fmt: skip
            log(
                f"[replay] window {t}->{t + 1} v{version}: items_known {record['items_known']} sessions {len(targets)} "
                + " ".join(f"{m} {served[m]:.6f}/{offline[m]:.6f}" for m in METRICS)
                + f" failed {failed}"
            )
        client.close()
        time.sleep(0.5)
    result = {
        "windows": out_rows,
        "skipped_windows": skipped,
        "swaps": swaps,
        "background_requests": bg.sent,
        "background_failed_requests": bg.failed,
        "background_errors": bg.errors[:5],
        "stateful_background": {
            "clicks": sbg.clicks, "failed": sbg.failed, "wrong": sbg.wrong, "compared": sbg.compared,
            **{k: v for k, v in sbg.stats.items()}, "errors": sbg.errors[:5],
        },  # fmt: skip
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict) -> None:
    print(
        f"{'window':>9} {'ver':>3} {'items':>6} {'sess':>5} "
        + " ".join(f"{m + ' served/offline':>26}" for m in METRICS)
        + f" {'failed':>6}"
    )
    for w in result["windows"]:
        cells = " ".join(f"{w[m]:>12.6f} / {w['offline'][m]:<11.6f}" for m in METRICS)
        print(
            f"{w['train_window']:>4}->{w['eval_window']:<4} {w['version']:>3} {w['items_known']:>6} "
            f"{w['sessions']:>5} {cells} {w['failed_requests']:>6}"
        )
    print(
        f"swaps {result['swaps']}, background requests {result['background_requests']}, "
        f"failed {result['background_failed_requests']}"
    )
    st = result.get("stateful_background", {})
    print(
        f"stateful background: {st.get('clicks')} clicks, failed {st.get('failed')}, wrong {st.get('wrong')} "
        f"of {st.get('compared')} compared with the stateless answer of the same version, "
        f"resent {st.get('resent_not_held', 0)} (not held) / {st.get('resent_mismatch', 0)} (mismatch)"
    )


def check(result: dict, tolerance: float) -> list[str]:
    """What is wrong with a replay (empty: served = offline, nothing failed, vocabulary grew)."""
    bad = []
    prev = 0
    for w in result["windows"]:
        if w["max_abs_diff"] > tolerance:
            bad.append(f"window {w['train_window']}: served != offline (max diff {w['max_abs_diff']:.2e})")
        if w["failed_requests"]:
            bad.append(f"window {w['train_window']}: {w['failed_requests']} failed requests")
        if w["items_known"] > w["items_seen"]:
            bad.append(
                f"window {w['train_window']}: items_known {w['items_known']} > items seen {w['items_seen']}"
            )
        if w["items_known"] < prev:
            bad.append(f"window {w['train_window']}: items_known shrank ({prev} -> {w['items_known']})")
        prev = w["items_known"]
    stateful = result.get("stateful_background", {})
    if stateful.get("failed") or stateful.get("wrong") or not stateful.get("compared"):
        bad.append(
            f"stateful background: {stateful.get('failed')} failed, {stateful.get('wrong')} wrong of "
            f"{stateful.get('compared')} compared clicks: {stateful.get('errors')}"
        )
    if result["background_failed_requests"]:
        bad.append(
            f"{result['background_failed_requests']} background requests failed: {result['background_errors']}"
        )
    return bad


parse_args = command_line(ReplayConfig, "python -m clients.replay", __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = replay(cfg, log=lambda m: print(m, file=sys.stderr))
    print_table(result)
    bad = check(result, cfg.tolerance)
    for b in bad:
        print(f"error: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
