"""The process group as a run sees it: this process's rank, barriers, and "rank 0 computes, the others
wait, then all read".

Without ``torch.distributed`` initialized (one process), every helper is the trivial one: rank 0 of 1,
barriers return at once.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fastcal._io import cached_tensors

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0: the process that writes a run's shared files and prints."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_rank_zero(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 while the other ranks wait; every rank returns rank 0's value.

    ``compute``'s value travels to the other ranks pickled (keep it small: a path, a number, a dict);
    when it is a file rank 0 wrote, each rank reads the file itself after this returns. An error on
    rank 0 (a ``ValueError`` or ``OSError`` a user can fix) is raised on every rank with the same message,
    so no rank waits for a result that never comes.
    """
    rank, world = rank_world()
    if world == 1:
        return compute()
    message: list[object] = [None, None]
    if rank == 0:
        try:
            message = [compute(), None]
        except (ValueError, OSError) as error:
            message = [None, (type(error).__name__, str(error))]
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    value, error = message
    if error is not None:
        kind, text = error
        error_type = getattr(builtins, kind, ValueError)
        raise (error_type if issubclass(error_type, (ValueError, OSError)) else ValueError)(text)
    return value  # type: ignore[return-value]


def computed_once(
    path: str | os.PathLike, key: Mapping[str, Any], compute: Callable[[], Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Tensors rank 0 computes (or finds in the cache file ``path`` for ``key``) while the others wait;
    then every rank reads the file (``fastcal._io.cached_tensors``)."""
    on_rank_zero(lambda: cached_tensors(path, key, compute) and None)
    return cached_tensors(path, key, compute)
