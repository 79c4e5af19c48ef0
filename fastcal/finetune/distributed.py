"""Multi-process fine-tuning: torchrun / DistributedDataParallel, mixed precision, checkpointing.

A batch of 512 ViT-B/16 images does not fit one small GPU, and gradient accumulation would change the
contrastive loss (each micro-batch would only see its own negatives). So the global batch is split over
processes launched by ``torchrun`` (one per GPU; ``torchrun --nproc_per_node 8 -m fastcal finetune ...``)
and the features are gathered across ranks for the contrastive and distillation logits (open_clip's
``ClipLoss`` with ``local_loss=True, gather_with_grad=True``; see ``fastcal.finetune.flyp``). Gradients
are averaged by DDP: each rank's loss is the mean over its own rows against all columns and the
all-gather's backward sums the feature gradients over ranks, so the averaged gradient is exactly the
gradient of the single-process loss over the global batch (tested on CPU with gloo).

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without it, or with ``WORLD_SIZE=1``, everything runs in one process.
NCCL on CUDA, gloo on CPU.

Mixed precision (``autocast``): "bf16" or "fp16" autocast around the forward passes and losses
(``torch.autocast``); fp16 adds a ``torch.amp.GradScaler``. Gradient checkpointing: open_clip's
``set_grad_checkpointing`` on the CLIP (both towers) or its visual tower.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from fastcal._checks import check_choice, fail

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistributedContext:
    """This process in the group: rank, world size, local rank and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise fail(name, "an integer environment variable", repr(value)) from None


def init_distributed(
    device: str | torch.device | None = None, *, backend: str | None = None
) -> DistributedContext:
    """The process group from torchrun's environment (initialized once), or a single process.

    Args:
        device: "cpu", "cuda" (this rank's GPU, ``cuda:LOCAL_RANK``) or an explicit device; default
            CUDA when available.
        backend: "nccl" or "gloo"; default NCCL for CUDA, gloo for CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        check_choice("backend", backend, ("nccl", "gloo"))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, device)


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (a no-op in one process)."""
    if context.is_distributed:
        dist.barrier()


def wrap_ddp(module: nn.Module, context: DistributedContext) -> nn.Module:
    """``DistributedDataParallel(module)`` in a distributed run, the module itself otherwise."""
    if not context.is_distributed:
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def gather_rows(x: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (row counts may differ; no gradient)."""
    if not context.is_distributed:
        return x
    x = x.contiguous()
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(context.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def shard_range(n: int, context: DistributedContext) -> range:
    """This rank's contiguous share of ``range(n)`` (the first ranks get one more when uneven)."""
    base, extra = divmod(n, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return range(start, start + base + (1 if context.rank < extra else 0))


def autocast(precision: str, device: torch.device):
    """``torch.autocast`` for "bf16" / "fp16", a null context for "fp32"."""
    check_choice("precision", precision, ("fp32", *_AUTOCAST_DTYPES))
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """open_clip's gradient checkpointing on a CLIP (both towers) or a visual tower."""
    target = getattr(module, "model", module)
    if isinstance(target, nn.Module) and hasattr(target, "set_grad_checkpointing"):
        target.set_grad_checkpointing(enable)
        return
    visual = getattr(module, "visual", None)
    if visual is not None and hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(enable)
        return
    raise fail(
        "module", "an open_clip CLIP or visual tower (with set_grad_checkpointing)", type(module).__name__
    )
