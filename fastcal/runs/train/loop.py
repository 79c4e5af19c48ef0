"""The thin training loop: build the method, run the epochs, checkpoint, evaluate, write the results.

Optimization follows Dassl as the prompt-learning methods run it (KaiyangZhou/Dassl.pytorch
``dassl/optim``): SGD (momentum, weight decay, no dampening), or Adam where the recipe says so (TCP;
``torch.optim.Adam`` with betas (0.9, 0.999), weight decay added to the gradient), over the tuned
parameters only, and a learning rate per epoch ``e`` of::

    lr(e) = warmup_lr                                                   e <  warmup_epochs
    lr(e) = lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2        e >= warmup_epochs

(``ConstantWarmupScheduler`` over ``CosineAnnealingLR(T_max=epochs)`` with the warm-up recounted),
stepped once per epoch. On CUDA with ``amp`` the forward runs under fp16 autocast with a gradient
scaler. Each step is the method's ``fastcal.methods.training.TrainingStep`` (the objective, the method's
gradient rule: ProGrad's), and each epoch ends with its epoch-end hooks (PromptSRC's aggregation).

Frozen image encoders (CoOp, CoCoOp, KgCoOp) never run in the loop: each epoch reads that epoch's
cached augmented features (``fastcal.models.cache.image_features``); prompted ones (VPT, MaPLe) encode
the epoch's seeded views. Text always goes through the exact truncated encoder of the prompt learner.
Per-step statistics stay on the device and are read once per epoch.

Every epoch ends with an atomic checkpoint (``checkpoint.pt``: tuned parameters, optimizer, scheduler,
scaler, regularizer and hook states, the method's state between steps, every random generator, the
history); ``resume=True`` continues from it and
gives the same result as an uninterrupted run. At the end: ``results.json`` (``{"base": report, "new":
report, "hm": {"accuracy"}, "config": ...}``, or ``{"all": report, ...}``; each report is
``fastcal.metrics.calibration_report`` with ``n_bins`` recorded), ``reliability_<group>.png`` and the
learned prompt ``prompt.pt`` (for ``fastcal eval``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastcal import registry
from fastcal._checks import check_device, fail
from fastcal._io import atomic_path, load_torch_file, write_json_atomic
from fastcal.data.items import DatasetSplits, ImageListDataset
from fastcal.methods.base import MethodSpec, PromptMethod, build_method, get_method
from fastcal.methods.objectives import RegularizerSetup, build_regularizers
from fastcal.methods.training import TrainingStep
from fastcal.models.cache import SeededViews
from fastcal.models.clip import LoadedClip
from fastcal.runs.folder import RunFolder
from fastcal.runs.predictions import predictions_path, save_predictions
from fastcal.runs.train.config import RESUME_FREE_KEYS, TrainConfig
from fastcal.runs.train.data import (
    EvalGroup,
    RunData,
    epoch_batches,
    feature_cache_dir,
    load_clip_for,
    load_splits_for,
    run_data,
    train_transform_for,
)

CHECKPOINT_NAME = "checkpoint.pt"
PROMPT_NAME = "prompt.pt"
RESULTS_NAME = "results.json"
PROMPT_FORMAT = 1
# Evaluation batches of per-image-prompt methods (CoCoOp) hold about this many prompts.
EVAL_PROMPTS_PER_BATCH = 4096


def learning_rate_factor(
    epoch: int, *, epochs: int, lr: float, warmup_epochs: int, warmup_lr: float
) -> float:
    """``lr(epoch) / lr`` of the schedule in the module docstring."""
    if epoch < warmup_epochs:
        return warmup_lr / lr
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def frozen_class_features(
    clip: LoadedClip,
    classnames: list[str],
    templates: list[str],
    config: TrainConfig,
    *,
    model_key: str | None = None,
):
    """L2-normalized zero-shot class features of ``config.frozen_templates`` (cached)."""
    from fastcal.models.cache import class_text_features

    chosen = templates[:1] if config.frozen_templates == "hard" else templates
    return class_text_features(
        clip.model,
        clip.tokenizer,
        classnames,
        chosen,
        cache_dir=feature_cache_dir(config.cache_dir),
        model_key=model_key,
    )


def method_options(spec: MethodSpec, config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    return {key: values[key] for key in spec.options}


def _rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain values (a checkpoint loads with weights_only)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


@dataclass
class Run:
    """Everything a training run holds while it trains; ``step`` is the method's ``TrainingStep`` (its
    loss, regularizers, optimizer and gradient scaler)."""

    config: TrainConfig
    spec: MethodSpec
    clip: LoadedClip
    data: RunData
    method: PromptMethod
    device: torch.device
    model_key: str
    step: TrainingStep
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_transform: Any


def prepare(
    config: TrainConfig, *, clip: LoadedClip | None = None, splits: DatasetSplits | None = None
) -> Run:
    """Resolve the config, load model and data, build the method, its objective and optimizer."""
    from fastcal.models.fingerprint import model_fingerprint

    config = config.resolved()
    spec = get_method(config.method)
    device = check_device("device", config.device)
    clip = clip if clip is not None else load_clip_for(config)
    clip.model.to(device)
    splits = splits if splits is not None else load_splits_for(config)
    data = run_data(splits, shots=config.shots, seed=config.seed, protocol=config.protocol)

    _seed_everything(config.seed)
    model_key = model_fingerprint(clip.model)  # the frozen CLIP's weights, hashed once for every cache
    method = build_method(
        spec.name, clip.model, clip.tokenizer, data.train_classnames, **method_options(spec, config)
    ).to(device)
    frozen = frozen_class_features(
        clip, data.train_classnames, data.templates, config, model_key=model_key
    ).to(device)

    def setup(name: str) -> RegularizerSetup:
        return RegularizerSetup(
            name=name,
            method_name=spec.name,
            method=method,
            model=clip.model,
            model_key=model_key,
            tokenizer=clip.tokenizer,
            classnames=data.train_classnames,
            templates=data.templates,
            frozen_text_features=frozen,
            options=dict(config.regularizer_options.get(name, {})),
            config=config.to_dict(),
            seed=config.seed,
            device=device,
            cache_dir=config.cache_dir,
            progress=config.progress,
            extras={"eval_classnames": {group.name: list(group.classnames) for group in data.groups}},
        )

    regularizers = build_regularizers([*spec.regularizers, *config.regularizers], setup)
    optimizer = build_optimizer([p for _, p in method.tuned_parameters()], config)

    def factor(epoch: int) -> float:
        return learning_rate_factor(
            epoch,
            epochs=config.epochs,
            lr=config.lr,
            warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr,
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    settings = config.to_dict()
    step = TrainingStep(
        method,
        config.loss,
        optimizer,
        loss_options={key: settings[key] for key in registry.get("loss", config.loss).options},
        regularizers=regularizers,
        templates=data.templates,
        frozen_text_features=frozen,
        settings=settings,
        seed=config.seed,
        cache_dir=config.cache_dir,
        amp=config.amp,
        progress=config.progress,
    )
    return Run(
        config=config,
        spec=spec,
        clip=clip,
        data=data,
        method=method,
        device=device,
        model_key=model_key,
        step=step,
        scheduler=scheduler,
        train_transform=train_transform_for(config, clip),
    )


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam over ``params`` with the config's settings, as Dassl's ``build_optimizer`` makes them."""
    if config.optimizer == "adam":
        eps = 1e-8 if config.adam_eps is None else config.adam_eps
        return torch.optim.Adam(
            params, lr=config.lr, betas=(0.9, 0.999), eps=eps, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, dampening=0.0
    )


