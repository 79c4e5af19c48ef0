"""The large-scale test-time tuning runner: per-sample records, resume, sharding, one final merge.

A run evaluates one method on one dataset's test items and writes, in its output folder:

- ``run.json``: what the run computes (method, tuning, FPP and augmentation settings, seed, temperature,
  dataset and model fingerprints). ``resume`` refuses a folder written for anything else.
- ``records.jsonl``: one JSON line per test sample, ``index`` (position in the item list), ``label``,
  ``prediction``, ``confidence`` (top probability), ``entropy`` (of the predicted distribution),
  ``time`` (seconds, the step's wall time shared by its samples), ``p_label`` (probability of the true
  class) and ``brier`` (``sum_c (p_c - [c = label])^2``). Appended in batches of ``flush_every`` with
  an fsync (``fastcal._io.append_jsonl``), so a killed run loses at most the unflushed batch; every
  rank appends to the same file (one ``write`` per batch, O_APPEND).
- ``results.json`` and ``reliability_{15,20}.png`` after the merge.

Sample ``i``'s views come from a generator seeded by ``(seed, i)`` (``augment.sample_generator``), so a
sample's result does not depend on the rank, the order or the ``samples_per_step`` grouping that
handled it: a resumed or sharded run reproduces an uninterrupted one. Under ``torch.distributed``
(``torchrun``), rank ``r`` of ``R`` takes the indices ``i = r (mod R)`` not yet in the records; with
``resume`` the finished ones are skipped. After a barrier, rank 0 merges: it reads the records, keeps
each index once, checks that every index is there, streams them through ``CalibrationMeter`` for 15 and
20 bins (C-TPT and FPP report 20; the meter sees, per record, a probability row with the recorded top
confidence on a class that is right exactly when the recorded prediction was, which fixes every
top-label metric; Brier and NLL come from the recorded ``brier`` and ``p_label``), draws the
reliability diagrams and writes ``results.json``.

Methods: ``tpt`` and ``ctpt`` (each with ``init`` ``hard`` or ``fpp``), and the baselines ``zeroshot``
(the hard prompt "a photo of a {}.") and ``ensemble`` (the dataset's templates) on the centre view.
A temperature divides the final logits (TPT + temperature scaling): a fixed value, or one fitted
(``fastcal.calibrate.fit_temperature``) on the method's logits over a labeled calibration set, computed
once by rank 0 and cached in the folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fastcal._checks import check_choice, check_int, check_number, fail
from fastcal._io import append_jsonl, cached_tensors, canonical_json, read_jsonl, write_json_atomic
from fastcal.data.items import Item, load_image
from fastcal.models.clip import LoadedClip
from fastcal.runs.folder import RunFolder, hold_run_folder
from fastcal.tpt.augment import ViewAugmenter, decode, normalization, sample_generator, view_size
from fastcal.tpt.fpp import FPPConfig, pretrain_context
from fastcal.tpt.step import TuningConfig
from fastcal.tpt.tpt import TPT, TPT_CTX_INIT

METHODS = ("tpt", "ctpt", "zeroshot", "ensemble")
INITS = ("hard", "fpp")
ECE_BINS = (15, 20)
RECORDS = "records.jsonl"
RESULTS = "results.json"
MANIFEST = "run.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """What a run computes (all of it is in ``run.json``) and how it is executed.

    Attributes:
        method: ``tpt``, ``ctpt``, ``zeroshot`` or ``ensemble``.
        init: ``hard`` (the phrase ``ctx_init``) or ``fpp`` (FPP's pretrained context).
        tuning: TPT's optimization (C-TPT's lambda in ``tuning.dispersion_weight``).
        fpp: FPP's pretraining (with ``init="fpp"``).
        augmix: AugMix on the views.
        flip: random horizontal flips of the views.
        ctx_init: the phrase of the initial context and of the hard prompt.
        seed: seeds every sample's views (with its index) and nothing else.
        temperature: divide the final logits by this (``None``: 1, or fitted with ``fit_temperature``).
        fit_temperature: fit the temperature on the calibration items first.
        samples_per_step: samples tuned together (results do not depend on it).
        flush_every: records per fsync'ed append.
        num_workers: image-decoding processes.
    """

    method: str = "tpt"
    init: str = "hard"
    tuning: TuningConfig = field(default_factory=TuningConfig)
    fpp: FPPConfig = field(default_factory=FPPConfig)
    augmix: bool = False
    flip: bool = True
    ctx_init: str = TPT_CTX_INIT
    seed: int = 0
    temperature: float | None = None
    fit_temperature: bool = False
    samples_per_step: int = 1
    flush_every: int = 16
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("init", self.init, INITS)
        check_int("seed", self.seed, minimum=0)
        check_int("samples_per_step", self.samples_per_step, minimum=1)
        check_int("flush_every", self.flush_every, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        if self.temperature is not None:
            check_number("temperature", self.temperature, minimum=0.0, strict_minimum=True)
            if self.fit_temperature:
                raise fail("temperature", "None when fit_temperature is set", self.temperature)
        if self.method == "ctpt" and self.tuning.dispersion_weight <= 0:
            raise fail(
                "tuning.dispersion_weight",
                "C-TPT's lambda > 0 with method 'ctpt'",
                self.tuning.dispersion_weight,
            )
        if self.method == "tpt" and self.tuning.dispersion_weight != 0:
            raise fail(
                "tuning.dispersion_weight", "0 with method 'tpt' (use 'ctpt')", self.tuning.dispersion_weight
            )

    @property
    def tunes(self) -> bool:
        return self.method in ("tpt", "ctpt")

    def semantics(self) -> dict[str, Any]:
        """The settings a result depends on (not ``samples_per_step``, ``flush_every``, ``num_workers``)."""
        keys = {
            "method": self.method,
            "seed": self.seed,
            "temperature": self.temperature,
            "fit_temperature": self.fit_temperature,
            "ctx_init": self.ctx_init,
        }
        if self.tunes:
            keys.update(init=self.init, tuning=asdict(self.tuning), augmix=self.augmix, flip=self.flip)
            if self.init == "fpp":
                keys["fpp"] = asdict(self.fpp)
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


# ---- distributed helpers -------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- predictors: images + generators -> logits ----------------------------------------------------------
class ZeroShot:
    """The zero-shot baseline on the centre view, with the hard prompt or the template ensemble."""

    def __init__(
        self, clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str], device: torch.device
    ):
        from fastcal.models.cache import class_text_features

        self.model = clip.model
        features = class_text_features(clip.model, clip.tokenizer, list(classnames), list(templates))
        self.class_features = F.normalize(features.float(), dim=-1).to(device)
        mean, std = normalization(clip.model)
        self.augmenter = ViewAugmenter(view_size(clip.model), mean, std, n_views=1, device=device)
        self.scale = clip.model.logit_scale.detach().float().exp().to(device)
        self.dtype = next(clip.model.visual.parameters()).dtype
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[Any], generators: Sequence[torch.Generator]) -> torch.Tensor:
        views = self.augmenter.batch(images, generators)
        features = F.normalize(self.model.encode_image(views.to(self.device, self.dtype)).float(), dim=-1)
        return self.scale * features @ self.class_features.T


def hard_prompt(ctx_init: str) -> str:
    """The hard prompt template of a context phrase: ``"<phrase> {}."`` (TPT's zero-shot prompt)."""
    return f"{ctx_init} {{}}."


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


def _batches(items: Sequence[Item], indices: Sequence[int], size: int, num_workers: int):
    loader = DataLoader(
        _DecodedItems(items, indices),
        batch_size=size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list,
        persistent_workers=False,
    )
    yield from loader


# ---- records and reports -------------------------------------------------------------------------------
def records_from_probs(
    indices: Sequence[int], labels: Sequence[int], probs: torch.Tensor, seconds: float
) -> list[dict[str, Any]]:
    """One record per row of ``probs`` (B, C) (module docstring)."""
    probs = probs.detach().double().cpu()
    confidence, prediction = probs.max(dim=1)
    log_p = torch.log(probs.clamp_min(1e-300))
    entropy = -(probs * log_p).sum(dim=1)
    label = torch.tensor(list(labels), dtype=torch.long)
    p_label = probs.gather(1, label[:, None]).squeeze(1)
    brier = (probs**2).sum(dim=1) - 2 * p_label + 1
    per_sample = seconds / len(indices)
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
        }
        for i, y, pred, conf, ent, pl, b in zip(
            indices,
            labels,
            prediction.tolist(),
            confidence.tolist(),
            entropy.tolist(),
            p_label.tolist(),
            brier.tolist(),
            strict=True,
        )
    ]


def drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a process killed mid-write) off the records file, so the
    next append starts on a line of its own."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = size
        while keep > 0:
            step = min(keep, 1 << 16)
            f.seek(keep - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = keep - step + cut + 1
                break
            keep -= step
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def unique_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first record of each index, sorted by index."""
    first: dict[int, dict[str, Any]] = {}
    for record in records:
        first.setdefault(int(record["index"]), record)
    return [first[i] for i in sorted(first)]


def surrogate_rows(records: Sequence[dict[str, Any]], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability rows ``(B, C)`` and labels with each record's top-label statistics: the recorded
    confidence on class 0, the rest spread evenly (never above it, as it is the top probability), label
    0 when the recorded prediction was right and 1 otherwise."""
    confidence = torch.tensor([float(r["confidence"]) for r in records], dtype=torch.float64)
    hit = torch.tensor([int(r["prediction"]) == int(r["label"]) for r in records])
    rows = ((1.0 - confidence) / max(num_classes - 1, 1))[:, None].repeat(1, num_classes)
    rows[:, 0] = confidence
    return rows, (~hit).long()


def report_from_records(
    records: Sequence[dict[str, Any]], num_classes: int, n_bins: int, *, chunk: int = 4096
) -> dict[str, float]:
    """``calibration_report``'s dict for the records, streamed through ``CalibrationMeter``."""
    from fastcal.metrics import CalibrationMeter

    if not records:
        raise fail("records", "at least one record", "none")
    meter = CalibrationMeter(n_bins, validate=False)
    for begin in range(0, len(records), chunk):
        meter.update(*surrogate_rows(records[begin : begin + chunk], max(num_classes, 2)))
    report = meter.compute()
    p_label = torch.tensor([float(r["p_label"]) for r in records], dtype=torch.float64)
    report["brier"] = float(torch.tensor([float(r["brier"]) for r in records], dtype=torch.float64).mean())
    report["nll"] = float(-torch.log(p_label.clamp_min(1e-12)).mean())
    return report


# ---- the run -------------------------------------------------------------------------------------------
def _manifest(clip: LoadedClip, task: Task, config: RunConfig) -> dict[str, Any]:
    from fastcal.data.items import ImageListDataset
    from fastcal.models.fingerprint import model_fingerprint

    return {
        "format": _FORMAT_VERSION,
        "dataset": task.name,
        "num_samples": len(task.items),
        "classnames": list(task.classnames),
        "items": ImageListDataset(task.items, task.classnames).fingerprint(),
        "model": model_fingerprint(clip.model),
        "config": config.semantics(),
    }


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """A resumed run must compute what the folder's run computed."""
    previous = {k: v for k, v in json.loads(path.read_text()).items() if k != "kind"}
    if canonical_json(previous) != canonical_json(manifest):
        changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
        raise fail(
            "--resume",
            f"the settings of the run in {path.parent} ({MANIFEST} differs in {', '.join(changed)})",
            "other settings; use another --output, or --overwrite to replace that run",
        )


def _build_predictor(
    clip: LoadedClip,
    task: Task,
    config: RunConfig,
    output: Path,
    device: torch.device,
    use_graph: bool | None,
    progress: bool,
) -> Callable:
    if config.method == "zeroshot":
        return ZeroShot(clip, task.classnames, [hard_prompt(config.ctx_init)], device)
    if config.method == "ensemble":
        return ZeroShot(clip, task.classnames, task.templates, device)
    init_ctx = None
    if config.init == "fpp":
        init_ctx = fpp_context(clip, task, config, output, progress=progress)
    return TPT(
        clip.model,
        clip.tokenizer,
        task.classnames,
        config=config.tuning,
        ctx_init=config.ctx_init,
        init_ctx=init_ctx,
        augmix=config.augmix,
        flip=config.flip,
        samples_per_step=config.samples_per_step,
        use_graph=use_graph,
    )


def fpp_context(
    clip: LoadedClip, task: Task, config: RunConfig, output: Path, *, progress: bool
) -> torch.Tensor:
    """FPP's context for the task's class set: computed by rank 0, cached in ``output``, read by all."""
    from fastcal.methods.prompt_learner import PromptLearner
    from fastcal.models.fingerprint import model_fingerprint
    from fastcal.models.text_encoder import TextEncoder

    key = {
        "kind": "fpp_context",
        "model": model_fingerprint(clip.model),
        "classnames": list(task.classnames),
        "ctx_init": config.ctx_init,
        "fpp": asdict(config.fpp),
    }

    def compute() -> dict[str, torch.Tensor]:
        clip.model.requires_grad_(False)
        learner = PromptLearner(
            TextEncoder(clip.model), clip.tokenizer, task.classnames, ctx_init=config.ctx_init
        )
        learner.to(next(clip.model.parameters()).device)
        return {"ctx": pretrain_context(learner, config.fpp, progress=progress).cpu()}

    path = output / "fpp_context.safetensors"
    rank, _ = _rank_world()
    if rank == 0:
        cached_tensors(path, key, compute)
    _barrier()
    return cached_tensors(path, key, compute)["ctx"].clone()


def _logit_batches(
    predictor: Callable, items: Sequence[Item], indices: Sequence[int], config: RunConfig
) -> Iterator[tuple[list[int], list[int], torch.Tensor, float]]:
    """``(indices, labels, logits, seconds)`` per batch of ``predictor``'s size; sample ``i``'s views come
    from ``sample_generator(config.seed, i)`` whatever the batch it lands in."""
    size = getattr(predictor, "samples_per_step", config.samples_per_step)
    for batch in _batches(items, indices, size, config.num_workers):
        start = time.perf_counter()
        batch_indices = [b[0] for b in batch]
        generators = [sample_generator(config.seed, i) for i in batch_indices]
        logits = predictor([b[1] for b in batch], generators).float()
        yield batch_indices, [b[2] for b in batch], logits, time.perf_counter() - start


def _predict(
    predictor: Callable,
    items: Sequence[Item],
    indices: Sequence[int],
    config: RunConfig,
    temperature: float,
    on_batch: Callable[[list[dict[str, Any]]], None],
    progress: bool,
    description: str,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(indices), unit="sample", desc=description, disable=not progress, smoothing=0.1)
    hits = done = 0
    for batch_indices, labels, logits, seconds in _logit_batches(predictor, items, indices, config):
        start = time.perf_counter()
        probs = torch.softmax(logits / temperature, dim=-1).cpu()  # the step's work ends in this read-back
        seconds += time.perf_counter() - start
        records = records_from_probs(batch_indices, labels, probs, seconds)
        on_batch(records)
        done += len(records)
        hits += sum(r["prediction"] == r["label"] for r in records)
        bar.update(len(records))
        bar.set_postfix(acc=f"{100.0 * hits / done:.1f}%")
    bar.close()


def _calibration_temperature(
    predictor: Callable, task: Task, config: RunConfig, output: Path, manifest: dict[str, Any], progress: bool
) -> float:
    from fastcal.calibrate import fit_temperature

    if not task.calibration_items:
        raise fail(
            "fit_temperature", f"labeled calibration items for {task.name} (or a fixed temperature)", "none"
        )
    items = task.calibration_items
    key = {"kind": "tpt_calibration_logits", "manifest": manifest, "count": len(items)}

    def compute() -> dict[str, torch.Tensor]:
        rows: list[torch.Tensor] = []
        labels: list[int] = []
        for _, batch_labels, logits, _ in _logit_batches(predictor, items, range(len(items)), config):
            rows.append(logits.cpu())
            labels.extend(batch_labels)
        return {"logits": torch.cat(rows), "labels": torch.tensor(labels, dtype=torch.long)}

    path = output / "calibration_logits.safetensors"
    rank, _ = _rank_world()
    if rank == 0:
        cached_tensors(path, key, compute)
    _barrier()
    tensors = cached_tensors(path, key, compute)
    return fit_temperature(tensors["logits"], tensors["labels"])


def run(
    clip: LoadedClip,
    task: Task,
    config: RunConfig,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    use_graph: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``config.method`` on ``task`` into the folder ``output`` (module docstring); return the
    results (the content of ``results.json``). Under ``torch.distributed`` every rank calls this; rank 0
    holds the folder (``fastcal.runs.folder.RunFolder``: ``resume`` continues the run it holds,
    ``overwrite`` replaces it)."""
    if not task.items:
        raise fail("task.items", "at least one test item", "none")
    output = Path(output)
    records_path = output / RECORDS
    manifest = _manifest(clip, task, config)

    def prepare(folder: RunFolder) -> None:
        if folder.manifest() is None:
            folder.write_manifest(manifest)
        else:
            _check_manifest(output / MANIFEST, manifest)
        drop_torn_tail(records_path)

    with hold_run_folder(output, kind="tpt", resume=resume, overwrite=overwrite, prepare=prepare):
        return _run(clip, task, config, output, manifest, use_graph=use_graph, progress=progress)


def _run(
    clip: LoadedClip,
    task: Task,
    config: RunConfig,
    output: Path,
    manifest: dict[str, Any],
    *,
    use_graph: bool | None,
    progress: bool,
) -> dict[str, Any]:
    rank, world = _rank_world()
    records_path = output / RECORDS
    device = next(clip.model.parameters()).device
    show = progress and rank == 0

    finished = {int(r["index"]) for r in read_jsonl(records_path)}
    todo = [i for i in range(rank, len(task.items), world) if i not in finished]
    predictor = _build_predictor(clip, task, config, output, device, use_graph, show)
    temperature = config.temperature or 1.0
    if config.fit_temperature:
        temperature = _calibration_temperature(predictor, task, config, output, manifest, show)

    pending: list[dict[str, Any]] = []

    def on_batch(records: list[dict[str, Any]]) -> None:
        pending.extend(records)
        if len(pending) >= config.flush_every:
            append_jsonl(records_path, pending)
            pending.clear()

    started = time.perf_counter()
    _predict(predictor, task.items, todo, config, temperature, on_batch, show, f"{config.method} {task.name}")
    append_jsonl(records_path, pending)
    elapsed = time.perf_counter() - started
    _barrier()
    if rank == 0:
        results = merge(
            output,
            task,
            config,
            temperature=temperature,
            world=world,
            local_seconds=elapsed,
            local_samples=len(todo),
        )
    _barrier()
    if rank != 0:
        results = json.loads((output / RESULTS).read_text())
    return results


def merge(
    output: str | os.PathLike,
    task: Task,
    config: RunConfig,
    *,
    temperature: float = 1.0,
    world: int = 1,
    local_seconds: float | None = None,
    local_samples: int | None = None,
) -> dict[str, Any]:
    """Read the records, check that every index is there once, and write ``results.json`` and the
    reliability diagrams (module docstring)."""
    from fastcal.metrics import reliability_diagram

    output = Path(output)
    records = unique_records(read_jsonl(output / RECORDS))
    missing = len(task.items) - len(records)
    if missing:
        raise fail(
            "records",
            f"one record per item ({len(task.items)})",
            f"{len(records)} ({missing} missing; run again with --resume)",
        )
    num_classes = len(task.classnames)
    metrics = {str(n): report_from_records(records, num_classes, n) for n in ECE_BINS}
    diagrams = []
    probs, labels = surrogate_rows(records, max(num_classes, 2))
    for n in ECE_BINS:
        name = f"reliability_{n}.png"
        title = f"{config.method} on {task.name} ({n} bins)"
        reliability_diagram(probs, labels, n_bins=n, path=output / name, title=title)
        diagrams.append(name)
    step_seconds = sum(float(r["time"]) for r in records)
    results = {
        "method": config.method,
        "init": config.init if config.tunes else None,
        "dataset": task.name,
        "num_samples": len(records),
        "num_classes": num_classes,
        "temperature": temperature,
        "accuracy": metrics["15"]["accuracy"],
        "ece_15": metrics["15"]["ece"],
        "ece_20": metrics["20"]["ece"],
        "metrics": metrics,
        "seconds_per_sample": step_seconds / len(records),
        "world_size": world,
        "config": config.semantics(),
        "run": {"samples_per_step": config.samples_per_step, "num_workers": config.num_workers},
        "diagrams": diagrams,
    }
    if local_seconds is not None and local_samples:
        results["samples_per_second_rank0"] = local_samples / local_seconds if local_seconds > 0 else math.inf
    results = json.loads(json.dumps(results))  # what results.json holds (tuples become lists)
    write_json_atomic(output / RESULTS, results)
    return results


def testbed_task(*, limit: int | None = None, seed: int = 0) -> Task:
    """The embedded testbed's new classes (digits five..nine): test items, and val items for calibration."""
    from fastcal.data.protocols import base_new_split
    from fastcal.data.testbed import digits_splits

    splits = base_new_split(digits_splits()).new.splits
    return subset_task(
        Task(
            "testbed-new",
            list(splits.classnames),
            list(splits.templates),
            list(splits.test),
            list(splits.val),
        ),
        limit,
        seed,
    )


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
