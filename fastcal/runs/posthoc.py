"""Post-hoc calibration of saved predictions: fit a registered calibrator (``fastcal.registry`` kind
``"calibrator"``) on one group's predictions and apply it to another's.

``fastcal calibrate`` fits on one ``predictions/<group>.npz`` and applies to another (of the same run or
of another: the ICML 2024 study of CLIP calibration fits TS on samples of other labels); the demo's
prompt-tuning rows fit TS and DAC on the base classes' few-shot validation predictions and report the
new classes' ECE after each (``base_to_new_calibration``).

Label sets follow ``fastcal.calibrate.base``: a calibrator bound to its classes is refused on another
class set, naming the option and the calibrators that transfer; DAC needs both files' class text
features (prompt-tuning runs save them).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fastcal import registry
from fastcal._checks import fail
from fastcal.calibrate import TRANSFERABLE
from fastcal.runs.predictions import LoadedPredictions, load_predictions


def build_calibrator(name: str, options: Mapping[str, Any] | None = None, *, argument: str = "--method"):
    """The calibrator registered as ``name``, constructed with ``options`` (checked against its
    constructor's keyword arguments, so a wrong key is an error naming them)."""
    cls = registry.get("calibrator", name, argument=argument)
    options = dict(options or {})
    parameters = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise fail("--option", f"options of {name}: {', '.join(accepted) or 'none'}", ", ".join(unknown))
    return cls(**options)


def _text_context(predictions: LoadedPredictions, argument: str) -> dict[str, torch.Tensor]:
    if predictions.text_features is None or predictions.zeroshot_text_features is None:
        raise fail(
            argument,
            "predictions with text_features and zeroshot_text_features (DAC reads the classes' text "
            "features; prompt-tuning runs save them, per-image classifiers such as CoCoOp's have none)",
            "a file without them",
        )
    return {
        "text_features": predictions.text_features,
        "zeroshot_text_features": predictions.zeroshot_text_features,
    }


def _describe_classes(predictions: LoadedPredictions) -> str:
    names = predictions.classnames
    shown = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
    return f"{predictions.scores.shape[1]} classes{shown}"


def fit_and_apply(
    calibrator: Any,
    fit: LoadedPredictions,
    apply: LoadedPredictions,
    *,
    fit_argument: str = "--fit",
    apply_argument: str = "--apply",
) -> torch.Tensor:
    """Fit ``calibrator`` on ``fit``'s logits and labels and return its calibrated logits of ``apply``
    (N, C) in float64. Both must hold logits (as a run saved them, before any temperature)."""
    for argument, predictions in ((fit_argument, fit), (apply_argument, apply)):
        if predictions.kind != "logits":
            raise fail(argument, "a predictions file with logits (post-hoc calibrators map logits)", "probs")
    if not calibrator.transfers_classes:
        same_count = fit.scores.shape[1] == apply.scores.shape[1]
        if not same_count or (fit.classnames and apply.classnames and fit.classnames != apply.classnames):
            raise fail(
                apply_argument,
                f"predictions over the {_describe_classes(fit)} of {fit_argument} ({calibrator.name} is "
                "bound to the classes it was fitted on; calibrators that transfer to other classes: "
                f"{', '.join(TRANSFERABLE)})",
                _describe_classes(apply),
            )
    fit_context = _text_context(fit, fit_argument) if calibrator.uses_text_features else {}
    apply_context = _text_context(apply, apply_argument) if calibrator.uses_text_features else {}
    calibrator.fit(fit.scores.double(), fit.labels, classnames=fit.classnames, **fit_context)
    return calibrator(apply.scores.double(), classnames=apply.classnames, **apply_context).double()


def base_to_new_calibration(
    method: Any,
    clip: Any,
    base_items: Sequence[Any],
    base_classnames: Sequence[str],
    new_predictions: str | Path,
    *,
    templates: Sequence[str],
    n_bins: int,
    calibrators: Sequence[str] = ("ts", "dac"),
    **predict_options: Any,
) -> dict[str, Any]:
    """The new classes' ECE after each of ``calibrators`` fitted on the base classes' ``base_items``
    (a few-shot validation set): ``{name: ece}``, or ``{name: None, name + "_skipped": why}`` where
    a calibrator cannot run (DAC without class text features). ``method`` is a trained prompt method
    (switched to the base classes here), ``new_predictions`` the run's saved new-class file; the base
    classes' zero-shot text features are those of ``templates[0]``, as the run saved the new classes'."""
    from fastcal.metrics import ece
    from fastcal.models.cache import class_text_features
    from fastcal.runs.train.loop import predict

    base = predict(method, clip, list(base_items), list(base_classnames), **predict_options)
    zeroshot = class_text_features(clip.model, clip.tokenizer, list(base_classnames), list(templates[:1]))
    fit = LoadedPredictions(
        base.logits.double(),
        base.labels,
        "logits",
        1.0,
        list(base_classnames),
        text_features=base.text_features,
        zeroshot_text_features=zeroshot if base.text_features is not None else None,
    )
    apply = load_predictions(new_predictions, "new_predictions")
    result: dict[str, Any] = {}
    for name in calibrators:
        calibrator = build_calibrator(name)
        if calibrator.uses_text_features and (fit.text_features is None or apply.text_features is None):
            result[name] = None
            result[f"{name}_skipped"] = "no class text features (one classifier per image)"
            continue
        calibrated = fit_and_apply(calibrator, fit, apply, fit_argument="base validation")
        result[name] = float(ece(torch.softmax(calibrated, dim=1), apply.labels, n_bins=n_bins))
    return result
