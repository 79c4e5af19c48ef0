"""The open_clip backbone: loading (``load_clip``), exact truncated text encoding (``TextEncoder``),
weight fingerprints, and on-disk caches of frozen features (``fastcal.models.cache``)."""

from fastcal.models.clip import LoadedClip, WeightsNotFoundError, load_clip
from fastcal.models.fingerprint import model_fingerprint, transform_fingerprint
from fastcal.models.text_encoder import TextEncoder

__all__ = [
    "LoadedClip",
    "TextEncoder",
    "WeightsNotFoundError",
    "load_clip",
    "model_fingerprint",
    "transform_fingerprint",
]