# ---- one epoch -------------------------------------------------------------------------------------
def _epoch_inputs(run: Run, epoch: int) -> tuple[Any, torch.Tensor | None]:
    """Frozen image encoder: this epoch's cached features and labels on the device. Prompted: the
    epoch's seeded views (a dataset) and ``None``."""
    config = run.config
    dataset = ImageListDataset(run.data.train_items, run.data.train_classnames, run.train_transform)
    if config.augment:
        view_epoch = epoch if config.augment_epochs is None else epoch % config.augment_epochs
    else:
        view_epoch = None
    if run.method.input_kind == "images":
        return SeededViews(dataset, view_epoch), None
    from fastcal.models.cache import image_features
    from fastcal.models.fingerprint import transform_fingerprint

    with torch.no_grad():
        features, labels = image_features(
            run.clip.model.encode_image,
            dataset,
            model_key=run.model_key,
            transform_key=transform_fingerprint(run.train_transform),
            epoch=view_epoch,
            cache_dir=feature_cache_dir(config.cache_dir),
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
            progress=config.progress,
        )
    return features.to(run.device), labels.to(run.device)


def _batches(run: Run, epoch: int, inputs: Any, labels: torch.Tensor | None):
    config = run.config
    n = len(run.data.train_items)
    batches = epoch_batches(n, config.batch_size, seed=config.seed, epoch=epoch)
    if labels is not None:
        # one host-to-device copy per epoch (a blocking copy per step would wait for the GPU each time)
        order = torch.cat(batches).to(run.device)
        for index in order.split([len(b) for b in batches]):
            yield inputs[index], labels[index]
        return
    loader = DataLoader(inputs, batch_sampler=[b.tolist() for b in batches], num_workers=config.num_workers)
    for images, batch_labels in loader:
        yield images.to(run.device), torch.as_tensor(batch_labels).to(run.device)


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training set; returns the epoch's mean loss, accuracy and learning rate."""
    step = run.step
    step.start_epoch(epoch)
    inputs, labels = _epoch_inputs(run, epoch)
    take_step = step.from_features if run.method.input_kind == "features" else step
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    seen = 0
    lr = step.optimizer.param_groups[0]["lr"]
    for batch_inputs, batch_labels in _batches(run, epoch, inputs, labels):
        result = take_step(batch_inputs, batch_labels)  # no host sync: the mean loss is checked below
        n = batch_labels.shape[0]
        loss_sum += result.loss.float() * n
        correct += (result.logits.argmax(dim=1) == batch_labels).sum()
        seen += n
    run.scheduler.step()
    step.end_epoch()
    mean_loss = float(loss_sum) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"epoch {epoch + 1}: expected a finite training loss, got {mean_loss}; lower the learning rate "
            "or check the inputs for NaN or inf"
        )
    return {
        "epoch": epoch + 1,
        "loss": mean_loss,
        "accuracy": int(correct) / max(seen, 1),
        "lr": lr,
    }


