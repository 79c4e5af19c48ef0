"""Seeds derived from labels: reproducible streams that do not depend on what ran before."""

from __future__ import annotations

import hashlib


def derived_seed(label: str, part: int = 0) -> int:
    """A 63-bit seed from ``sha256(label)``: bytes ``8 part .. 8 part + 7``, little-endian (``part`` 0-3),
    so nearby labels (seed 1 epoch 2, seed 1 epoch 3, ...) give unrelated generators."""
    if not 0 <= part < 4:
        raise ValueError(f"part: expected 0, 1, 2 or 3 (a 32-byte digest), got {part!r}")
    digest = hashlib.sha256(label.encode()).digest()
    return int.from_bytes(digest[8 * part : 8 * part + 8], "little") & ((1 << 63) - 1)
