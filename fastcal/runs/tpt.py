"""Test-time tuning runs (``fastcal tpt``): per-sample records, resume, sharding, one final merge.

A run evaluates one method (``fastcal.registry`` kind ``"tpt_method"``: TPT, C-TPT and the zero-shot
baselines) from one initial context (kind ``"tpt_init"``: the hard prompt, FPP) on one dataset's test
items, and writes in its run folder (``fastcal.runs.folder``):

- ``run.json``: the resolved settings that the result depends on (``TptConfig.semantics``), the dataset
  and its items' fingerprint, the model fingerprint and the package versions; ``--resume`` refuses a
  folder written for anything else;
- ``records.jsonl``: one JSON line per test sample: ``index`` (position in the item list), ``label``,
  ``prediction``, ``confidence`` (top probability), ``entropy`` (of the predicted distribution),
  ``time`` (seconds, the step's wall time shared by its samples), ``p_label`` (probability of the true
  class), ``brier`` (``sum_c (p_c - [c = label])^2``) and ``logits``, the full row before any
  temperature (``fastcal.runs.records.encode_row``: float32, about 5.4 bytes per class). Every rank
  appends to the same file in batches of ``flush_every`` (``fastcal.runs.records``);
- after the merge: ``results.json`` (``calibration_summary`` with 15 and 20 bins: C-TPT and FPP report
  20; ``run.cuda_graph``: whether rank 0's step replayed a CUDA graph), ``reliability_{15,20}.png`` and
  ``predictions/<dataset>.npz`` (``fastcal.runs.predictions``).

Sample ``i``'s views come from a generator seeded by ``(seed, i)`` (``fastcal.tpt.augment
.sample_generator``), so a sample's result does not depend on the rank, the order or the
``samples_per_step`` grouping that handled it: a resumed or sharded run reproduces an uninterrupted one.
Under ``torch.distributed`` (``torchrun``), rank ``r`` of ``R`` takes the indices ``i = r (mod R)`` not yet
in the records; rank 0 holds the folder, and merges after a barrier. A temperature divides the final
logits (TPT + temperature scaling): a fixed value, or one fitted (``fastcal.calibrate.fit_temperature``)
on the method's logits over a labeled calibration set, computed once by rank 0 and cached in the folder.

Runs in one process over the same samples can share their views: given a ``ViewFeatureMemo``, a tuning
method's frozen view features are taken from it when an earlier run with the same view settings, seed and
sample put them there (exact: a sample's views depend on nothing else). Their ``time`` then counts the
tuning only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fastcal import registry
from fastcal._checks import check_choice, check_device, check_int, check_number, fail
from fastcal._io import append_jsonl, canonical_json, read_jsonl
from fastcal.data.items import Item, load_image
from fastcal.data.registry import DATASETS
from fastcal.models.clip import LoadedClip
from fastcal.runs.distributed import barrier, computed_once, rank_world
from fastcal.runs.folder import MANIFEST, RESULTS, RunFolder, check_run_folder, hold_run_folder
from fastcal.runs.options import Settings, setting
from fastcal.runs.predictions import predictions_path, save_predictions
from fastcal.runs.records import decode_rows, drop_torn_tail, encode_row, unique_records
from fastcal.tpt.augment import decode, sample_generator
from fastcal.tpt.fpp import FPPConfig
from fastcal.tpt.specs import Predictor
from fastcal.tpt.step import TuningConfig
from fastcal.tpt.tpt import TPT_CTX_INIT

ECE_BINS = (15, 20)
TUNING_WEIGHTS = ("dispersion_weight", "orthogonality_weight")
RECORDS = "records.jsonl"
TESTBED = "testbed"
DEFAULT_MODEL = ("ViT-B-16", "openai")
RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0
_FORMAT_VERSION = 2


@dataclass
class TptConfig(Settings):
    """The settings of a test-time tuning run; ``None``: the method's (and initialization's) recipe."""

    method: str = setting("tpt", help="test-time method: " + ", ".join(registry.names("tpt_method")))
    init: str = setting("hard", help="initial context: " + ", ".join(registry.names("tpt_init")))
    dataset: str | None = setting(None, help="a fastcal dataset name (unset: the embedded testbed)")
    root: str | None = setting(None, help="the folder holding the datasets")
    output: str | None = setting(None, help="the run folder")
    model: str | None = setting(
        None,
        help="open_clip architecture (unset: ViT-B-16, or the testbed's CLIP without a dataset; 'testbed')",
    )
    pretrained: str | None = setting(
        None, help="pretrained tag or checkpoint file (unset: openai); 'none': a seeded random initialization"
    )
    views: int = setting(64, help="views per sample, the centre view included")
    selection: float = setting(0.1, help="fraction of confident views kept")
    steps: int = setting(1, help="AdamW steps per sample")
    lr: float = setting(5e-3, help="AdamW learning rate")
    dispersion_weight: float | None = setting(
        None, help="C-TPT's lambda (recipe: 50 fine-grained, 20 ImageNet variants)", flags=("--lambda",)
    )
    orthogonality_weight: float | None = setting(
        None, help="O-TPT's lambda (recipe: 18 fine-grained and ImageNet, 2 its variants)"
    )
    ctx_init: str = setting(TPT_CTX_INIT, help="the phrase of the initial context and the hard prompt")
    augmix: bool | None = setting(None, help="AugMix on the views (recipe: per method and dataset)")
    flip: bool | None = setting(None, help="random horizontal flips of the views (unset: off on the testbed)")
    fpp_steps: int = setting(1000, help="FPP pretraining steps")
    fpp_weight: float | None = setting(
        None, help="FPP flatness weight w (unset: 1 + 15/C; 1.25 on the ImageNet variants and the testbed)"
    )
    temperature: str | None = setting(None, help="a fixed temperature T, or 'fit' (on a calibration set)")
    calibration_size: int = setting(500, help="images to fit the temperature on")
    seed: int = setting(0, help="seeds the views (with each sample's index)")
    samples_per_step: int = setting(1, help="samples tuned together (results do not depend on it)")
    limit: int | None = setting(None, help="evaluate a seeded random subset of this size")
    device: str = setting("auto", help="auto (CUDA when available), cpu or cuda")
    precision: str = setting("fp32", help="model weights: fp32, fp16 or bf16")
    graph: bool = setting(True, help="capture the step in a CUDA graph on CUDA", negative="--eager")
    num_workers: int | None = setting(
        None, help="image-decoding processes (unset: 4, or 0 on the testbed)", flags=("--workers",)
    )
    flush_every: int = setting(16, help="records per fsync'ed append")
    resume: bool = setting(False, help="continue the run in --output, skipping finished samples")
    overwrite: bool = setting(False, help="replace the run --output holds (its files are removed)")
    progress: bool = setting(True, help="progress bar", negative="--quiet")

    def validate(self) -> TptConfig:
        method = registry.get("tpt_method", self.method, argument="method")
        registry.get("tpt_init", self.init, argument="init")
        if self.dataset is not None:
            check_choice("dataset", self.dataset, DATASETS)
            if self.root is None:
                raise fail("root", "the datasets folder with --dataset", "none")
        elif self.root is not None:
            raise fail("root", "none without --dataset (the testbed brings its own data)", repr(self.root))
        for name in ("views", "steps", "fpp_steps", "calibration_size", "samples_per_step", "flush_every"):
            check_int(name, getattr(self, name), minimum=1 if name != "steps" else 0)
        for name in ("limit",):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.num_workers is not None:
            check_int("num_workers", self.num_workers, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_choice("precision", self.precision, ("fp32", "fp16", "bf16"))
        check_device("device", self.device)
        for weight in TUNING_WEIGHTS:
            value = getattr(self, weight)
            if value is None:
                continue
            if weight not in method.weights and value != 0:
                takes = [
                    n for n in registry.names("tpt_method") if weight in registry.get("tpt_method", n).weights
                ]
                raise fail(weight, f"a weight only for {', '.join(takes)}", f"{value} with {self.method}")
            if weight in method.weights:
                check_number(weight, value, minimum=0.0, strict_minimum=True)
        if self.fpp_weight is not None:
            check_number("fpp_weight", self.fpp_weight, minimum=0.0)
        if self.temperature not in (None, "fit"):
            try:
                value = float(self.temperature)
            except ValueError:
                raise fail("temperature", "a number or 'fit'", repr(self.temperature)) from None
            check_number("temperature", value, minimum=0.0, strict_minimum=True)
        self._check_model()
        self.tuning()  # TuningConfig's own checks (a selection that keeps no view, ...)
        return self

    def _check_model(self) -> None:
        if self.model in (None, TESTBED) or self.model.startswith(("local-dir:", "hf-hub:")):
            return
        import open_clip

        if open_clip.get_model_config(self.model.replace("/", "-")) is None:
            raise fail("model", f"an open_clip architecture or {TESTBED!r}", repr(self.model))

    @property
    def on_testbed(self) -> bool:
        return self.model == TESTBED or (self.model is None and self.dataset is None)

    def resolved(self) -> TptConfig:
        """Unset settings from the method's recipe for the dataset, then the initialization's, then the
        dataset-level defaults (flips off and no decoding processes on the testbed)."""
        values = self.to_dict()
        recipe = dict(registry.get("tpt_method", self.method).recipe(self.dataset))
        recipe.update(registry.get("tpt_init", self.init).recipe(self.dataset))
        recipe.update(flip=self.dataset is not None, num_workers=0 if self.dataset is None else 4)
        for key, value in recipe.items():
            if values.get(key) is None:
                values[key] = value
        return TptConfig.from_dict(values)

    def tuning(self) -> TuningConfig:
        return TuningConfig(
            n_views=self.views,
            selection=self.selection,
            steps=self.steps,
            lr=self.lr,
            dispersion_weight=float(self.dispersion_weight or 0.0),
            orthogonality_weight=float(self.orthogonality_weight or 0.0),
        )

    def fpp(self) -> FPPConfig:
        return FPPConfig(steps=self.fpp_steps, flatness_weight=self.fpp_weight)

    @property
    def fixed_temperature(self) -> float | None:
        return None if self.temperature in (None, "fit") else float(self.temperature)

    def semantics(self) -> dict[str, Any]:
        """The settings a result depends on (not how it is run: samples per step, workers, ...)."""
        keys: dict[str, Any] = {
            "method": self.method,
            "seed": self.seed,
            "temperature": self.temperature,
            "ctx_init": self.ctx_init,
        }
        if self.temperature == "fit":
            keys["calibration_size"] = self.calibration_size
        if registry.get("tpt_method", self.method).tunes:
            keys.update(init=self.init, tuning=asdict(self.tuning()), augmix=self.augmix, flip=self.flip)
            if registry.get("tpt_init", self.init).context is not None:
                keys["fpp"] = asdict(self.fpp())
        return keys


@dataclass(frozen=True)
class Task:
    """A class set and its items: ``items`` are evaluated, ``calibration_items`` (labeled, optional)
    fit the temperature."""

    name: str
    classnames: list[str]
    templates: list[str]
    items: list[Item]
    calibration_items: list[Item] = field(default_factory=list)


# ---- data ----------------------------------------------------------------------------------------------
class _DecodedItems(Dataset):
    """``(index, uint8 (3, H, W) image, label)`` for the selected indices: images are decoded once here
    (in loader workers) and augmented on the device."""

    def __init__(self, items: Sequence[Item], indices: Sequence[int]):
        self.items = items
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, int]:
        index = self.indices[position]
        image, label = self.items[index]
        return index, decode(load_image(image)), int(label)


class ViewFeatureMemo:
    """Frozen view features of test samples, kept in memory for later runs in the same process that
    make the same views (module docstring): by the items and model (``scope``), the predictor's
    ``view_key``, the seed and the sample."""

    def __init__(self) -> None:
        self._features: dict[tuple[str, str, int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def features(
        self,
        predictor: Any,
        scope: str,
        images: Sequence[torch.Tensor],
        indices: Sequence[int],
        seed: int,
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """``predictor.view_features(images, generators)`` ``(S, n_views, D)``, from the memo when every
        sample is in it (else computed, and kept)."""
        keys = [(scope, predictor.view_key, seed, int(i)) for i in indices]
        if all(key in self._features for key in keys):
            return torch.stack([self._features[key] for key in keys])
        features = predictor.view_features(images, generators)
        self._features.update(zip(keys, features, strict=True))
        return features


def _logit_batches(
    predictor: Predictor,
    items: Sequence[Item],
    indices: Sequence[int],
    config: TptConfig,
    memo: ViewFeatureMemo | None = None,
    scope: str = "",
) -> Iterator[tuple[list[int], list[int], torch.Tensor, float]]:
    """``(indices, labels, logits, seconds)`` per batch of ``predictor``'s size; sample ``i``'s views come
    from ``sample_generator(config.seed, i)`` whatever the batch it lands in (their features from
    ``memo``, under ``scope``, when it has them and the predictor tunes on view features)."""
    size = getattr(predictor, "samples_per_step", config.samples_per_step)
    loader = DataLoader(
        _DecodedItems(items, indices), batch_size=size, num_workers=config.num_workers, collate_fn=list
    )
    shares_views = memo is not None and hasattr(predictor, "view_features")
    for batch in loader:
        start = time.perf_counter()
        batch_indices = [b[0] for b in batch]
        images = [b[1] for b in batch]
        generators = [sample_generator(config.seed, i) for i in batch_indices]
        if shares_views:
            features = memo.features(predictor, scope, images, batch_indices, config.seed, generators)
            logits = predictor.predict_features(features)
        else:
            logits = predictor(images, generators)
        logits = logits.float().cpu()  # the step ends in this read
        yield batch_indices, [b[2] for b in batch], logits, time.perf_counter() - start


def records_from_logits(
    indices: Sequence[int], labels: Sequence[int], logits: torch.Tensor, temperature: float, seconds: float
) -> list[dict[str, Any]]:
    """One record per row of ``logits`` (B, C), its probabilities ``softmax(logits / temperature)``
    (module docstring)."""
    probs = torch.softmax(logits / temperature, dim=-1).double()
    confidence, prediction = probs.max(dim=1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(dim=1)
    label = torch.tensor(list(labels), dtype=torch.long)
    p_label = probs.gather(1, label[:, None]).squeeze(1)
    brier = (probs**2).sum(dim=1) - 2 * p_label + 1
    per_sample = seconds / len(indices)
    columns = zip(
        indices,
        labels,
        prediction.tolist(),
        confidence.tolist(),
        entropy.tolist(),
        p_label.tolist(),
        brier.tolist(),
        logits,
        strict=True,
    )
    return [
        {
            "index": int(i),
            "label": int(y),
            "prediction": int(pred),
            "confidence": float(conf),
            "entropy": float(ent),
            "time": per_sample,
            "p_label": float(pl),
            "brier": float(b),
            "logits": encode_row(row),
        }
        for i, y, pred, conf, ent, pl, b, row in columns
    ]


# ---- the run -------------------------------------------------------------------------------------------
def _manifest(clip: LoadedClip, task: Task, config: TptConfig) -> dict[str, Any]:
    from fastcal.data.items import ImageListDataset
    from fastcal.models.fingerprint import model_fingerprint

    return {
        "format": _FORMAT_VERSION,
        "dataset": task.name,
        "num_samples": len(task.items),
        "classnames": list(task.classnames),
        "items": ImageListDataset(task.items, task.classnames).fingerprint(),
        "model_fingerprint": model_fingerprint(clip.model),
        "config": config.semantics(),
    }


def _check_manifest(folder: RunFolder, manifest: dict[str, Any]) -> None:
    """A resumed run must compute what the folder's run computed."""
    previous = {k: v for k, v in (folder.manifest() or {}).items() if k not in ("kind", "versions")}
    if canonical_json(previous) != canonical_json(manifest):
        changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
        raise fail(
            "--resume",
            f"the settings of the run in {folder.path} ({MANIFEST} differs in {', '.join(changed)})",
            "other settings; use another --output, or --overwrite to replace that run",
        )