# ---- evaluation ------------------------------------------------------------------------------------
class Prediction(NamedTuple):
    """What a method scored on a set: ``logits`` (N, C) as scored, ``labels`` (N,), the class
    features it scored with (``(C, D)``; ``None`` when every image has its own, as in CoCoOp), and the
    L2-normalized image features (N, D) it scored."""

    logits: torch.Tensor
    labels: torch.Tensor
    text_features: torch.Tensor | None
    image_features: torch.Tensor | None = None


@torch.no_grad()
def predict(
    method: PromptMethod,
    clip: LoadedClip,
    items: list,
    classnames: list[str],
    *,
    device: torch.device,
    batch_size: int = 256,
    cache_dir: Any = None,
    progress: bool = False,
    num_workers: int = 0,
    model_key: str | None = None,
) -> Prediction:
    """The method's logits and the labels of ``items`` over ``classnames`` (eval transform).

    The method is switched to ``classnames`` (its tuned parameters are kept) and left there.
    """
    method.eval()
    method.set_classnames(classnames)
    images_per_batch = batch_size
    if method.per_image_prompts:
        batch_size = max(1, min(batch_size, EVAL_PROMPTS_PER_BATCH // len(classnames)))
    if method.input_kind == "features":
        from fastcal.methods.zeroshot import encode_images

        features, labels = encode_images(
            clip,
            items,
            classnames,
            cache_dir=feature_cache_dir(cache_dir),
            batch_size=images_per_batch,
            num_workers=num_workers,
            progress=progress,
            model_key=model_key,
        )
        batches = ((chunk, None) for chunk in features.split(batch_size))
    else:
        dataset = ImageListDataset(items, classnames, clip.eval_transform)
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        labels = None
    logits, seen_labels, text_features, image_features = [], [], None, []
    for inputs, batch_labels in batches:
        output = method.output(inputs.to(device))
        logits.append(output.logits.float().cpu())
        image_features.append(output.image_features.float().cpu())
        if batch_labels is not None:
            seen_labels.append(torch.as_tensor(batch_labels))
        if output.text_features.ndim == 2 and text_features is None:
            text_features = output.text_features.float().cpu()
    labels = labels if labels is not None else torch.cat(seen_labels)
    return Prediction(torch.cat(logits), labels, text_features, torch.cat(image_features))


def report_groups(
    method: PromptMethod,
    clip: LoadedClip,
    groups: Sequence[EvalGroup],
    *,
    n_bins: int,
    diagram: Callable[[str], tuple[Path, str]] | None = None,
    predictions: Callable[[str], Path] | None = None,
    templates: Sequence[str] = (),
    **predict_options: Any,
) -> dict[str, Any]:
    """``{group: calibration_summary}`` of ``method`` on each group among its own classes, with PIECE
    on each sample's proximity to the group's other images (``fastcal.metrics.knn_proximity``,
    ProCal's rule), plus ``"hm"`` (``fastcal.metrics.base_new_means``: the harmonic means of base and
    new accuracy and ECE, and their mean ECE as DOR's tables print it) when both are there.

    ``diagram(group name)`` gives the path and title of the group's reliability diagram, and
    ``predictions(group name)`` the path its predictions are saved to (``fastcal.runs.predictions``,
    with the zero-shot class features of ``templates[0]``); without them, none. ``predict_options`` go
    to ``predict``. The method is left on the last group's classes."""
    from fastcal.metrics import base_new_means, calibration_summary, knn_proximity, reliability_diagram

    results: dict[str, Any] = {}
    for group in groups:
        prediction = predict(method, clip, group.items, group.classnames, **predict_options)
        probs = prediction.logits.softmax(dim=-1)
        proximity = knn_proximity(prediction.image_features) if len(prediction.labels) > 1 else None
        summary = calibration_summary(probs, prediction.labels, n_bins=n_bins, proximity=proximity)
        results[group.name] = summary
        if diagram is not None:
            import matplotlib.pyplot as plt

            path, title = diagram(group.name)
            plt.close(reliability_diagram(probs, prediction.labels, n_bins=n_bins, path=path, title=title))
        if predictions is not None:
            save_group_predictions(
                predictions(group.name), method, clip, group, prediction, templates, proximity=proximity
            )
    if "base" in results and "new" in results:
        results["hm"] = base_new_means(results["base"], results["new"])
    return results


def save_group_predictions(
    path: Path,
    method: PromptMethod,
    clip: LoadedClip,
    group: EvalGroup,
    prediction: Prediction,
    templates: Sequence[str],
    *,
    proximity: torch.Tensor | None = None,
) -> None:
    """``fastcal.runs.predictions`` file of one evaluated group (with the frozen hand-crafted prompt's
    class features when ``templates`` are given, and each sample's ``proximity``)."""
    from fastcal.models.cache import class_text_features

    zeroshot = None
    if templates:
        zeroshot = class_text_features(clip.model, clip.tokenizer, group.classnames, list(templates[:1]))
    save_predictions(
        path,
        prediction.logits,
        prediction.labels,
        group.classnames,
        logit_scale=float(method.clip_model.logit_scale.detach().float().exp()),
        text_features=prediction.text_features,
        zeroshot_text_features=zeroshot,
        proximity=proximity,
    )


def evaluate_groups(run: Run, output: Path | None) -> dict[str, Any]:
    """Reports per evaluation group (+ HM for base/new) and reliability diagrams in ``output``."""
    config = run.config
    title = f"{run.spec.title} ({config.loss}) on {run.data.name}"
    results = report_groups(
        run.method,
        run.clip,
        run.data.groups,
        n_bins=config.n_bins,
        diagram=(lambda g: (output / f"reliability_{g}.png", f"{title}, {g} classes")) if output else None,
        predictions=(lambda g: predictions_path(output, g)) if output else None,
        templates=run.data.templates,
        device=run.device,
        batch_size=config.eval_batch_size,
        cache_dir=config.cache_dir,
        progress=config.progress,
        num_workers=config.num_workers,
        model_key=run.model_key,
    )
    run.method.set_classnames(run.data.train_classnames)
    return results


# ---- checkpoints -----------------------------------------------------------------------------------
def _save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(run: Run, path: Path, epochs_done: int, history: list[dict[str, Any]]) -> None:
    _save_torch(
        path,
        {
            "epochs_done": epochs_done,
            "tuned": run.method.tuned_state_dict(),
            "step": run.step.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": _rng_state(),
            "history": history,
            "config": run.config.to_dict(),
        },
    )


def load_checkpoint(run: Run, path: Path) -> tuple[int, list[dict[str, Any]]]:
    """Restore ``run`` from ``path``; returns (epochs done, history). The config must match."""
    state = load_torch_file(
        path,
        what="checkpoint",
        hint="remove it to restart the run from its first epoch with --resume, or pass --overwrite",
    )
    if not isinstance(state, dict) or not {"epochs_done", "tuned", "config", "rng"} <= set(state):
        raise fail("checkpoint", f"a fastcal training checkpoint in {path}", "a file of another kind")
    saved, current = state["config"], run.config.to_dict()
    differing = sorted(k for k in current if k not in RESUME_FREE_KEYS and saved.get(k) != current[k])
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differing)
        raise fail("resume", f"the config of the checkpoint {path}", f"a different config ({detail})")
    run.method.load_tuned_state_dict(state["tuned"])
    run.step.load_state_dict(state["step"])
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["epochs_done"]), list(state["history"])


