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
export/repository.py for the layout and export/golden/ for the config.pbtxt of each
step; serve it with `python -m export.serve`. Every flag is a field of
ExportConfig (export/config.py); `--config FILE` (JSON) sets any of them, flags win.

Refuses (exit status 2, message on stderr) a DATA whose workflow files do not
match the sha256 in its schema.json, a RUN trained on another workflow, and a
`--new-version` for a repository exported from other DATA or options.
"""

from __future__ import annotations

import pickle  # only for its exception type: nothing here unpickles
import sys
import time
from dataclasses import dataclass, field

from export.repository import ExportConfig, add_ensemble_version, export_repository
from training.cli import command_line, help_meta


@dataclass
class ExportCommand(ExportConfig):
    """ExportConfig plus what the command does with it: a fresh repository or the next version."""

    new_version: bool = field(
        default=False,
        metadata=help_meta(
            "stage --run (after --window) as the next whole-repository version N+1 of --out: every step and "
            "the ensemble (other options are taken from that repository); python -m export.versions switches to it"
        ),
    )


parse_args = command_line(ExportCommand, "python -m export", __doc__)


def main(argv: list[str] | None = None) -> int:
    from export.repository import ExportError
    from training.checkpoint import RunError
    from training.data.serving_transform import UnsupportedWorkflowError
    from training.integrity import IntegrityError

    cfg = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if cfg.new_version:
            version = add_ensemble_version(cfg)
        else:
            out = export_repository(cfg)
    # Errors that mean bad input or options (ValueError covers DataError and InputError); anything
    # else is a bug and stays a traceback.
    except (
        IntegrityError,
        RunError,
        ExportError,
        UnsupportedWorkflowError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        pickle.UnpicklingError,
    ) as e:  # UnpicklingError: torch.load(weights_only=True) refused a model.pt
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.new_version:
        print(
            f"staged {cfg.run} as version {version} of every model of {cfg.out} in {time.perf_counter() - t0:.1f} s"
        )
        print(
            "switch to it without downtime (server in explicit model-control mode, python -m export.serve's default):"
        )
        print(
            f"  SESSREC_ADMIN_KEY=... python -m export.versions --url 127.0.0.1:8000 --repo {cfg.out} --version {version}"
        )
        return 0
    print(
        f"wrote {out} ({cfg.torch_backend} model step, top-{cfg.top_k}) in {time.perf_counter() - t0:.1f} s"
    )
    print(f"serve it: python -m export.serve --repo {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
