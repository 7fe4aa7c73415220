"""gRPC clients of the `session_ranker` ensembles (the API lives in clients/ranking.py and clients/sessions.py).

    from clients import rank_sessions
    ranked = rank_sessions("127.0.0.1:8001", frame, top_k=10, concurrency=4)     # whole sessions, stateless

    from clients import SessionRanker
    with SessionRanker("127.0.0.1:8001", top_k=10) as ranker:                    # the server holds the session
        got = ranker.click(17, {"item_id": 42, ...})                              # the newest click only

Modules: `ranking` (rank_sessions: readiness, server limits, retries, TLS, headers), `sessions`
(SessionRanker: session_ranker_stateful, resends on the documented status), `rank` (python -m
clients.rank), `load` (bounded load, soak), `replay` (daily versions through one live server),
`perf_analyzer` (python -m clients.perf_analyzer), `demo` (make demo).
"""

from clients.ranking import BACKOFF_CAP_S, UNAVAILABLE, RankError, Rankings, plan_requests, rank_sessions
from clients.sessions import SessionRanker, SessionRanking, needs_resend

__all__ = [
    "BACKOFF_CAP_S",
    "UNAVAILABLE",
    "RankError",
    "Rankings",
    "SessionRanker",
    "SessionRanking",
    "needs_resend",
    "plan_requests",
    "rank_sessions",
]
