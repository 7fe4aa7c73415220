"""`ExportConfig`: what `python -m export` writes, each setting with its help text.

The fields own their defaults and help; `python -m export`'s flags are derived
from them (training/cli.py: defaults < --config file < explicit flags). The
export options recorded in the repository (`sessrec_export.json`,
`session_ranker_stateful/<v>/sessrec_run.json`) are `ExportConfig.options()`: every field but the
paths and the window, which change from version to version; `session_ranker/<v>/sessrec_run.json`
holds them without the stateful ensemble's own (`STATEFUL_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from training.cli import help_meta


class ExportError(RuntimeError):
    """The requested export cannot be made here (e.g. a GPU model step traced without CUDA)."""


# Fields that are not export options: where things are read and written, and which window is served.
NOT_OPTIONS = ("run", "data", "out", "window")
# Options of the stateful ensemble alone (session_ranker_stateful): not in session_ranker's run record.
STATEFUL_OPTIONS = ("session_idle_timeout_s", "max_live_sessions", "session_instances")


@dataclass
class ExportConfig:
    run: Path = field(metadata=help_meta("training run directory (model.pt, meta.json)"))
    data: Path = field(metadata=help_meta("prepared data directory (workflow/, schema.json)"))
    out: Path = field(default=Path("model_repository"), metadata=help_meta("model repository to (re)write"))
    top_k: int = field(default=20, metadata=help_meta("items returned per session (fixed in model.pt)"))
    torch_backend: str = field(
        default="python",
        metadata=help_meta(
            "python: Python-backend step running model.pt (embedded server); "
            "libtorch: platform pytorch_libtorch (NGC tritonserver container)",
            choices=("python", "libtorch"),
        ),
    )
    instance_kind: str = field(
        default="cpu", metadata=help_meta("model step instances", choices=("cpu", "gpu"))
    )
    max_batch_sessions: int = field(
        default=64,
        metadata=help_meta("model step max_batch_size, and the most sessions one request may carry"),
    )
    max_request_rows: int = field(default=65536, metadata=help_meta("most rows per request"))
    max_queue_delay_us: int = field(
        default=0, metadata=help_meta("model step dynamic batching delay (0: batch what is queued)")
    )
    torch_threads: int = field(
        default=0, metadata=help_meta("model step intra-op threads (0: half the cores, at most 4)")
    )
    model_instances: int = field(default=1, metadata=help_meta("model step instance count"))
    preprocess_instances: int = field(default=1, metadata=help_meta("preprocess instance count"))
    # Queue policy of every step (Triton's default_queue_policy, timeout_action REJECT).
    # A request that finds `max_queue_size` requests already queued at a step, or waits
    # there longer than `queue_timeout_us`, is answered UNAVAILABLE at once. Defaults:
    # 64 queued requests (8x the concurrency the benchmarks use) and 5 s (far above the
    # p99 of a 64-session request at concurrency 8 here, ~0.2 s). 0 disables either.
    max_queue_size: int = field(
        default=64,
        metadata=help_meta("requests a step may queue before Triton answers UNAVAILABLE (0: unbounded)"),
    )
    queue_timeout_us: int = field(
        default=5_000_000,
        metadata=help_meta(
            "microseconds a request may wait in a step's queue before it is answered UNAVAILABLE (0: no limit)"
        ),
    )
    # The stateful ensemble session_ranker_stateful (issue 18): the server holds each live session's last
    # clicks (export/sessrec_sessions.py). Serenade treats sessions idle for 20 minutes as empty and keeps
    # them 30 minutes; Triton's own default idle time (1 s) is far too short for shoppers.
    session_idle_timeout_s: int = field(
        default=1800,
        metadata=help_meta(
            "stateful ensemble: seconds a session may stay idle before the server forgets it (Triton's "
            "max_sequence_idle_microseconds and the step's own eviction; Triton sends no END on timeout)"
        ),
    )
    max_live_sessions: int = field(
        default=100_000,
        metadata=help_meta(
            "stateful ensemble: sessions each instance of preprocess_stateful holds (beyond it the least "
            "recently used is forgotten; Triton tracks twice as many sequences: max_candidate_sequences)"
        ),
    )
    session_instances: int = field(
        default=1, metadata=help_meta("stateful ensemble: preprocess_stateful instance count")
    )
    # Serve the state after window t (issue 12): the model of RUN/windows/<t>/ (train with
    # --keep-windows; or RUN itself when its last window is t) and only the vocabulary known
    # after t (training.data.serving_transform.known_prefix). None: RUN and the whole vocabulary.
    window: int | None = field(
        default=None,
        metadata=help_meta(
            "serve the state after this window: RUN/windows/<t>/ (train with --keep-windows) and only the "
            "vocabulary known after it (default: RUN and the whole vocabulary)"
        ),
    )

    def check(self) -> None:
        if self.torch_backend not in ("python", "libtorch"):
            raise ValueError(f"torch_backend must be 'python' or 'libtorch', got {self.torch_backend!r}")
        if self.instance_kind not in ("cpu", "gpu"):
            raise ValueError(f"instance_kind must be 'cpu' or 'gpu', got {self.instance_kind!r}")
        for name in (
            "top_k",
            "max_batch_sessions",
            "max_request_rows",
            "model_instances",
            "preprocess_instances",
            "session_idle_timeout_s",
            "max_live_sessions",
            "session_instances",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_delay_us", "torch_threads", "max_queue_size", "queue_timeout_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @staticmethod
    def option_names() -> list[str]:
        """The export options, in field order (what a repository records and a new version reuses)."""
        return [f.name for f in fields(ExportConfig) if f.name not in NOT_OPTIONS]

    def options(self, stateful: bool = True) -> dict[str, Any]:
        """{option: value} of this export (fields of ExportConfig only, also for a subclass). With
        stateful=False, without the stateful ensemble's own options: what `session_ranker`'s run record
        holds (the same as before the stateful ensemble existed)."""
        return {
            name: getattr(self, name)
            for name in self.option_names()
            if stateful or name not in STATEFUL_OPTIONS
        }
