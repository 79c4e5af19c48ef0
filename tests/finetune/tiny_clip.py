"""Tiny random-init open_clip CLIPs and batches for the fine-tuning tests.

Run as a script, it is one rank of the two-process gloo test (tests/finetune/test_distributed.py): it
reads torchrun's environment variables, takes its share of a fixed global batch, runs one optimizer step
of each named method (FLYP, CaRot, FT) through ``fastcal.finetune.trainer.Finetuner`` under DDP and
saves the parameters and gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import open_clip
import torch

EOT = 63
CONTEXT = 12
IMAGE = 16


def build_tiny_clip(seed: int = 0, dtype: torch.dtype = torch.float64) -> open_clip.CLIP:
    """A 2-layer ViT (16 px, patch 8) + 2-layer causal text tower over a 64-token vocabulary."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=12,
            vision_cfg={"image_size": IMAGE, "patch_size": 8, "width": 24, "layers": 2, "head_width": 8},
            text_cfg={"context_length": CONTEXT, "vocab_size": EOT + 1, "width": 16, "heads": 2, "layers": 2},
        )
    return model.to(dtype)


def random_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` token rows: random ids in [1, EOT), the EOT token (the row's argmax) at a random position,
    zeros after it."""
    tokens = torch.randint(1, EOT, (n, CONTEXT), generator=generator)
    ends = torch.randint(3, CONTEXT, (n,), generator=generator)
    positions = torch.arange(CONTEXT)
    tokens[positions[None] > ends[:, None]] = 0
    tokens[torch.arange(n), ends] = EOT
    return tokens


def random_batch(n: int, seed: int, *, num_classes: int = 5, dtype: torch.dtype = torch.float64):
    """``(images (n, 3, 16, 16), labels (n,), token ids (n, 12))`` from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(num_classes, (n,), generator=generator)
    return images, labels, random_tokens(n, generator)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add ``scale`` * N(0, 1) noise (from ``seed``) to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))


def make_method(name: str, model, *, rank: int = 0, world_size: int = 1, label_smoothing: float = 0.0):
    """FLYP, CaRot (teacher perturbed, so distillation has a gradient) or FT on ``model``."""
    from fastcal.finetune.carot import CarotMethod
    from fastcal.finetune.flyp import FlypMethod
    from fastcal.finetune.ft import FtMethod

    if name == "flyp":
        return FlypMethod(model, label_smoothing=label_smoothing, rank=rank, world_size=world_size)
    if name == "carot":
        method = CarotMethod(
            model,
            label_smoothing=label_smoothing,
            teacher_update_every=1,
            cross_modal_weight=0.05,
            orthogonality_weight=0.2,
            rank=rank,
            world_size=world_size,
        )
        perturb_(method.teacher.module, seed=7)
        return method
    generator = torch.Generator().manual_seed(3)
    class_features = torch.randn(5, 12, generator=generator, dtype=torch.float64).to(model.logit_scale.dtype)
    return FtMethod(model, class_features, label_smoothing=label_smoothing)


def one_step_state(name: str, global_batch: int, *, rank: int = 0, world_size: int = 1, context=None):
    """Parameters (and CaRot's teacher) after one step on this rank's rows of a fixed global batch."""
    from fastcal.finetune.config import FinetuneConfig
    from fastcal.finetune.trainer import Finetuner

    model = build_tiny_clip()
    method = make_method(name, model, rank=rank, world_size=world_size)
    config = FinetuneConfig(method=name, learning_rate=1e-3, batch_size=global_batch, warmup_steps=0)
    finetuner = Finetuner(method, config, total_steps=4, context=context)
    images, labels, tokens = random_batch(global_batch, seed=11)
    local = global_batch // world_size
    rows = slice(rank * local, (rank + 1) * local)
    finetuner.train_step((images[rows], labels[rows], tokens[rows]))
    state = {f"trainable.{k}": v.detach().clone() for k, v in method.trainable.state_dict().items()}
    state.update({k: v.detach().clone() for k, v in method.extra_state().items()})
    # the step's gradients (Adam's first step is nearly sign(g), blind to a wrongly scaled gradient)
    state.update({f"grad.{k}": p.grad.detach().clone() for k, p in method.trainable.named_parameters()})
    return state


def _main() -> int:
    from fastcal.finetune.distributed import init_distributed

    names, global_batch, out_dir = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
    context = init_distributed("cpu", backend="gloo")
    for name in names:
        state = one_step_state(
            name, global_batch, rank=context.rank, world_size=context.world_size, context=context
        )
        if context.is_main:
            torch.save(state, out_dir / f"{name}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
