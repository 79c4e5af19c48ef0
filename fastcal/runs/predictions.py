"""Saved predictions: every evaluation of every run keeps what it scored, so it can be re-measured and
calibrated after the fact.

``predictions/<group>.npz`` in the run folder holds, for one evaluated group (a class group, a dataset,
an ID or OOD set):

- ``logits`` (N, C), as the model scored them, before any temperature (float32, or float64 where the
  report was computed in float64);
- ``labels`` (N,) int64;
- ``classnames`` (C,) strings;
- ``logit_scale``: the model's exponentiated scale ``s`` (``logits = s * cos``);
- ``temperature``: what the group's report in results.json divides the logits by (1: none);
- optionally ``text_features`` (C, D), the class features the model scored with, and
  ``zeroshot_text_features`` (C, D), the frozen hand-crafted prompt's (post-hoc calibrators that look
  at the classes' text, such as DAC, need both);
- optionally ``proximity`` (N,), each sample's proximity to the others in its image-feature space
  (``fastcal.metrics.knn_proximity``), which PIECE bins on.

``fastcal metrics FILE`` reads these files as they are (dividing by the stored temperature), so its
report equals the group's report in results.json, and ``fastcal calibrate`` fits and applies post-hoc
calibrators on them. The files are numpy archives without pickles; ``load_predictions`` reads them (and
``.pt`` files with the same keys).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fastcal._checks import check_labels, check_tensor, fail
from fastcal._io import load_torch_file, write_bytes_atomic

FOLDER = "predictions"


def save_predictions(
    path: str | os.PathLike,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    *,
    logit_scale: float,
    temperature: float = 1.0,
    text_features: torch.Tensor | None = None,
    zeroshot_text_features: torch.Tensor | None = None,
    proximity: torch.Tensor | None = None,
) -> Path:
    """Write one group's predictions to ``path`` (a ``.npz``; module docstring), atomically."""
    check_tensor("logits", logits, ndim=2, floating=True, finite=False)
    check_labels("labels", labels, logits.shape[0], logits.shape[1])
    if len(classnames) != logits.shape[1]:
        raise fail("classnames", f"{logits.shape[1]} names (one per column)", len(classnames))
    arrays: dict[str, Any] = {
        "logits": logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).cpu().numpy(),
        "labels": labels.detach().long().cpu().numpy(),
        "classnames": np.asarray([str(name) for name in classnames]),
        "logit_scale": np.float64(logit_scale),
        "temperature": np.float64(temperature),
    }
    optional = {"text_features": text_features, "zeroshot_text_features": zeroshot_text_features}
    for name, features in optional.items():
        if features is not None:
            check_tensor(name, features, ndim=2, floating=True)
            if features.shape[0] != logits.shape[1]:
                raise fail(name, f"{logits.shape[1]} rows (one per class)", features.shape[0])
            arrays[name] = features.detach().float().cpu().numpy()
    if proximity is not None:
        check_tensor("proximity", proximity, ndim=1, floating=True)
        if proximity.shape[0] != logits.shape[0]:
            raise fail("proximity", f"{logits.shape[0]} values (one per row)", proximity.shape[0])
        arrays["proximity"] = proximity.detach().double().cpu().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def predictions_path(folder: str | os.PathLike, group: str) -> Path:
    """Where a run folder keeps the predictions of ``group``."""
    return Path(folder) / FOLDER / f"{group}.npz"


class LoadedPredictions(NamedTuple):
    """A file of predictions as read by ``load_predictions``: ``scores`` (N, C) logits or probabilities
    (``kind``), ``labels`` (N,), the ``temperature`` a run's report divides logits by (1 when the file
    has none), and the optional fields of the module docstring that the file holds (``classnames`` a
    list, the others tensors)."""

    scores: torch.Tensor
    labels: torch.Tensor
    kind: str
    temperature: float
    classnames: list[str] | None = None
    text_features: torch.Tensor | None = None
    zeroshot_text_features: torch.Tensor | None = None
    proximity: torch.Tensor | None = None


def _read_archive(path: Path, name: str) -> dict[str, Any]:
    if path.suffix not in (".npz", ".pt"):
        raise fail(name, "a .npz or .pt file", repr(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
    if path.suffix == ".pt":
        data = load_torch_file(path, what=name)
        if not isinstance(data, dict):
            raise fail(name, f"a dict of tensors in {str(path)!r}", type(data).__name__)
        return data
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as e:  # zipfile, numpy and OS errors of a damaged archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise fail(name, "a readable .npz archive", f"{str(path)!r}, which is not one ({first})") from None


def _tensor(data: dict[str, Any], key: str, name: str) -> torch.Tensor:
    value = data[key]
    try:
        return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise fail(f"{name}[{key!r}]", "a numeric array", type(value).__name__) from None


def load_predictions(path: str | os.PathLike, name: str = "PRED_FILE") -> LoadedPredictions:
    """Read a ``.npz`` (this module's files, or any with the same keys) or ``.pt`` file holding
    ``labels`` and ``logits`` or ``probs`` (logits win when both are present). Every defect of the file
    (missing, unreadable, corrupt, wrong keys, non-numeric or empty arrays, fewer than 2 classes,
    optional fields of the wrong shape) is a one-line error naming ``name`` and the file; nothing in the
    file is executed."""
    path = Path(path)
    data = _read_archive(path, name)
    kind = next((k for k in ("logits", "probs") if k in data), None)
    if kind is None or "labels" not in data:
        raise fail(
            name, f"keys 'labels' and 'logits' or 'probs' in {str(path)!r}", f"keys {sorted(map(str, data))}"
        )
    scores, labels = _tensor(data, kind, name), _tensor(data, "labels", name)
    check_tensor(f"{name}[{kind!r}]", scores, ndim=2, floating=True, finite=False)
    if scores.shape[1] < 2:
        expected = "at least 2 classes (columns): calibration of 1 class is void"
        raise fail(f"{name}[{kind!r}]", expected, scores.shape[1])
    check_labels(f"{name}['labels']", labels, scores.shape[0], scores.shape[1])
    temperature = 1.0
    if kind == "logits" and "temperature" in data:
        value = np.asarray(data["temperature"])
        if value.shape != () or not np.issubdtype(value.dtype, np.number) or not float(value) > 0:
            raise fail(f"{name}['temperature']", "a positive number", repr(value)[:80])
        temperature = float(value)
    classnames = None
    if "classnames" in data:
        classnames = [str(c) for c in np.asarray(data["classnames"]).reshape(-1).tolist()]
        if len(classnames) != scores.shape[1]:
            raise fail(f"{name}['classnames']", f"{scores.shape[1]} names (one per column)", len(classnames))
    optional: dict[str, torch.Tensor] = {}
    for key, rows in (
        ("text_features", scores.shape[1]),
        ("zeroshot_text_features", scores.shape[1]),
        ("proximity", scores.shape[0]),
    ):
        if key in data:
            value = _tensor(data, key, name)
            check_tensor(f"{name}[{key!r}]", value, ndim=1 if key == "proximity" else 2, floating=True)
            if value.shape[0] != rows:
                raise fail(f"{name}[{key!r}]", f"{rows} rows", value.shape[0])
            optional[key] = value
    return LoadedPredictions(scores, labels, kind, temperature, classnames, **optional)
