"""Whole runs: data and backbone set-up, fine-tuning with checkpoints, evaluation, results.json;
and the WiSE-FT sweep over a finished run. The ``fastcal finetune`` / ``fastcal wise`` commands and the
demo stage are thin wrappers around ``run_finetune`` and ``run_wise``.

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

Output folder of ``run_finetune``: ``results.json`` (``{"id", "ood", "config"}``), ``model.safetensors``
(the fine-tuned CLIP's state dict; FT also writes ``head.safetensors``), ``checkpoint.safetensors`` (for
``resume``), ``train_log.jsonl`` and ``reliability/<set>.png`` (and ``<set>_ts.png`` after temperature
scaling).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcal._checks import check_int, fail
from fastcal._io import canonical_json, load_tensors, save_tensors, write_json_atomic
from fastcal.data.items import Item
from fastcal.finetune.config import ECE_BINS, PUBLISHED_SOURCES, WISE_ALPHA, FinetuneConfig
from fastcal.finetune.distributed import DistributedContext, barrier
from fastcal.finetune.evaluate import (
    EvalSet,
    FigureHook,
    clip_classifier,
    diagram_writer,
    evaluate,
    head_classifier,
)
from fastcal.models.fingerprint import model_fingerprint
from fastcal.runs.folder import RunFolder, hold_run_folder, run_kind

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
def build_method(
    config: FinetuneConfig,
    model: nn.Module,
    tokenizer: Any,
    data: FinetuneData,
    *,
    context: DistributedContext,
    cache_dir: str | os.PathLike | None = None,
):
    """The method object of ``config.method`` for ``Finetuner``."""
    rank, world_size = context.rank, context.world_size
    if config.method == "ft":
        from fastcal.finetune.ft import FtMethod
        from fastcal.models.cache import class_text_features

        features = class_text_features(model, tokenizer, data.classnames, data.templates, cache_dir=cache_dir)
        return FtMethod(model, features, label_smoothing=config.label_smoothing)
    if config.method == "flyp":
        from fastcal.finetune.flyp import FlypMethod

        return FlypMethod(model, label_smoothing=config.label_smoothing, rank=rank, world_size=world_size)
    from fastcal.finetune.carot import CarotMethod

    return CarotMethod(
        model,
        label_smoothing=config.label_smoothing,
        distill_weight=config.distill_weight,
        teacher_update_every=config.teacher_update_every,
        momentum_start=config.momentum_start,
        momentum_end=config.momentum_end,
        momentum_warmup_fraction=config.momentum_warmup_fraction,
        cross_modal_weight=config.cross_modal_weight,
        orthogonality_weight=config.orthogonality_weight,
        rank=rank,
        world_size=world_size,
    )


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


def run_finetune(
    config: FinetuneConfig,
    data: FinetuneData,
    backbone: Any,
    output: str | os.PathLike,
    *,
    model_name: str,
    pretrained: str | None,
    context: DistributedContext | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    eval_batch_size: int = 256,
    checkpoint_every: int | None = None,
    log_every: int = 50,
    n_bins: int = ECE_BINS,
    diagrams: bool = True,
    figure: FigureHook | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune ``backbone`` (a ``LoadedClip``) with ``config`` on ``data``, evaluate, write ``output``.

    The main process holds ``output`` (``fastcal.runs.folder.RunFolder``): with ``resume`` the run it
    holds is continued from its checkpoint (a finished run is only re-evaluated), with ``overwrite`` it
    is replaced, and without either a folder holding a run is an error. ``figure`` replaces the
    reliability diagrams of ``diagrams`` (``fastcal.finetune.evaluate.evaluate``). Returns the results.
    """

    output = Path(output)
    context = context or DistributedContext(device=backbone.model.logit_scale.device)
    model = backbone.model
    run_key = {
        "finetune": config.to_dict(),
        "model": model_name,
        "pretrained": pretrained,
        "backbone_fingerprint": model_fingerprint(model),
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

    with hold_run_folder(output, kind="finetune", resume=resume, overwrite=overwrite, prepare=prepare):
        return _run_finetune(
            config,
            data,
            backbone,
            output,
            run_key,
            context=context,
            resume=resume,
            num_workers=num_workers,
            eval_batch_size=eval_batch_size,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            n_bins=n_bins,
            diagrams=diagrams,
            figure=figure,
            progress=progress,
            cache_dir=cache_dir,
        )


def _run_finetune(
    config: FinetuneConfig,
    data: FinetuneData,
    backbone: Any,
    output: Path,
    run_key: dict[str, Any],
    *,
    context: DistributedContext,
    resume: bool,
    num_workers: int,
    eval_batch_size: int,
    checkpoint_every: int | None,
    log_every: int,
    n_bins: int,
    diagrams: bool,
    figure: FigureHook | None,
    progress: bool,
    cache_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    from fastcal.finetune.data import TrainingViews
    from fastcal.finetune.flyp import CaptionSampler
    from fastcal.finetune.trainer import Finetuner, total_steps, train

    model, tokenizer = backbone.model, backbone.tokenizer
    checkpoint = output / CHECKPOINT_FILE
    method = build_method(config, model, tokenizer, data, context=context, cache_dir=cache_dir)
    steps = total_steps(len(data.train), config)
    finetuner = Finetuner(method, config, steps, context=context)
    if resume:
        finetuner.load_checkpoint(checkpoint, run_key)
    captions = CaptionSampler(tokenizer, data.classnames, data.templates) if method.uses_captions else None
    views = TrainingViews(data.train, backbone.train_transform, seed=config.seed, captions=captions)
    train(
        finetuner,
        views,
        num_workers=num_workers,
        checkpoint_path=checkpoint,
        checkpoint_key=run_key,
        checkpoint_every=checkpoint_every,
        log_path=output / LOG_FILE,
        log_every=log_every,
        progress=progress,
    )
    model.eval()
    head = getattr(method, "head", None)
    if context.is_main:
        save_tensors(output / MODEL_FILE, model.state_dict(), _model_key(run_key, "clip"))
        if head is not None:
            save_tensors(output / HEAD_FILE, dict(head.state_dict()), _model_key(run_key, "head"))
    barrier(context)
    classifier_for = classifier_factory(
        model, tokenizer, head=head, train_classnames=data.classnames, cache_dir=cache_dir
    )
    results = evaluate(
        classifier_for,
        data.test,
        data.heldout,
        data.ood,
        backbone.eval_transform,
        context=context,
        n_bins=n_bins,
        figure=figure
        or (diagram_writer(output / DIAGRAMS, config.method.upper(), n_bins=n_bins) if diagrams else None),
        batch_size=eval_batch_size,
        num_workers=num_workers,
        precision=config.precision,
        progress=progress,
    )
    results["config"] = {
        "method": config.method,
        **run_key,
        "total_steps": steps,
        "train_images": len(data.train),
        "world_size": context.world_size,
        "n_bins": n_bins,
        "reference": PUBLISHED_SOURCES[config.method],
    }
    if context.is_main:
        write_json_atomic(output / RESULTS, results)
    return results


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
    if config.method == "ft":
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
                output / DIAGRAMS, f"WiSE-{config.method.upper()} alpha={select:g}", n_bins=n_bins
            )
        sweep = []
        for alpha in values:
            model.load_state_dict(interpolate_state_dicts(zero_shot, fine_tuned, alpha))
            if head is not None:
                head.load_state_dict(interpolate_state_dicts(zero_shot_heads, dict(fine_tuned_heads), alpha))
            classifier_for = classifier_factory(
                model, tokenizer, head=head, train_classnames=data.classnames, cache_dir=cache_dir
            )
            result = evaluate(
                classifier_for,
                data.test,
                data.heldout,
                data.ood,
                backbone.eval_transform,
                context=context,
                n_bins=n_bins,
                figure=figure if alpha == float(select) else None,
                batch_size=eval_batch_size,
                num_workers=num_workers,
                precision=config.precision,
                progress=progress,
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