def save_prompt(run: Run, path: Path) -> None:
    """The learned prompt: the tuned parameters and what is needed to rebuild the method."""
    config = run.config
    _save_torch(
        path,
        {
            "format": PROMPT_FORMAT,
            "method": run.spec.name,
            "options": method_options(run.spec, config),
            "classnames": run.data.train_classnames,
            "tuned": run.method.tuned_state_dict(),
            "model": {
                "name": config.model,
                "pretrained": config.pretrained,
                "fingerprint": run.model_key,
            },
            "config": config.to_dict(),
        },
    )


def _read_prompt_file(path: str | Path, what: str = "prompt") -> dict[str, Any]:
    """The contents of a saved prompt (a file, or a run folder holding ``prompt.pt``), format checked;
    errors name ``what``."""
    path = Path(path)
    if path.is_dir():
        path = path / PROMPT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: expected a saved prompt file ({PROMPT_NAME}), got {path}, not found"
        )
    state = load_torch_file(path, what=what)
    if not isinstance(state, dict) or state.get("format") != PROMPT_FORMAT:
        raise fail(
            what,
            f"a fastcal prompt file of format {PROMPT_FORMAT} in {path}",
            f"format {state.get('format')!r}" if isinstance(state, dict) else type(state).__name__,
        )
    return state