def _initial_context(clip: LoadedClip, task: Task, config: TptConfig, output: Path) -> torch.Tensor | None:
    """The initialization's context for the task's class set, computed once (rank 0) and cached in
    the run folder; ``None`` for the phrase's own embedding."""
    spec = registry.get("tpt_init", config.init)
    if spec.context is None:
        return None
    from fastcal.models.fingerprint import model_fingerprint

    key = {
        "kind": f"{config.init}_context",
        "model": model_fingerprint(clip.model),
        "classnames": list(task.classnames),
        "ctx_init": config.ctx_init,
        "fpp": asdict(config.fpp()),
    }

    def compute() -> dict[str, torch.Tensor]:
        context = spec.context(
            clip, task.classnames, ctx_init=config.ctx_init, fpp=config.fpp(), progress=config.progress
        )
        return {"ctx": context.cpu()}

    return computed_once(output / f"{config.init}_context.safetensors", key, compute)["ctx"].clone()


def _calibration_temperature(
    predictor: Predictor, task: Task, config: TptConfig, output: Path, manifest: dict[str, Any]
) -> float:
    from fastcal.calibrate import fit_temperature

    if not task.calibration_items:
        raise fail(
            "temperature", f"labeled calibration items for {task.name} (or a fixed temperature)", "fit"
        )
    items = task.calibration_items
    key = {"kind": "tpt_calibration_logits", "manifest": manifest, "count": len(items)}

    def compute() -> dict[str, torch.Tensor]:
        rows: list[torch.Tensor] = []
        labels: list[int] = []
        for _, batch_labels, logits, _ in _logit_batches(predictor, items, range(len(items)), config):
            rows.append(logits)
            labels.extend(batch_labels)
        return {"logits": torch.cat(rows), "labels": torch.tensor(labels, dtype=torch.long)}

    tensors = computed_once(output / "calibration_logits.safetensors", key, compute)
    return fit_temperature(tensors["logits"], tensors["labels"])


