"""Export a training run as a native Triton ensemble.

    python -m export --run runs/synthetic --data data/synthetic --out model_repository
    python -m export --run RUN --data DATA --out REPO --top-k 20 --torch-backend libtorch --instance-kind gpu

Writes `session_ranker` (platform "ensemble") with three steps: preprocess
(the fitted NVTabular workflow's semantics, numpy), model (the traced
TopKRanker: Python backend on the embedded server, or pytorch_libtorch for the
NGC container) and postprocess (encoded -> raw item ids). See
export/repository.py for the layout; serve it with `python -m export.serve`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.repository import ExportConfig, export_repository


def parse_args(argv: list[str] | None = None) -> ExportConfig:
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
    a = p.parse_args(argv)
    return ExportConfig(
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
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    out = export_repository(cfg)
    print(f"wrote {out} ({cfg.torch_backend} model step, top-{cfg.top_k}) in {time.perf_counter() - t0:.1f} s")
    print(f"serve it: python -m export.serve --repo {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
