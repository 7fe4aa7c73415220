"""Train the next-item model window by window (the Transformers4Rec protocol).

    python -m training.train --data data/synthetic --out runs/synthetic
    python -m training.train --data data/synthetic --out runs/synthetic --resume
    torchrun --nproc_per_node 2 -m training.train --data data/synthetic --out runs/ddp

For t = start .. end-1: train on DATA/sessions_by_day/<t>/train.parquet for
`epochs` epochs (AdamW, cosine schedule with `cycles_per_epoch` cycles per
epoch, restarted every window, weights and optimizer state carried on), then
evaluate on <t+1>/valid.parquet (`--eval-split test`: test.parquet, for final
numbers): the input is every item but the last and the target is the last item,
ranked over the catalogue known after window t (training/metrics.py).
The baselines of training/baselines.py and the count blend (the item memory
untrained) are evaluated on the same sessions.

The vocabulary grows with the log (issue 12): ids follow first appearance
(schema.json `vocabulary_by_window`), the model's tables hold the ids known after
window t and grow at the start of every window (new rows drawn from (seed, window),
optimizer state padded); in window t+1's sessions, later items are OOV and a target
unknown after t is a miss for every method (rows: `items_known`, `unseen_targets`).

Defaults come from a recipe (training/recipes.py, docs/quality.md): "reference" (the
protocol above) for synthetic data, "real" for a click log prepared from
--input (every window <= t, causal objective, the item memory, early stopping
on a held-back slice of window t's training sessions); `--recipe` forces one, `--config FILE`
(e.g. from `python -m training.tune`) overrides it, explicit flags win (training/config.py).

Writes to RUN/ after every window (each file atomically, see `save_checkpoint`; the steps: training/trainer.py):
model.pt (state_dict), optim.pt (optimizer/scheduler/RNG state), meta.json
(model config, schema, workflow sha256, last finished window, metrics),
metrics.json and metrics.png. `--resume` continues after the last finished
window and ends with exactly the metrics of an uninterrupted run: every window
draws its shuffling, masking and dropout randomness from generators seeded by
(seed, window[, rank]).

Under torchrun the same script runs DistributedDataParallel (gloo on CPU,
nccl on GPU; training/runtime.py): every rank takes its share of each global batch; rank 0 alone
evaluates and writes.
"""

from __future__ import annotations

import training.runtime  # first: sets OMP_WAIT_POLICY before torch is imported

# isort: split
import sys
from typing import Any

from training import config
from training.checkpoint import RunError, load_run
from training.cli import ConfigFileError
from training.config import TrainConfig
from training.data.splits import DataError
from training.trainer import Trainer

# load_run is re-exported (training.train.load_run: load what this CLI wrote)
__all__ = ["TrainConfig", "load_run", "main", "parse_args", "train"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the protocol of the module docstring; returns the metrics.json content."""
    with training.runtime.distributed(cfg.device) as d:
        if cfg.members > 1:  # an ensemble (training/members.py)
            from training.members import MembersTrainer

            return MembersTrainer(cfg, d).run()
        return Trainer(cfg, d).run()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line (derived from the TrainConfig and ModelConfig fields: training/config.py):
    dataclass defaults < recipe < --config FILE < explicit flags."""
    return config.parse_args(argv, "python -m training.train", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except (DataError, RunError, ConfigFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, output folder gone or read-only while training
        where = f": {e.filename}" if e.filename else ""
        print(
            f"error: cannot write the run ({e.strerror or e}{where}); the last finished window's checkpoint "
            "is intact: free space or fix the folder, then rerun with --resume",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