def run_tpt(
    config: TptConfig,
    *,
    clip: LoadedClip | None = None,
    task: Task | None = None,
    view_memo: ViewFeatureMemo | None = None,
) -> dict[str, Any]:
    """Evaluate ``config.method`` into the run folder ``config.output`` (module docstring); return the
    results (the content of ``results.json``). Under ``torch.distributed`` every rank calls this.
    ``clip`` and ``task``: an already loaded model and task (default: from the settings); ``view_memo``:
    view features shared with the other runs in this process that are given the same memo."""
    config = config.resolved()
    if config.output is None:
        raise fail("output", "a run folder", "none")
    output = check_run_folder(config.output, kind="tpt", resume=config.resume, overwrite=config.overwrite)
    task = task if task is not None else load_task(config)
    if not task.items:
        raise fail("task.items", "at least one test item", "none")
    clip = clip if clip is not None else load_model(config)
    manifest = _manifest(clip, task, config)

    def prepare(folder: RunFolder) -> None:
        if folder.manifest() is None:
            folder.write_manifest(manifest)
        else:
            _check_manifest(folder, manifest)
        drop_torn_tail(folder.path / RECORDS)

    with hold_run_folder(
        output, kind="tpt", resume=config.resume, overwrite=config.overwrite, prepare=prepare
    ):
        return _run(clip, task, config, output, manifest, view_memo)


