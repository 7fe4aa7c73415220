"""gRPC clients of the `session_ranker` ensemble (the API lives in clients/ranking.py).

    from clients import rank_sessions
    ranked = rank_sessions("127.0.0.1:8001", frame, top_k=10, concurrency=4)

Modules: `ranking` (rank_sessions: readiness, server limits, retries, TLS, headers),
`rank` (python -m clients.rank), `load` (bounded load, soak), `replay` (daily versions
through one live server), `demo` (make demo).
"""

from clients.ranking import BACKOFF_CAP_S, UNAVAILABLE, RankError, Rankings, plan_requests, rank_sessions

__all__ = ["BACKOFF_CAP_S", "UNAVAILABLE", "RankError", "Rankings", "plan_requests", "rank_sessions"]
