"""What the training tests share.

from tests.training.train_util import tiny_cfg
cfg = tiny_cfg(tiny_synthetic_data, tmp_path / "run", epochs=2)
"""

from __future__ import annotations

from pathlib import Path

from training.config import TrainConfig

TINY = dict(end_window=3, epochs=1, batch_size=16, threads=1, progress=False)


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    """A quick run on the tiny synthetic DATA (windows up to 3, one epoch, batch 16, one thread, quiet); `kw` wins."""
    return TrainConfig(**{"data": str(data), "out": str(out), **TINY, **kw})