def _run(
    clip: LoadedClip,
    task: Task,
    config: TptConfig,
    output: Path,
    manifest: dict[str, Any],
    view_memo: ViewFeatureMemo | None,
) -> dict[str, Any]:
    rank, world = rank_world()
    records_path = output / RECORDS
    device = next(clip.model.parameters()).device
    show = config.progress and rank == 0
    finished = {int(r["index"]) for r in read_jsonl(records_path)}
    todo = [i for i in range(rank, len(task.items), world) if i not in finished]
    spec = registry.get("tpt_method", config.method)
    predictor = spec.build(
        clip,
        task.classnames,
        task.templates,
        prompt_templates=registry.get("tpt_init", config.init).templates(task.templates, config.ctx_init),
        tuning=config.tuning(),
        ctx_init=config.ctx_init,
        init_ctx=_initial_context(clip, task, config, output) if spec.tunes else None,
        augmix=bool(config.augmix),
        flip=bool(config.flip),
        samples_per_step=config.samples_per_step,
        use_graph=None if config.graph else False,
        device=device,
    )
    temperature = config.fixed_temperature or 1.0
    if config.temperature == "fit":
        temperature = _calibration_temperature(predictor, task, config, output, manifest)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="sample", desc=f"{config.method} {task.name}", disable=not show)
    pending: list[dict[str, Any]] = []
    hits = 0
    started = time.perf_counter()
    scope = f"{manifest['items']} {manifest['model_fingerprint']}"
    batches = _logit_batches(predictor, task.items, todo, config, view_memo, scope)
    for indices, labels, logits, seconds in batches:
        records = records_from_logits(indices, labels, logits, temperature, seconds)
        pending.extend(records)
        if len(pending) >= config.flush_every:
            append_jsonl(records_path, pending)
            pending.clear()
        hits += sum(r["prediction"] == r["label"] for r in records)
        bar.update(len(records))
        bar.set_postfix(acc=f"{100.0 * hits / max(bar.n, 1):.1f}%")
    append_jsonl(records_path, pending)
    bar.close()
    elapsed = time.perf_counter() - started
    barrier()
    if rank == 0:
        results = merge(
            output,
            task,
            config,
            temperature,
            clip,
            world=world,
            local_seconds=elapsed,
            local_samples=len(todo),
            cuda_graph=bool(getattr(predictor, "graph_used", False)),
        )
    barrier()
    if rank != 0:
        results = json.loads((output / RESULTS).read_text())
    return results


