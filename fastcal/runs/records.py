"""Per-sample record files of long runs: JSON lines appended by every rank, repaired after a crash.

Every rank appends its records to one file in batches (``fastcal._io.append_jsonl``: one ``write`` per
batch on an ``O_APPEND`` file, then ``fsync``), so a killed run loses at most the batch it was writing.
A process killed in the middle of a write can leave a last line without its newline: ``drop_torn_tail``
cuts it off before the next run appends, and readers skip it (``fastcal._io.read_jsonl``). A record
written twice (a batch appended again after a crash between the append and the bookkeeping) is read
once (``unique_records``: the first of each index).

A record may carry a tensor row (a sample's logits) as base64 of its raw float32 bytes (``encode_row``
/ ``decode_rows``): exact, and about 5.4 bytes per class in the file.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcal._checks import fail


def drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut a last line without its newline (a process killed mid-write) off the file, so the next
    append starts on a line of its own."""
    path = Path(path)
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
    """The first record of each ``index``, sorted by index."""
    first: dict[int, dict[str, Any]] = {}
    for record in records:
        first.setdefault(int(record["index"]), record)
    return [first[i] for i in sorted(first)]


def encode_row(row: torch.Tensor) -> str:
    """A 1-D tensor as base64 of its float32 bytes (little-endian)."""
    return base64.b64encode(row.detach().float().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def decode_rows(encoded: Sequence[str], width: int) -> torch.Tensor:
    """The ``(len(encoded), width)`` float32 tensor of ``encode_row`` strings."""
    rows = np.empty((len(encoded), width), dtype="<f4")
    for i, text in enumerate(encoded):
        row = np.frombuffer(base64.b64decode(text), dtype="<f4")
        if row.shape[0] != width:
            raise fail(f"records[{i}]", f"a row of {width} values", f"{row.shape[0]} values")
        rows[i] = row
    return torch.from_numpy(rows.astype(np.float32))
