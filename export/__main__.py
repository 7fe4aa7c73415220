"""Export a training run as a native Triton ensemble.

    python -m export --run runs/synthetic --data data/synthetic --out model_repository
    python -m export --run RUN --data DATA --out REPO --top-k 20 --torch-backend libtorch --instance-kind gpu
    python -m export --run RUN --data DATA --out REPO --window 1              # serve the state after window 1
    python -m export --run RUN --data DATA --out REPO --window 2 --new-version  # stage version N+1 of everything
    SESSREC_ADMIN_KEY=... python -m export.versions --repo REPO --version N+1   # switch the live server to it

Writes `session_ranker` (platform "ensemble") with three steps: preprocess
(the fitted NVTabular workflow's semantics, numpy), model (the traced
TopKRanker: Python backend on the embedded server, or pytorch_libtorch for the
NGC container) and postprocess (encoded -> raw item ids). See
export/repository.py for the layout; serve it with `python -m export.serve`.

Refuses (exit status 2, message on stderr) a DATA whose workflow files do not
match the sha256 in its schema.json, a RUN trained on another workflow, and a
`--new-version` for a repository exported from other DATA or options.
"""

from __future__ import annotations

import argparse
import pickle  # only for its exception type: nothing here unpickles
import sys
import time
from pathlib import Path

from export.repository import ExportConfig, add_ensemble_version, export_repository


def parse_args(argv: list[str] | None = None) -> ExportConfig:
    return _parse(argv)[1]


def _parse(argv: list[str] | None = None) -> tuple[bool, ExportConfig]:
    """(--new-version given, the config)."""
    d = ExportConfig(run=Path(), data=Path(), out=Path())
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="training run directory (model.pt, meta.json)")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (workflow/, schema.json)")
    p.add_argument("--out", type=Path, default=Path("model_repository"), help="model repository to (re)write")
    p.add_argument("--top-k", type=int, default=d.top_k, help="items returned per session (fixed in model.pt)")
    p.add_argument(
        "--torch-backend",
        choices=("python", "libtorch"),
        default=d.torch_backend,
        help="python: Python-backend step running model.pt (embedded server); "
        "libtorch: platform pytorch_libtorch (NGC tritonserver container)",
    )
    p.add_argument("--instance-kind", choices=("cpu", "gpu"), default=d.instance_kind, help="model step instances")
    p.add_argument(
        "--max-batch-sessions",
        type=int,
        default=d.max_batch_sessions,
        help="model step max_batch_size, and the most sessions one request may carry",
    )
    p.add_argument("--max-request-rows", type=int, default=d.max_request_rows, help="most rows per request")
    p.add_argument(
        "--max-queue-delay-us", type=int, default=d.max_queue_delay_us, help="model step dynamic batching delay"
    )
    p.add_argument(
        "--torch-threads", type=int, default=d.torch_threads, help="model step intra-op threads (0: half the cores, at most 4)"
    )
    p.add_argument("--model-instances", type=int, default=d.model_instances, help="model step instance count")
    p.add_argument(
        "--preprocess-instances", type=int, default=d.preprocess_instances, help="preprocess instance count"
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=d.max_queue_size,
        help="requests a step may queue before Triton answers UNAVAILABLE (0: unbounded)",
    )
    p.add_argument(
        "--queue-timeout-us",
        type=int,
        default=d.queue_timeout_us,
        help="microseconds a request may wait in a step's queue before it is answered UNAVAILABLE (0: no limit)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="serve the state after this window: RUN/windows/<t>/ (train with --keep-windows) and only the "
        "vocabulary known after it (default: RUN and the whole vocabulary)",
    )
    p.add_argument(
        "--new-version",
        action="store_true",
        help="stage --run (after --window) as the next whole-repository version N+1 of --out: every step and the "
        "ensemble (other options are taken from that repository); python -m export.versions switches to it",
    )
    a = p.parse_args(argv)
    return a.new_version, ExportConfig(
        run=a.run,
        data=a.data,
        out=a.out,
        top_k=a.top_k,
        torch_backend=a.torch_backend,
        instance_kind=a.instance_kind,
        max_batch_sessions=a.max_batch_sessions,
        max_request_rows=a.max_request_rows,
        max_queue_delay_us=a.max_queue_delay_us,
        torch_threads=a.torch_threads,
        model_instances=a.model_instances,
        preprocess_instances=a.preprocess_instances,
        max_queue_size=a.max_queue_size,
        queue_timeout_us=a.queue_timeout_us,
        window=a.window,
    )


def main(argv: list[str] | None = None) -> int:
    from export.repository import ExportError
    from training.checkpoint import RunError
    from training.data.serving_transform import UnsupportedWorkflowError
    from training.integrity import IntegrityError

    new_version, cfg = _parse(argv)
    t0 = time.perf_counter()
    try:
        if new_version:
            version = add_ensemble_version(cfg)
        else:
            out = export_repository(cfg)
    # Errors that mean bad input or options (ValueError covers DataError and InputError); anything
    # else is a bug and stays a traceback.
    except (IntegrityError, RunError, ExportError, UnsupportedWorkflowError, ValueError, FileNotFoundError,
            FileExistsError, pickle.UnpicklingError) as e:  # UnpicklingError: torch.load(weights_only=True) refused a model.pt
        print(f"error: {e}", file=sys.stderr)
        return 2
    if new_version:
        print(f"staged {cfg.run} as version {version} of every model of {cfg.out} in {time.perf_counter() - t0:.1f} s")
        print("switch to it without downtime (server in explicit model-control mode, python -m export.serve's default):")
        print(f"  SESSREC_ADMIN_KEY=... python -m export.versions --url 127.0.0.1:8000 --repo {cfg.out} --version {version}")
        return 0
    print(f"wrote {out} ({cfg.torch_backend} model step, top-{cfg.top_k}) in {time.perf_counter() - t0:.1f} s")
    print(f"serve it: python -m export.serve --repo {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