def merge(
    output: str | Path,
    task: Task,
    config: TptConfig,
    temperature: float,
    clip: LoadedClip,
    *,
    world: int = 1,
    local_seconds: float | None = None,
    local_samples: int | None = None,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Read the records, check that every index is there once, and write ``results.json``, the
    reliability diagrams and the predictions (module docstring)."""
    from fastcal.metrics import calibration_summary, reliability_diagram

    output = Path(output)
    records = unique_records(read_jsonl(output / RECORDS))
    missing = len(task.items) - len(records)
    if missing:
        raise fail(
            "records",
            f"one record per item ({len(task.items)})",
            f"{len(records)} ({missing} missing; run again with --resume)",
        )
    logits = decode_rows([r["logits"] for r in records], len(task.classnames))
    labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
    probs = torch.softmax(logits / temperature, dim=-1)
    metrics = {str(n): calibration_summary(probs, labels, n_bins=n) for n in ECE_BINS}
    diagrams = []
    title = registry.get("tpt_method", config.method).title
    for n in ECE_BINS:
        name = f"reliability_{n}.png"
        reliability_diagram(
            probs, labels, n_bins=n, path=output / name, title=f"{title} on {task.name} ({n} bins)"
        )
        diagrams.append(name)
    save_predictions(
        predictions_path(output, task.name),
        logits,
        labels,
        task.classnames,
        logit_scale=float(clip.model.logit_scale.detach().float().exp()),
        temperature=temperature,
    )
    step_seconds = sum(float(r["time"]) for r in records)
    tunes = registry.get("tpt_method", config.method).tunes
    results = {
        "method": config.method,
        "init": config.init if tunes else None,
        "dataset": task.name,
        "num_samples": len(records),
        "num_classes": len(task.classnames),
        "temperature": temperature,
        "accuracy": metrics["15"]["accuracy"],
        "ece_15": metrics["15"]["ece"],
        "ece_20": metrics["20"]["ece"],
        "metrics": metrics,
        "seconds_per_sample": step_seconds / len(records),
        "world_size": world,
        "config": config.semantics(),
        "run": {
            "samples_per_step": config.samples_per_step,
            "num_workers": config.num_workers,
            "cuda_graph": cuda_graph,
        },
        "diagrams": diagrams,
    }
    if local_seconds is not None and local_samples:
        results["samples_per_second_rank0"] = local_samples / local_seconds if local_seconds > 0 else math.inf
    results = json.loads(json.dumps(results))  # what results.json holds (tuples become lists)
    RunFolder(output, "tpt", None).write_results(results)
    return results


# ---- model and data ------------------------------------------------------------------------------------
def load_model(config: TptConfig) -> LoadedClip:
    """The model the settings name, on the device (``torchrun``: this rank's GPU). A random
    initialization is seeded, so every rank and every resumed run builds the same weights."""
    from fastcal.finetune.distributed import init_distributed
    from fastcal.models import load_clip

    device = init_distributed(check_device("device", config.device)).device
    if config.on_testbed:
        from fastcal.models.testbed import load_testbed_clip

        if config.pretrained == RANDOM_INIT:
            import open_clip

            from fastcal.models.testbed import TESTBED_MODEL, build_testbed_model

            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(RANDOM_INIT_SEED)
                model = build_testbed_model().eval()
            # the runner makes its own views: no transforms needed
            clip = LoadedClip(model, open_clip.get_tokenizer(TESTBED_MODEL), None, None)
        elif config.pretrained is not None:
            raise fail("pretrained", "'none' or nothing with the testbed model", repr(config.pretrained))
        else:
            clip = load_testbed_clip(progress=config.progress)
        clip.model.to(device)
        return clip
    name = config.model or DEFAULT_MODEL[0]
    pretrained = config.pretrained if config.pretrained is not None else DEFAULT_MODEL[1]
    if pretrained != RANDOM_INIT:
        return load_clip(name, pretrained, device=device, precision=config.precision)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(RANDOM_INIT_SEED)
        return load_clip(name, None, device=device, precision=config.precision)


def load_task(config: TptConfig) -> Task:
    """The dataset's test items (a seeded subset with ``limit``) and, to fit a temperature, a seeded
    subset of its validation (else train) items; the testbed's new classes without a dataset."""
    if config.dataset is None:
        task = testbed_task()
    else:
        from fastcal.data import load_dataset

        splits = load_dataset(config.dataset, config.root)
        calibration = splits.val or splits.train
        task = Task(
            splits.name, list(splits.classnames), list(splits.templates), list(splits.test), list(calibration)
        )
    task = subset_task(task, config.limit, config.seed)
    if config.temperature == "fit":
        task = subset_calibration(task, config.calibration_size, config.seed)
    return task


def testbed_task(*, limit: int | None = None, seed: int = 0) -> Task:
    """The embedded testbed's new classes (digits five..nine): test items, and val items for calibration."""
    from fastcal.data.protocols import base_new_split
    from fastcal.data.testbed import digits_splits

    splits = base_new_split(digits_splits()).new.splits
    task = Task(
        "testbed-new", list(splits.classnames), list(splits.templates), list(splits.test), list(splits.val)
    )
    return subset_task(task, limit, seed)


def subset_task(task: Task, limit: int | None, seed: int) -> Task:
    """``task`` with ``limit`` test items drawn at random (seeded; in their original order)."""
    if limit is None or limit >= len(task.items):
        return task
    check_int("limit", limit, minimum=1)
    chosen = sorted(
        torch.randperm(len(task.items), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    )
    return replace(task, items=[task.items[i] for i in chosen])


def subset_calibration(task: Task, size: int, seed: int) -> Task:
    """``task`` with at most ``size`` calibration items drawn at random (seeded)."""
    check_int("calibration size", size, minimum=1)
    if size >= len(task.calibration_items):
        return task
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(task.calibration_items), generator=generator)[:size].tolist())
    return replace(task, calibration_items=[task.calibration_items[i] for i in chosen])
