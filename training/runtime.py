"""Process and device set-up: the one place every entry point that trains uses.

    import training.runtime  # first import of an entry point: OMP_WAIT_POLICY before torch loads

    with distributed(cfg.device) as d:        # torchrun: rank/world from the environment
        device = resolve_device(cfg.device, d)
        set_threads(device, cfg.threads, d)
        amp = amp_dtype(device)

Under torchrun (WORLD_SIZE > 1) `distributed` starts the process group (gloo on
CPU, nccl on GPU) and destroys it on the way out; in a single process it
yields `Dist()` (rank 0 of 1) and starts nothing.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# Set before torch loads OpenMP: idle OpenMP threads then sleep instead of
# spinning. Where the cores are shared with other jobs, spinning threads made
# a 2-thread training step 2-8x slower here (passive: 40-62 ms, default:
# 128-500 ms, 1 thread: 37-59 ms per step, same load). An explicit setting wins.
# It only takes effect if this module is imported before torch: entry points
# (training.train, training.tune) import it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Large CPU tensors (>= 2 MB: the (targets, V) logits of the full loss, 37 MB a step on DIGINETICA)
# on transparent huge pages: torch's allocator madvises them, so a fresh tensor is not page-faulted
# in 4 kB pages. Measured (docs/throughput.md): 15.7 M -> 0.29 M minor faults and 30.5 -> 3.1 s of
# system time per DIGINETICA run, 1.30x per full-loss step; the allocator only, results identical.
# Helps where /sys/kernel/mm/transparent_hugepage/enabled is madvise or always.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.checkpoint import RunError


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> Dist:
    """Rank and world size from torchrun's environment; starts the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if not dist.is_initialized():
        use_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device_arg: str) -> Iterator[Dist]:
    """`init_distributed`, and `teardown` however the block ends."""
    d = init_distributed(device_arg)
    try:
        yield d
    finally:
        teardown(d)


def resolve_device(arg: str, d: Dist) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device (under torchrun, plain cuda is cuda:LOCAL_RANK)."""
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"--device {arg}: torch.cuda is not available here (use --device cpu or auto)")
        dev = torch.device(f"cuda:{d.local_rank}") if arg == "cuda" and d.world > 1 else torch.device(arg)
        torch.cuda.set_device(dev)
        return dev
    if arg != "cpu":
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {arg!r}")
    return torch.device("cpu")


def set_threads(device: torch.device, threads: int, d: Dist) -> None:
    """torch threads per process: `threads`, or on a CPU (0) the cores shared by the local processes."""
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // d.local_world))
    elif threads:
        torch.set_num_threads(threads)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast dtype of training steps: bf16 (else fp16) on a GPU, None (float32) on a CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def check_replicas_in_sync(model: nn.Module, d: Dist) -> None:
    """Every rank must hold the same weights and buffers (the item memory's tables, built on
    every rank, not broadcast) after a window (DDP averaged the gradients every step)."""
    with torch.no_grad():
        mine = torch.stack([p.double().sum() for p in [*model.parameters(), *model.buffers()]])  # (P,)
        every = [torch.empty_like(mine) for _ in range(d.world)]
        dist.all_gather(every, mine)
    if not all(torch.allclose(e, every[0], rtol=1e-9, atol=0) for e in every):
        raise RuntimeError(
            "DDP ranks hold different weights or memory tables after a window: not synchronised"
        )
