"""The fine-tuning loop: AdamW, warm-up + cosine schedule, AMP, DDP, clipping, exact resume.

A method (``FtMethod``, ``FlypMethod``, ``CarotMethod``) supplies the trainable module, the loss of a
batch and what happens after an optimizer step (CaRot's teacher update); ``Finetuner`` owns everything
else. The schedule is the reference's ``cosine_lr`` (MLAI-Yonsei/CaRot ``src/models/utils.py``):
``lr_t = lr * (t + 1) / warmup`` for ``t < warmup``, then
``lr_t = min_lr + lr * (1 + cos(pi * (t - warmup) / (T - warmup))) / 2``.

This is its own small loop rather than the prompt-tuning trainer's: full fine-tuning updates the whole
backbone under DDP, needs the global contrastive batch split over ranks, an EMA teacher and
per-step caption draws, none of which a loop over cached frozen features and a prompt context provides.

Checkpoints are one safetensors file (written atomically through ``fastcal._io.save_tensors``, with a
checksum and the run's key in its header): the trainable module (``trainable.*``), the method's extra
state (CaRot's ``teacher.*``), AdamW's moments and step counts (``optimizer.<i>.*``), the gradient
scaler's state and the step. The data stream is a function of the seed and the step
(``fastcal.finetune.data``), so loading a checkpoint and continuing gives the same weights, bit for
bit, as never stopping.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcal._checks import check_int, fail
from fastcal._io import append_jsonl, load_tensors, read_jsonl, save_tensors, write_jsonl_atomic
from fastcal.finetune.config import FinetuneConfig
from fastcal.finetune.data import GlobalBatchSampler, TrainingViews
from fastcal.finetune.distributed import (
    DistributedContext,
    autocast,
    barrier,
    set_grad_checkpointing,
    wrap_ddp,
)

_CHECKPOINT_FORMAT = 1


def cosine_learning_rate(
    step: int, total_steps: int, *, peak: float, warmup_steps: int, minimum: float = 0.0
) -> float:
    """The learning rate of 0-based ``step`` (module docstring)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * peak + minimum


