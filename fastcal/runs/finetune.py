"""Robust fine-tuning runs (``fastcal finetune``) and WiSE-FT sweeps over them (``fastcal wise``).

Data (``FinetuneData``):

- the embedded testbed (``testbed_data``): the digits of ``fastcal.data.testbed`` restricted to the base
  classes 0-4 (``base_new_split``); train on their train split, fit the temperature on their val split,
  ID = their test split, OOD = the same test images style-shifted (``fastcal.data.testbed.shifted``:
  shear and tint), named ``digits_shifted``;
- a dataset of ``fastcal.data.load_dataset`` (``dataset_data``): train on its train split; held-out ID
  images for the temperature from its val split, or, when it has none (ImageNet), ``heldout`` train images
  drawn with ``random.Random(seed)`` and left out of training; ID = its test split; OOD = the named
  datasets under the same root (ImageNet's default: ImageNet-V2, -R, -A, -Sketch and ObjectNet, each
  used where present).

The method comes from ``fastcal.registry`` (kind ``"finetune_method"``: FT, FLYP, CaRot), its
hyperparameters from its published recipe (or its testbed schedule without a dataset) under the ones
the settings give. Run folder of ``run_finetune``: ``run.json``, ``results.json`` (``{"id", "ood",
"config"}``), ``predictions/<set>.npz`` for the ID test set and each OOD set, ``model.safetensors`` (the
fine-tuned CLIP's state dict; FT also writes ``head.safetensors``), ``checkpoint.safetensors`` (for
``resume``), ``train_log.jsonl`` and ``reliability/<set>.png`` (and ``<set>_ts.png`` after temperature
scaling).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcal import registry
from fastcal._checks import check_choice, check_device, check_int, fail
from fastcal._io import canonical_json, load_tensors, save_tensors, write_json_atomic
from fastcal.data.items import Item
from fastcal.data.registry import DATASETS
from fastcal.finetune.config import ECE_BINS, PUBLISHED_MODEL, WISE_ALPHA, FinetuneConfig
from fastcal.finetune.distributed import DistributedContext, barrier, init_distributed
from fastcal.finetune.evaluate import (
    EvalSet,
    FigureHook,
    PredictionsHook,
    clip_classifier,
    diagram_writer,
    evaluate,
    head_classifier,
)
from fastcal.metrics.functional import MAX_BINS
from fastcal.models.fingerprint import model_fingerprint
from fastcal.runs.folder import RunFolder, check_run_folder, hold_run_folder, run_kind
from fastcal.runs.options import Settings, setting
from fastcal.runs.predictions import predictions_path, save_predictions

TESTBED = "testbed"
TESTBED_MODEL = "fastcal-testbed"
RANDOM_INIT = "none"
DEFAULT_OOD: dict[str, tuple[str, ...]] = {
    "imagenet": ("imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet"),
}
RESULTS = "results.json"
MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "train_log.jsonl"
DIAGRAMS = "reliability"


@dataclass(frozen=True)
class FinetuneData:
    """Training items, held-out ID set (temperature), ID test set and OOD sets of a run."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: list[Item]
    heldout: EvalSet
    test: EvalSet
    ood: tuple[EvalSet, ...]
    source: dict[str, Any]


def testbed_data() -> FinetuneData:
    """The embedded testbed (module docstring): base digits 0-4; OOD = their style-shifted test images."""
    from fastcal.data.protocols import base_new_split
    from fastcal.data.testbed import digits_splits, shifted

    base = base_new_split(digits_splits(0)).base.splits
    names, templates = list(base.classnames), list(base.templates)
    return FinetuneData(
        name="digits",
        classnames=names,
        templates=templates,
        train=list(base.train),
        heldout=EvalSet("digits_heldout", names, templates, list(base.val)),
        test=EvalSet("digits", names, templates, list(base.test)),
        ood=(EvalSet("digits_shifted", names, templates, shifted(base.test)),),
        source={"dataset": TESTBED},
    )


