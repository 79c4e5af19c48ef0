"""One registry of everything a run can choose by name: prompt methods, losses and regularizers, TPT
methods and initializations, fine-tuning methods, post-hoc calibrators.

An entry maps a name to its spec: the object itself, or ``"module:attribute"``, imported the first time
it is asked for (so ``fastcal --help`` imports no method). Adding a method is its own file plus one
line in ``BUILTIN`` below, or, from a user's code, one call::

    from fastcal.registry import register
    register("prompt_method", "mycoop", "my_package.mycoop:SPEC")

What a spec is depends on the kind (each kind's module documents it): a ``MethodSpec``
(``fastcal.methods.base``) for prompt methods, a ``LossSpec`` (``fastcal.methods.objectives``) for
losses, a factory taking a ``RegularizerSetup`` for regularizers, a ``TptMethodSpec`` /
``TptInitSpec`` (``fastcal.tpt.specs``), a ``FinetuneSpec`` (``fastcal.finetune.specs``), a calibrator
class (``fastcal.calibrate``), a ``RunCommand`` (``fastcal.runs.sweep.commands``: a command a sweep's cells
run).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from fastcal._checks import fail

KINDS = (
    "prompt_method",
    "loss",
    "regularizer",
    "tpt_method",
    "tpt_init",
    "finetune_method",
    "calibrator",
    "run_command",
)

BUILTIN: dict[str, dict[str, Any]] = {
    "prompt_method": {
        "coop": "fastcal.methods.coop:SPEC",
        "cocoop": "fastcal.methods.cocoop:SPEC",
        "kgcoop": "fastcal.methods.kgcoop:SPEC",
        "maple": "fastcal.methods.maple:SPEC",
        "vpt": "fastcal.methods.vpt:SPEC",
        "prograd": "fastcal.methods.prograd:SPEC",
        "promptsrc": "fastcal.methods.promptsrc:SPEC",
        "tcp": "fastcal.methods.tcp:SPEC",
        "proda": "fastcal.methods.proda:SPEC",
    },
    "loss": {
        "ce": "fastcal.methods.objectives:CROSS_ENTROPY",
        "calibrated": "fastcal.methods.objectives:CALIBRATED",
        "label_smoothing": "fastcal.methods.objectives:LABEL_SMOOTHING",
        "mbls": "fastcal.methods.objectives:MBLS",
        "confidence_penalty": "fastcal.methods.objectives:CONFIDENCE_PENALTY",
        "focal": "fastcal.methods.objectives:FOCAL",
        "mdca": "fastcal.methods.objectives:MDCA",
        "zs_norm": "fastcal.methods.objectives:ZS_NORM",
        "penalty": "fastcal.methods.objectives:ZEROSHOT_PENALTY",
    },
    "regularizer": {
        "kgcoop": "fastcal.methods.objectives:KnowledgeGuidance",
        "dor": "fastcal.outliers.dor:build_dor",
    },
    "tpt_method": {
        "tpt": "fastcal.tpt.specs:TPT_METHOD",
        "ctpt": "fastcal.tpt.specs:CTPT_METHOD",
        "zeroshot": "fastcal.tpt.specs:ZEROSHOT_METHOD",
        "ensemble": "fastcal.tpt.specs:ENSEMBLE_METHOD",
        "otpt": "fastcal.tpt.specs:OTPT_METHOD",
    },
    "tpt_init": {
        "hard": "fastcal.tpt.specs:HARD_INIT",
        "fpp": "fastcal.tpt.specs:FPP_INIT",
        "ensemble": "fastcal.tpt.specs:ENSEMBLE_INIT",
    },
    "finetune_method": {
        "ft": "fastcal.finetune.ft:SPEC",
        "flyp": "fastcal.finetune.flyp:SPEC",
        "carot": "fastcal.finetune.carot:SPEC",
    },
    "calibrator": {
        "ts": "fastcal.calibrate:TemperatureScaler",
        "vector": "fastcal.calibrate:VectorScaler",
        "matrix": "fastcal.calibrate:MatrixScaler",
        "histogram": "fastcal.calibrate:HistogramBinning",
        "isotonic": "fastcal.calibrate:IsotonicCalibrator",
        "dac": "fastcal.calibrate:DistanceAwareCalibrator",
    },
    "run_command": {
        "train": "fastcal.runs.sweep.commands:TRAIN",
        "tpt": "fastcal.runs.sweep.commands:TPT",
        "finetune": "fastcal.runs.sweep.commands:FINETUNE",
        "zeroshot": "fastcal.runs.sweep.commands:ZEROSHOT",
        "demo_section": "fastcal.runs.demo.seeds:COMMAND",
    },
}

_entries: dict[str, dict[str, Any]] = {kind: dict(entries) for kind, entries in BUILTIN.items()}
_ABSENT = object()


def _check_kind(kind: str) -> dict[str, Any]:
    if kind not in _entries:
        raise fail("kind", "one of " + ", ".join(KINDS), repr(kind))
    return _entries[kind]


def register(kind: str, name: str, spec: Any) -> None:
    """Make ``spec`` (an object, or ``"module:attribute"``) the entry ``name`` of ``kind``; an entry of
    that name is replaced."""
    entries = _check_kind(kind)
    if not isinstance(name, str) or not name or name != name.strip():
        raise fail("name", "a non-empty name without surrounding spaces", repr(name))
    if isinstance(spec, str) and ":" not in spec:
        raise fail("spec", "an object or a 'module:attribute' string", repr(spec))
    entries[name] = spec


def unregister(kind: str, name: str) -> None:
    """Remove the entry ``name`` of ``kind`` (a no-op when there is none)."""
    _check_kind(kind).pop(name, None)


@contextlib.contextmanager
def registered(kind: str, name: str, spec: Any) -> Iterator[None]:
    """``register`` for the body only: the entry that was there before (or none) is back afterwards."""
    entries = _check_kind(kind)
    previous = entries.get(name, _ABSENT)
    register(kind, name, spec)
    try:
        yield
    finally:
        if previous is _ABSENT:
            entries.pop(name, None)
        else:
            entries[name] = previous


def names(kind: str) -> tuple[str, ...]:
    """The names registered for ``kind``, in registration order."""
    return tuple(_check_kind(kind))


def get(kind: str, name: str, *, argument: str | None = None) -> Any:
    """The spec of ``name`` (imported on first use); an unknown name is an error naming ``argument``
    (default: the kind) and listing the choices."""
    entries = _check_kind(kind)
    if name not in entries:
        raise fail(argument or kind, "one of " + ", ".join(entries), repr(name))
    spec = entries[name]
    if isinstance(spec, str):
        module_name, _, attribute = spec.partition(":")
        spec = getattr(importlib.import_module(module_name), attribute)
        entries[name] = spec
    return spec