def total_steps(num_images: int, config: FinetuneConfig) -> int:
    """Steps of a run: ``epochs * (num_images // batch_size)``, capped at ``max_steps``."""
    check_int("num_images", num_images, minimum=1)
    per_epoch = num_images // config.batch_size
    if per_epoch == 0:
        raise fail("batch_size", f"at most the {num_images} training images", config.batch_size)
    steps = config.epochs * per_epoch
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def _fused_adam_supported(parameters: list[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel (CPU and CUDA, floating dtypes): one pass over each tensor."""
    return bool(parameters) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters
    )


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class Finetuner:
    """One fine-tuning run of ``method`` under ``config`` for ``total_steps`` steps.

    Args:
        method: supplies ``trainable`` (the module to optimize), ``loss(forward, batch, step)``,
            ``after_step(step, total_steps)``, ``extra_state()`` / ``load_extra_state(tensors)``.
        config: the hyperparameters (``FinetuneConfig``).
        total_steps: the length of the schedule.
        context: the distributed context (default: one process on the trainable module's device).
    """

    def __init__(
        self,
        method: Any,
        config: FinetuneConfig,
        total_steps: int,
        *,
        context: DistributedContext | None = None,
    ) -> None:
        if not isinstance(config, FinetuneConfig):
            raise TypeError(f"config: expected a FinetuneConfig, got {type(config).__name__}")
        self.method = method
        self.config = config
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        module: nn.Module = method.trainable
        self.context = context or DistributedContext(device=_module_device(module))
        if config.grad_checkpointing:
            set_grad_checkpointing(module)
        module.train()
        self.module = module
        self.forward = wrap_ddp(module, self.context)
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        self._fused = _fused_adam_supported(self.parameters)
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=config.learning_rate,
            betas=tuple(config.adam_betas),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            fused=self._fused,
        )
        self.scaler = torch.amp.GradScaler(self.context.device.type, enabled=config.precision == "fp16")
        self.step = 0

    def learning_rate(self, step: int) -> float:
        c = self.config
        return cosine_learning_rate(
            step,
            self.total_steps,
            peak=c.learning_rate,
            warmup_steps=c.warmup_steps,
            minimum=c.min_learning_rate,
        )

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's share of a global batch; returns the detached loss terms."""
        if self.step >= self.total_steps:
            raise fail("step", f"a step below total_steps {self.total_steps}", self.step)
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.config.precision, self.context.device):
            loss, parts = self.method.loss(self.forward, batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(self.step, self.total_steps)
        self.step += 1
        return {"loss": loss.detach(), **parts}

    # ---- checkpoints ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs, as named tensors (module docstring)."""
        tensors = {f"trainable.{k}": v for k, v in self.module.state_dict().items()}
        tensors.update(self.method.extra_state())
        for index, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
        if self.scaler.is_enabled():
            for name, value in self.scaler.state_dict().items():
                tensors[f"scaler.{name}"] = torch.as_tensor(value, dtype=torch.float64)
        tensors["trainer.step"] = torch.tensor(self.step, dtype=torch.int64)
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``state_tensors``."""
        prefix = "trainable."
        self.module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.method.load_extra_state(dict(tensors))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.clone()
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        if self.scaler.is_enabled():
            scaler_state = self.scaler.state_dict()
            for name in scaler_state:
                value = float(tensors[f"scaler.{name}"])
                scaler_state[name] = int(value) if name in ("_growth_tracker", "growth_interval") else value
            self.scaler.load_state_dict(scaler_state)
        self.step = int(tensors["trainer.step"])

    def save_checkpoint(self, path: str | os.PathLike, key: Mapping[str, Any]) -> None:
        """Write the checkpoint atomically (rank 0 writes; every rank waits for it)."""
        if self.context.is_main:
            save_tensors(path, self.state_tensors(), _checkpoint_key(key))
        barrier(self.context)

    def load_checkpoint(self, path: str | os.PathLike, key: Mapping[str, Any]) -> bool:
        """Resume from ``path``; False when there is no file. A file of another run is an error."""
        path = Path(path)
        if not path.is_file():
            return False
        tensors = load_tensors(path, _checkpoint_key(key))
        if tensors is None:
            raise fail(
                "resume",
                f"a checkpoint of this run at {path} (same method, hyperparameters, model and data)",
                "a checkpoint of another run, or a corrupt file; remove it or use another --output",
            )
        self.load_state_tensors(tensors)
        return True


def _checkpoint_key(key: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": "fastcal_finetune_checkpoint", "format": _CHECKPOINT_FORMAT, "run": dict(key)}


def _to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    non_blocking = device.type == "cuda"
    return tuple(torch.as_tensor(x).to(device, non_blocking=non_blocking) for x in batch)


def _drop_records_after(log_path: Path, step: int) -> None:
    """A run resumed from its checkpoint at ``step`` logs the steps after it again: drop their old records
    (those of the interrupted run) and a torn last line, so the log holds each step once."""
    if log_path.exists():
        write_jsonl_atomic(log_path, [r for r in read_jsonl(log_path) if r.get("step", 0) <= step])


def train(
    finetuner: Finetuner,
    dataset: TrainingViews,
    *,
    num_workers: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_key: Mapping[str, Any] | None = None,
    checkpoint_every: int | None = None,
    log_path: str | os.PathLike | None = None,
    log_every: int = 50,
    until: int | None = None,
    progress: bool = True,
) -> None:
    """Run ``finetuner`` from its current step to the end (or to step ``until``) over ``dataset``.

    Loss terms are averaged over ``log_every`` steps on the device and written (rank 0) as JSON lines
    to ``log_path``; the checkpoint is written every ``checkpoint_every`` steps and where training stops.
    ``until`` stops early (e.g. to fit a job's time limit); a later call continues exactly.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    check_int("num_workers", num_workers, minimum=0)
    check_int("log_every", log_every, minimum=1)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, minimum=1)
    if checkpoint_path is not None and checkpoint_key is None:
        raise fail("checkpoint_key", "the run's key with a checkpoint_path", None)
    stop = (
        finetuner.total_steps
        if until is None
        else min(check_int("until", until, minimum=1), finetuner.total_steps)
    )
    context = finetuner.context
    if log_path is not None and context.is_main:
        _drop_records_after(Path(log_path), finetuner.step)
    sampler = GlobalBatchSampler(
        len(dataset),
        finetuner.config.batch_size,
        seed=finetuner.config.seed,
        total_steps=stop,
        start_step=finetuner.step,
        rank=context.rank,
        world_size=context.world_size,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=context.device.type == "cuda",
        persistent_workers=False,
    )
    sums: dict[str, torch.Tensor] = {}
    count = 0
    bar = tqdm(
        total=finetuner.total_steps,
        initial=finetuner.step,
        desc=f"fine-tuning ({finetuner.method.name})",
        disable=not (progress and context.is_main),
        leave=False,
    )
    for batch in loader:
        parts = finetuner.train_step(_to_device(batch, context.device))
        for name, value in parts.items():
            sums[name] = sums[name] + value.float() if name in sums else value.float()
        count += 1
        step = finetuner.step
        last = step == stop
        bar.update(1)
        if count and (step % log_every == 0 or last):
            record = {name: float(total) / count for name, total in sums.items()}
            record.update(step=step, lr=finetuner.learning_rate(step - 1))
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if log_path is not None and context.is_main:
                append_jsonl(log_path, [record])
            sums, count = {}, 0
        if checkpoint_path is not None and (
            last or (checkpoint_every is not None and step % checkpoint_every == 0)
        ):
            finetuner.save_checkpoint(checkpoint_path, checkpoint_key)
    bar.close()
