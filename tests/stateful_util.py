"""Helpers of the stateful-path tests: every prefix of real sessions, ranked statelessly and click by click.

    frame = prefixes(sessions)                          # one relabelled session per prefix
    want = stateless_prefix_rankings(url, sessions)      # {(session, clicks): (item_ids, scores)}
    got = replay_clicks(ranker, sessions, threads=4)     # the same keys, through session_ranker_stateful
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import numpy as np
import pandas as pd

from clients import SessionRanker, rank_sessions
from clients.ranking import same_ranking
from training.names import SESSION_COL


def sessions_of(interactions: pd.DataFrame, raw_inputs: dict[str, str], ids) -> dict[int, pd.DataFrame]:
    """{session id: its raw rows (raw_inputs' columns and dtypes), file order}, for `ids`."""
    rows = interactions[interactions[SESSION_COL].isin(set(int(i) for i in ids))]
    return {
        int(sid): pd.DataFrame({c: g[c].to_numpy().astype(dt) for c, dt in raw_inputs.items()})
        for sid, g in rows.groupby(SESSION_COL, sort=False)
    }


def stateless_prefix_rankings(url: str, sessions: dict[int, pd.DataFrame], top_k: int | None = None) -> dict:
    """{(session, clicks): (item_ids, scores)} of every prefix, sent as whole sessions to session_ranker
    (each prefix relabelled as its own session: the id only groups rows)."""
    parts, keys = [], []
    for sid, g in sessions.items():
        for j in range(1, len(g) + 1):
            p = g.iloc[:j].copy()
            p[SESSION_COL] = len(keys) + 1
            parts.append(p)
            keys.append((sid, j))
    ranked = rank_sessions(url, pd.concat(parts, ignore_index=True), top_k=top_k, batch_sessions=64, concurrency=2)
    assert ranked.session_id.tolist() == list(range(1, len(keys) + 1))
    return {key: (ranked.item_ids[i], ranked.scores[i]) for i, key in enumerate(keys)}


def replay_clicks(ranker: SessionRanker, sessions: dict[Hashable, pd.DataFrame], threads: int = 1,
                  end: bool = True) -> dict:  # fmt: skip
    """Every session click by click through the stateful ensemble; `threads` workers, each interleaving
    its sessions (one click of each in turn). Returns {(session, clicks): SessionRanking}; the last
    click of each session carries END when `end`."""
    out, lock, errors = {}, threading.Lock(), []
    keys = list(sessions)

    def work(mine: list) -> None:
        try:
            longest = max((len(sessions[k]) for k in mine), default=0)
            for j in range(longest):
                for k in mine:
                    g = sessions[k]
                    if j >= len(g):
                        continue
                    row = {c: g[c].to_numpy()[j] for c in g.columns if c != SESSION_COL}
                    got = ranker.click(k, row, end=end and j == len(g) - 1)
                    with lock:
                        out[(k, j + 1)] = got
        except Exception as e:  # noqa: BLE001  re-raised in the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(keys[w::threads],)) for w in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return out


def differences(got: dict, want: dict, atol: float = 1e-5) -> tuple[list, int]:
    """(keys whose stateful ranking is not the stateless one, how many have identical item ids). Not the
    same ranking: scores further than `atol` apart, or other items than a swap among items tied to
    `atol` (clients.ranking.same_ranking): a session's scores move in the last bits with the other
    sessions the model step batched it with (another GEMM shape)."""
    assert sorted(got, key=str) == sorted(want, key=str), "not the same prefixes"
    bad = [key for key in want if not same_ranking(want[key][0], want[key][1], got[key].item_ids, got[key].scores, atol)]
    exact = sum(np.array_equal(got[key].item_ids, want[key][0]) for key in want)
    return bad, exact
