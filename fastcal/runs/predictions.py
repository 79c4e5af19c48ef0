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
report equals the group's report in results.json. The files are numpy archives without pickles.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcal._checks import check_labels, check_tensor, fail
from fastcal._io import write_bytes_atomic

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
