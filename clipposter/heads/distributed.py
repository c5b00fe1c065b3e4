"""Data-parallel training under `accelerate launch` or `torchrun`: which process this is, the
process group, each rank's share of a global batch, and sums over all ranks.

A launcher starts one process per device and tells each, through the environment (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT: `accelerate launch` and `torchrun` both set them), where it
stands. The training loops read the same seeded permutation on every rank, so every rank knows every
global batch; each trains on its contiguous share of it, `DistributedDataParallel` averages the
gradients, and the loss each rank back-propagates is weighted so that the average is the gradient of
the global batch's loss: the result is the single-process run's at the same `batch_size`, up to the
order of floating-point sums. `batch_size` is therefore global: each rank takes `batch_size / world`.

Without a launcher (WORLD_SIZE unset or 1) nothing here touches torch.distributed, and the loops run
exactly as before.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np

from clipposter.errors import ClipposterError

__all__ = ["Ranks", "all_sums", "barrier", "gather_rows", "is_main_process", "launched", "setup", "shard",
           "wrap_module"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the launched ones (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ClipposterError(f"the environment variable {name} is {value!r}, not a whole number; launch with "
                              f"`accelerate launch` or `torchrun`, or unset it") from None


def launched() -> Ranks:
    """This process's rank, the number of processes and its rank on this machine, as the launcher set
    them in the environment. Reads the environment only (no torch import): the CLI asks it too."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ClipposterError(f"the environment says rank {rank} of {world} processes; launch with "
                              f"`accelerate launch` or `torchrun`, or unset WORLD_SIZE and RANK")
    return Ranks(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", rank))


def is_main_process() -> bool:
    """True unless this is a launched process other than rank 0: only the main one writes and prints."""
    return launched().is_main


def setup(device=None) -> Ranks:
    """Join the launcher's process group (once per process) and return this process's ranks. gloo
    carries CPU tensors; on CUDA, NCCL carries the device's. Without a launcher: rank 0 of 1."""
    ranks = launched()
    if not ranks.active:
        return ranks
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise ClipposterError(f"{ranks.world_size} processes were launched, but this torch build has no "
                              f"torch.distributed; train in one process")
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://",
                                rank=ranks.rank, world_size=ranks.world_size)
        atexit.register(_close)
    elif dist.get_world_size() != ranks.world_size or dist.get_rank() != ranks.rank:
        raise ClipposterError(f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}, but the "
                              f"environment says rank {ranks.rank} of {ranks.world_size}")
    return ranks


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_module(module, ranks: Ranks, device=None):
    """`module` itself in one process; wrapped in DistributedDataParallel (gradients averaged over
    the ranks in the backward pass) when launched."""
    if not ranks.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    import torch

    ids = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shard(rows, ranks: Ranks):
    """This rank's contiguous share of one global batch `rows` (a 1-D tensor of indices) and how many
    rows of it are its own. Shares differ by at most one row. A rank whose share is empty (a last
    batch smaller than the world) gets the batch's first row to run, with 0 rows of its own: its
    loss is weighted by 0, so it joins the gradient average without changing it."""
    if not ranks.active:
        return rows, len(rows)
    import torch

    mine = torch.tensor_split(rows, ranks.world_size)[ranks.rank]
    if len(mine) == 0:
        return rows[:1], 0
    return mine, len(mine)


def all_sums(values, ranks: Ranks, device=None) -> list[float]:
    """The element-wise sums of `values` (floats) over all ranks, in float64; `values` in one process."""
    values = [float(v) for v in values]
    if not ranks.active:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_rows(array: np.ndarray, ranks: Ranks) -> np.ndarray:
    """The ranks' row blocks of `array` stacked in rank order (each rank passes its own block)."""
    if not ranks.active:
        return array
    import torch.distributed as dist

    blocks: list = [None] * ranks.world_size
    dist.all_gather_object(blocks, np.asarray(array))
    return np.concatenate(blocks, axis=0)


def barrier(ranks: Ranks) -> None:
    """Wait until every rank is here (nothing in one process)."""
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()