def load_prompt(path: str | Path, clip: LoadedClip, *, device: str | torch.device = "cpu") -> PromptMethod:
    """Rebuild the method saved by a training run (``prompt.pt``) on ``clip``'s model."""
    state = _read_prompt_file(path)
    method = build_method(
        state["method"], clip.model, clip.tokenizer, list(state["classnames"]), **state["options"]
    )
    method.load_tuned_state_dict(state["tuned"])
    return method.to(device)


def prompt_metadata(path: str | Path, what: str = "prompt") -> dict[str, Any]:
    """The saved prompt's method, model and config (without rebuilding it); errors name ``what``."""
    state = _read_prompt_file(path, what)
    return {k: state[k] for k in ("method", "options", "classnames", "model", "config")}


# ---- the run ---------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    *,
    clip: LoadedClip | None = None,
    splits: DatasetSplits | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``config.method`` and evaluate it; returns the results dict (also written to ``output``).

    Args:
        config: the run's configuration (resolved against the method's recipe here); ``output`` is held
            as a run folder (``fastcal.runs.folder``: ``resume`` continues the run it holds,
            ``overwrite`` replaces it).
        clip, splits: an already loaded model and dataset (default: from the config).
        stop_after: stop after this many epochs in total, without evaluating (as a preempted job
            would); a later call with ``resume=True`` continues. Returns ``{}`` then.
    """
    config = config.resolved()
    if config.output is None:
        if config.resume:
            raise fail("resume", "an output folder with a checkpoint", "no output folder")
        return _train(config, None, clip=clip, splits=splits, stop_after=stop_after)
    rules = {"resume": config.resume, "overwrite": config.overwrite}
    with RunFolder.open(config.output, kind="train", **rules) as folder:
        return _train(config, folder, clip=clip, splits=splits, stop_after=stop_after)


def _train(
    config: TrainConfig,
    folder: RunFolder | None,
    *,
    clip: LoadedClip | None,
    splits: DatasetSplits | None,
    stop_after: int | None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    run = prepare(config, clip=clip, splits=splits)
    config = run.config
    output = folder.path if folder is not None else None
    checkpoint = output / CHECKPOINT_NAME if output is not None else None
    epochs_done, history = 0, []
    if folder is not None:
        if folder.manifest() is None:
            folder.write_manifest({"config": config.to_dict(), "model_fingerprint": run.model_key})
        if config.resume and checkpoint.is_file():
            epochs_done, history = load_checkpoint(run, checkpoint)
    last = config.epochs if stop_after is None else min(stop_after, config.epochs)
    bar = tqdm(
        range(epochs_done, last),
        initial=epochs_done,
        total=config.epochs,
        desc=f"{run.spec.name} ({config.loss})",
        disable=not config.progress,
        leave=False,
    )
    for epoch in bar:
        stats = train_epoch(run, epoch)
        history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.3f}")
        if checkpoint is not None:
            save_checkpoint(run, checkpoint, epoch + 1, history)
    if last < config.epochs:
        return {}
    results = evaluate_groups(run, output)
    results["config"] = {**config.to_dict(), "recipe_source": run.spec.source}
    results["train"] = {"history": history, "seconds": time.perf_counter() - start}
    if output is not None:
        save_prompt(run, output / PROMPT_NAME)
        write_json_atomic(output / RESULTS_NAME, results)
    return results