def dataset_data(
    dataset: str,
    root: str | os.PathLike,
    *,
    ood: Sequence[str] | None = None,
    heldout: int | None = None,
    seed: int = 0,
) -> FinetuneData:
    """A dataset of ``fastcal.data.load_dataset`` and its OOD sets (module docstring).

    Args:
        ood: OOD dataset names (``fastcal.data.DATASETS`` or "objectnet"); each must be present. None:
            the dataset's defaults (``DEFAULT_OOD``), each used where present.
        heldout: held-out train images for the temperature when the dataset has no val split (default
            ``min(10000, len(train) // 10)``).
    """
    from fastcal.data import load_dataset

    splits = load_dataset(dataset, root)
    if not splits.train:
        raise fail(
            "dataset", f"a dataset with training images ({dataset} has no train split under {root})", dataset
        )
    names, templates = list(splits.classnames), list(splits.templates)
    train = list(splits.train)
    if splits.val:
        held_items, count = list(splits.val), None
    else:
        count = min(10000, len(train) // 10) if heldout is None else check_int("heldout", heldout, minimum=1)
        if count < 1 or count >= len(train):
            raise fail("heldout", f"between 1 and {len(train) - 1} held-out train images", count)
        chosen = set(random.Random(seed).sample(range(len(train)), count))
        held_items = [item for i, item in enumerate(train) if i in chosen]
        train = [item for i, item in enumerate(train) if i not in chosen]
    explicit = ood is not None
    ood_sets = []
    for name in DEFAULT_OOD.get(dataset, ()) if ood is None else ood:
        eval_set = _ood_set(name, root, names, required=explicit)
        if eval_set is not None:
            ood_sets.append(eval_set)
    return FinetuneData(
        name=dataset,
        classnames=names,
        templates=templates,
        train=train,
        heldout=EvalSet(f"{dataset}_heldout", names, templates, held_items),
        test=EvalSet(dataset, names, templates, list(splits.test)),
        ood=tuple(ood_sets),
        source={
            "dataset": dataset,
            "root": str(Path(root).expanduser().absolute()),
            "ood": [s.name for s in ood_sets],
            "heldout": count,
            "seed": seed,
        },
    )


def _ood_set(
    name: str, root: str | os.PathLike, id_classnames: list[str], *, required: bool
) -> EvalSet | None:
    from fastcal.data import load_dataset

    if name == "objectnet":
        from fastcal.finetune.objectnet import load_objectnet

        eval_set = load_objectnet(root, id_classnames)
        if eval_set is None and required:
            raise FileNotFoundError(f"objectnet: expected {Path(root) / 'objectnet-1.0'}, not found")
        return eval_set
    try:
        splits = load_dataset(name, root)
    except FileNotFoundError:
        if required:
            raise
        return None
    return EvalSet(name, list(splits.classnames), list(splits.templates), list(splits.test))


def data_from_source(source: dict[str, Any], *, root: str | os.PathLike | None = None) -> FinetuneData:
    """Rebuild the data of a run from its recorded ``source`` (``root`` overrides the recorded one)."""
    if source.get("dataset") == TESTBED:
        return testbed_data()
    data = dataset_data(
        source["dataset"],
        root if root is not None else source["root"],
        ood=source.get("ood", []),
        heldout=source.get("heldout"),
        seed=source.get("seed", 0),
    )
    return data


# ---- backbone -----------------------------------------------------------------------------------------
def load_backbone(
    model: str,
    pretrained: str | None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
):
    """The CLIP to fine-tune, as a ``LoadedClip``.

    ``model`` "fastcal-testbed" is the embedded testbed CLIP (pretrained and cached on first use when
    ``pretrained`` is None); any other name goes to ``fastcal.models.load_clip`` (None: random init).
    ``pretrained="none"`` gives a random initialization seeded by ``seed`` (so ``fastcal wise`` can
    rebuild it).
    """
    from fastcal.models import LoadedClip, load_clip

    random_init = pretrained == RANDOM_INIT or (pretrained is None and model != TESTBED_MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        if model == TESTBED_MODEL:
            import open_clip

            from fastcal.models.testbed import build_testbed_model, load_testbed_clip, make_testbed_transforms

            if random_init:
                train_transform, eval_transform = make_testbed_transforms()
                loaded = LoadedClip(
                    build_testbed_model().eval(),
                    open_clip.get_tokenizer(TESTBED_MODEL),
                    train_transform,
                    eval_transform,
                )
            else:
                loaded = load_testbed_clip(progress=progress)
        else:
            loaded = load_clip(model, None if random_init else pretrained, device=device)
    loaded.model.to(device)
    return loaded


# ---- fine-tuning --------------------------------------------------------------------------------------
def classifier_factory(
    model: nn.Module,
    tokenizer: Any,
    *,
    head: nn.Linear | None = None,
    train_classnames: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Callable[[EvalSet], nn.Module]:
    """Classifier of an evaluation set: FT's head rows when ``head`` is given, else zero-shot CLIP. The
    model must not change while its sets are evaluated: its weights are hashed once, for every set."""
    model_key: str | None = None

    def build(eval_set: EvalSet) -> nn.Module:
        nonlocal model_key
        names = eval_set.classifier_classnames
        if head is not None:
            return head_classifier(model.visual, head, train_classnames, names)
        if model_key is None:
            model_key = model_fingerprint(model)
        return clip_classifier(
            model, tokenizer, names, eval_set.templates, cache_dir=cache_dir, model_key=model_key
        )

    return build


def _model_key(run_key: dict[str, Any], what: str) -> dict[str, Any]:
    return {"kind": f"fastcal_finetuned_{what}", "format": 1, "run": run_key}


@dataclass
class FinetuneRunConfig(Settings):
    """The settings of a fine-tuning run; unset hyperparameters come from the method's recipe."""

    method: str | None = setting(
        None, help="fine-tuning method: " + ", ".join(registry.names("finetune_method"))
    )
    dataset: str | None = setting(None, help="a fastcal dataset name (unset: the embedded testbed)")
    root: str | None = setting(None, help="the folder holding the datasets")
    output: str | None = setting(None, help="the run folder")
    ood: list[str] | None = setting(None, help="OOD datasets, comma-separated (unset: the dataset's own)")
    heldout: int | None = setting(None, help="held-out train images for temperature scaling")
    model: str | None = setting(None, help="open_clip architecture (unset: ViT-B-16, or the testbed's)")
    pretrained: str | None = setting(
        None, help="pretrained tag or checkpoint file; 'none': random initialization (unset: openai)"
    )
    learning_rate: float | None = setting(None, help="peak learning rate", flags=("--lr",))
    weight_decay: float | None = setting(None, help="AdamW weight decay")
    batch_size: int | None = setting(None, help="global batch over all processes")
    epochs: int | None = setting(None, help="passes over the training images")
    max_steps: int | None = setting(None, help="stop after this many steps")
    warmup_steps: int | None = setting(None, help="linear warm-up steps")
    label_smoothing: float | None = setting(None, help="label smoothing epsilon")
    grad_clip_norm: float | None = setting(None, help="clip the gradient norm", flags=("--grad-clip",))
    distill_weight: float | None = setting(None, help="CaRot's lambda (paper normalization)")
    teacher_update_every: int | None = setting(None, help="CaRot's EMA interval (steps)")
    cross_modal_weight: float | None = setting(None, help="CaRot's ||W_v W_t^T||_F weight")
    orthogonality_weight: float | None = setting(None, help="CaRot's ||W_v^T W_v - I||_F weight")
    seed: int | None = setting(None, help="data order, augmentations and caption draws")
    precision: str | None = setting(None, help="autocast precision: fp32, bf16 or fp16")
    grad_checkpointing: bool | None = setting(None, help="recompute blocks in the backward pass")
    device: str = setting("auto", help="auto (CUDA when available), cpu or cuda")
    num_workers: int | None = setting(
        None, help="data-loading workers (unset: 8, or 0 on the testbed)", flags=("--workers",)
    )
    n_bins: int = setting(ECE_BINS, help="ECE bins (CaRot reports 10)")
    eval_batch_size: int = setting(256, help="evaluation batch size")
    checkpoint_every: int = setting(1000, help="steps between checkpoints")
    log_every: int = setting(50, help="steps between log lines")
    diagrams: bool = setting(True, help="reliability diagrams", negative="--no-diagrams")
    keep_checkpoint: bool = setting(
        True, help="keep checkpoint.safetensors once the run is done (--resume re-evaluates from it)"
    )
    resume: bool = setting(False, help="continue from the output folder's checkpoint")
    overwrite: bool = setting(False, help="replace the run --output holds (its files are removed)")
    progress: bool = setting(True, help="progress bars", negative="--quiet")

    def validate(self) -> FinetuneRunConfig:
        if self.method is None:
            raise fail("method", "one of " + ", ".join(registry.names("finetune_method")), "none")
        registry.get("finetune_method", self.method, argument="method")
        if self.dataset is not None:
            check_choice("dataset", self.dataset, DATASETS)
            if self.root is None:
                raise fail("root", "the datasets folder with --dataset", "none")
        elif self.root is not None or self.ood is not None or self.heldout is not None:
            raise fail(
                "root", "no --root, --ood or --heldout without --dataset (the testbed has its data)", "some"
            )
        for name in ("eval_batch_size", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("n_bins", self.n_bins, minimum=1, maximum=MAX_BINS)
        if self.num_workers is not None:
            check_int("num_workers", self.num_workers, minimum=0)
        if self.heldout is not None:
            check_int("heldout", self.heldout, minimum=1)
        check_device("device", self.device)
        if self.model not in (None, TESTBED_MODEL) and not self.model.startswith(("local-dir:", "hf-hub:")):
            import open_clip

            if open_clip.get_model_config(self.model.replace("/", "-")) is None:
                raise fail("model", f"an open_clip architecture or {TESTBED_MODEL!r}", repr(self.model))
        self.hyperparameters()  # FinetuneConfig's own checks
        return self

    def hyperparameters(self) -> FinetuneConfig:
        """The method's recipe (its testbed schedule without a dataset) under the values given here."""
        spec = registry.get("finetune_method", self.method)
        recipe = spec.testbed if self.dataset is None else spec.published
        names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"method"}
        return recipe.replace(**{name: getattr(self, name) for name in names if hasattr(self, name)})

    def backbone(self) -> tuple[str, str | None]:
        """(model, pretrained): the testbed's CLIP or the published ViT-B/16 unless given."""
        if self.model is None:
            model, pretrained = (TESTBED_MODEL, None) if self.dataset is None else PUBLISHED_MODEL
        else:
            model, pretrained = self.model, None
        return model, self.pretrained if self.pretrained is not None else pretrained


def run_finetune(
    settings: FinetuneRunConfig,
    *,
    data: FinetuneData | None = None,
    backbone: Any = None,
    figure: FigureHook | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune and evaluate into the run folder ``settings.output``; returns the results.

    The main process holds the folder (``fastcal.runs.folder``): with ``resume`` the run it holds is
    continued from its checkpoint (a finished run is only re-evaluated), with ``overwrite`` it is
    replaced, and without either a folder holding a run is an error. ``data`` and ``backbone`` (a
    ``LoadedClip``): already loaded ones (default: from the settings; under ``torchrun`` every rank
    loads its own); ``figure`` replaces the reliability diagrams
    (``fastcal.finetune.evaluate.evaluate``).
    """
    if settings.output is None:
        raise fail("output", "a run folder", "none")
    config = settings.hyperparameters()
    output = check_run_folder(
        settings.output, kind="finetune", resume=settings.resume, overwrite=settings.overwrite
    )
    model_name, pretrained = settings.backbone()
    if backbone is None:
        context = init_distributed(check_device("device", settings.device))
        progress = settings.progress and context.is_main
        backbone = load_backbone(
            model_name, pretrained, device=context.device, seed=config.seed, progress=progress
        )
    else:
        context = DistributedContext(device=backbone.model.logit_scale.device)
    if data is None:
        if settings.dataset is None:
            data = testbed_data()
        else:
            data = dataset_data(
                settings.dataset, settings.root, ood=settings.ood, heldout=settings.heldout, seed=config.seed
            )
    run_key = {
        "finetune": config.to_dict(),
        "model": model_name,
        "pretrained": pretrained,
        "backbone_fingerprint": model_fingerprint(backbone.model),
        "data": data.source,
    }

    def prepare(folder: RunFolder) -> None:
        previous = folder.manifest()
        if previous is None:
            folder.write_manifest({"run": run_key})
        elif canonical_json(previous.get("run")) != canonical_json(run_key):
            changed = sorted(k for k in run_key if previous.get("run", {}).get(k) != run_key[k])
            raise fail(
                "--resume",
                f"the settings of the run in {output} (they differ in {', '.join(changed)})",
                "other settings; use another --output, or --overwrite to replace that run",
            )

    rules = {"resume": settings.resume, "overwrite": settings.overwrite}
    with hold_run_folder(output, kind="finetune", prepare=prepare, **rules):
        return _run_finetune(config, settings, data, backbone, output, run_key, context, figure, cache_dir)


def _run_finetune(
    config: FinetuneConfig,
    settings: FinetuneRunConfig,
    data: FinetuneData,
    backbone: Any,
    output: Path,
    run_key: dict[str, Any],
    context: DistributedContext,
    figure: FigureHook | None,
    cache_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    from fastcal.finetune.data import TrainingViews
    from fastcal.finetune.flyp import CaptionSampler
    from fastcal.finetune.trainer import Finetuner, total_steps, train

    model, tokenizer = backbone.model, backbone.tokenizer
    checkpoint = output / CHECKPOINT_FILE
    spec = registry.get("finetune_method", config.method)
    method = spec.build(
        config,
        model,
        tokenizer,
        data.classnames,
        data.templates,
        rank=context.rank,
        world_size=context.world_size,
        cache_dir=cache_dir,
    )
    steps = total_steps(len(data.train), config)
    finetuner = Finetuner(method, config, steps, context=context)
    if settings.resume:
        finetuner.load_checkpoint(checkpoint, run_key)
    num_workers = (
        settings.num_workers if settings.num_workers is not None else (0 if settings.dataset is None else 8)
    )
    progress = settings.progress and context.is_main
    captions = CaptionSampler(tokenizer, data.classnames, data.templates) if method.uses_captions else None
    views = TrainingViews(data.train, backbone.train_transform, seed=config.seed, captions=captions)
    train(
        finetuner,
        views,
        num_workers=num_workers,
        checkpoint_path=checkpoint,
        checkpoint_key=run_key,
        checkpoint_every=settings.checkpoint_every,
        log_path=output / LOG_FILE,
        log_every=settings.log_every,
        progress=progress,
    )
    model.eval()
    head = getattr(method, "head", None)
    if context.is_main:
        save_tensors(output / MODEL_FILE, model.state_dict(), _model_key(run_key, "clip"))
        if head is not None:
            save_tensors(output / HEAD_FILE, dict(head.state_dict()), _model_key(run_key, "head"))
    barrier(context)
    if figure is None and settings.diagrams:
        figure = diagram_writer(output / DIAGRAMS, spec.title, n_bins=settings.n_bins)
    results = evaluate_model(
        backbone,
        head,
        data,
        output,
        context=context,
        n_bins=settings.n_bins,
        figure=figure,
        batch_size=settings.eval_batch_size,
        num_workers=num_workers,
        precision=config.precision,
        progress=progress,
        cache_dir=cache_dir,
    )
    results["config"] = {
        "method": config.method,
        **run_key,
        "total_steps": steps,
        "train_images": len(data.train),
        "world_size": context.world_size,
        "n_bins": settings.n_bins,
        "reference": spec.source,
    }
    if context.is_main:
        write_json_atomic(output / RESULTS, results)
        if not settings.keep_checkpoint:
            checkpoint.unlink(missing_ok=True)
    return results


def evaluate_model(
    backbone: Any,
    head: nn.Linear | None,
    data: FinetuneData,
    output: Path | None,
    *,
    context: DistributedContext,
    n_bins: int,
    figure: FigureHook | None,
    batch_size: int,
    num_workers: int,
    precision: str,
    progress: bool,
    cache_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    """``fastcal.finetune.evaluate.evaluate`` of the backbone as it is now (with FT's ``head``) on the
    data's ID and OOD sets; the predictions go to ``output`` (none without it)."""
    classifier_for = classifier_factory(
        backbone.model, backbone.tokenizer, head=head, train_classnames=data.classnames, cache_dir=cache_dir
    )
    return evaluate(
        classifier_for,
        data.test,
        data.heldout,
        data.ood,
        backbone.eval_transform,
        context=context,
        n_bins=n_bins,
        figure=figure,
        predictions=None if output is None else prediction_writer(output, backbone.model),
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        progress=progress,
    )


def prediction_writer(output: Path, model: nn.Module) -> PredictionsHook:
    """A ``predictions`` hook saving ``output/predictions/<set>.npz`` (``fastcal.runs.predictions``; the
    logits in float64, as the reports are computed)."""
    scale = float(model.logit_scale.detach().float().exp())

    def write(eval_set: EvalSet, logits: torch.Tensor, labels: torch.Tensor) -> None:
        save_predictions(
            predictions_path(output, eval_set.name),
            logits.double(),
            labels,
            eval_set.classnames,
            logit_scale=scale,
        )

    return write


# ---- WiSE-FT ------------------------------------------------------------------------------------------
def run_wise(
    run_dir: str | os.PathLike,
    alphas: Sequence[float],
    output: str | os.PathLike,
    *,
    select: float = WISE_ALPHA,
    root: str | os.PathLike | None = None,
    context: DistributedContext | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    eval_batch_size: int = 256,
    n_bins: int = ECE_BINS,
    diagrams: bool = True,
    figure: FigureHook | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    data: FinetuneData | None = None,
    backbone: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate ``theta(alpha)`` (``fastcal.finetune.wise``) of a finished ``run_finetune`` folder.

    ``results.json`` in ``output``: ``"id"`` / ``"ood"`` of alpha ``select`` (added to the sweep if
    missing; CaRot's 0.5), ``"sweep"``: ``[{"alpha", "id", "ood"}, ...]``, and ``"config"``. Reliability
    diagrams are drawn for ``select`` (or ``figure`` is called for it). ``data`` and ``backbone`` (the
    zero-shot model) may be passed in when the caller holds them; they are rebuilt from the run's config
    otherwise. ``output`` is held as a run folder (``fastcal.runs.folder``): a folder that holds a run
    is refused unless ``overwrite``.
    """
    from fastcal.finetune.ft import zero_shot_head
    from fastcal.finetune.wise import interpolate_state_dicts
    from fastcal.models.cache import class_text_features

    run_dir, output = Path(run_dir), Path(output)
    results_path = run_dir / RESULTS
    kind = run_kind(run_dir)
    if kind not in ("finetune", "earlier") or not results_path.is_file():
        found = "nothing" if kind is None else f"a {kind} run" if kind != "finetune" else "an unfinished run"
        raise fail("--finetuned", "a finished fastcal finetune run folder", f"{run_dir}, which holds {found}")
    saved = json.loads(results_path.read_text()).get("config", {})
    if "finetune" not in saved:
        raise fail(
            "--finetuned", "a finished fastcal finetune run folder", f"{run_dir}, which holds another run"
        )
    run_key = {k: saved[k] for k in ("finetune", "model", "pretrained", "backbone_fingerprint", "data")}
    config = FinetuneConfig.from_dict(saved["finetune"])
    if data is None:
        data = data_from_source(saved["data"], root=root)
    if backbone is None:
        backbone = load_backbone(
            saved["model"], saved["pretrained"], device=device, seed=config.seed, progress=progress
        )
    model, tokenizer = backbone.model, backbone.tokenizer
    model.eval()
    if model_fingerprint(model) != saved["backbone_fingerprint"]:
        raise fail(
            "backbone", "the zero-shot weights the run started from", f"other weights for {saved['model']}"
        )
    context = context or DistributedContext(device=model.logit_scale.device)
    zero_shot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fine_tuned = load_tensors(run_dir / MODEL_FILE, _model_key(run_key, "clip"))
    if fine_tuned is None:
        raise FileNotFoundError(
            f"run: expected the fine-tuned weights {run_dir / MODEL_FILE} of this run, not found or corrupt"
        )
    fine_tuned = {k: v.to(model.logit_scale.device) for k, v in fine_tuned.items()}
    head = None
    if (run_dir / HEAD_FILE).is_file():  # a method with its own head (FT): mixed like the towers
        features = class_text_features(model, tokenizer, data.classnames, data.templates, cache_dir=cache_dir)
        weight = zero_shot_head(features.to(model.logit_scale.device), model.logit_scale)
        zero_shot_heads = {"weight": weight, "bias": torch.zeros_like(weight[:, 0])}
        fine_tuned_heads = load_tensors(run_dir / HEAD_FILE, _model_key(run_key, "head"))
        if fine_tuned_heads is None:
            raise FileNotFoundError(f"run: expected the FT head {run_dir / HEAD_FILE}, not found or corrupt")
        head = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)

    def prepare(folder: RunFolder) -> None:
        folder.write_manifest({"finetuned": str(run_dir.absolute()), "run": run_key})

    with hold_run_folder(output, kind="wise", overwrite=overwrite, prepare=prepare):
        values = sorted(set(float(a) for a in alphas) | {float(select)})
        if figure is None and diagrams:
            figure = diagram_writer(
                output / DIAGRAMS,
                f"WiSE-{registry.get('finetune_method', config.method).title} alpha={select:g}",
                n_bins=n_bins,
            )
        sweep = []
        for alpha in values:
            model.load_state_dict(interpolate_state_dicts(zero_shot, fine_tuned, alpha))
            if head is not None:
                head.load_state_dict(interpolate_state_dicts(zero_shot_heads, dict(fine_tuned_heads), alpha))
            selected = alpha == float(select)
            result = evaluate_model(
                backbone,
                head,
                data,
                output if selected else None,
                context=context,
                n_bins=n_bins,
                figure=figure if selected else None,
                batch_size=eval_batch_size,
                num_workers=num_workers,
                precision=config.precision,
                progress=progress,
                cache_dir=cache_dir,
            )
            sweep.append({"alpha": alpha, **result})
        model.load_state_dict(zero_shot)
        chosen = next(entry for entry in sweep if entry["alpha"] == float(select))
        results = {
            "id": chosen["id"],
            "ood": chosen["ood"],
            "config": {
                **saved,
                "wise": {
                    "alphas": values,
                    "select": float(select),
                    "n_bins": n_bins,
                    "finetuned": str(run_dir.absolute()),
                },
            },
            "sweep": sweep,
        }
        if context.is_main:
            write_json_atomic(output / RESULTS, results)
        return results
