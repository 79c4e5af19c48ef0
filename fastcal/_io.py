"""Durable files: atomic writes, checksummed memory-mapped tensor files, fsync'ed JSON lines.

Nothing fastcal writes is ever half-written: every file is written to a temporary name in the same
directory, flushed, fsync'ed and renamed over the target (``os.replace`` is atomic on POSIX).

Tensor files use the safetensors layout (an 8-byte little-endian header length, a JSON header, the raw
data) so other tools can read them. fastcal adds two header metadata fields: ``fastcal_key``, the
canonical JSON of what the content was computed from, and ``fastcal_sha256``, a checksum over the
tensors (by sorted name: the name, dtype, shape and raw bytes). A file whose key differs or whose
checksum fails is reported as missing, so callers recompute it. ``cached_tensors`` computes a missing file
once however many processes ask for it at the same time: the first takes an exclusive ``fcntl.flock`` on
``<file>.lock`` while it computes, the others wait for it and then load what it wrote (the operating system
releases the lock of a process that dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

_NUMPY_DTYPES = {
    torch.float64: ("F64", np.float64),
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.int64: ("I64", np.int64),
    torch.int32: ("I32", np.int32),
    torch.int16: ("I16", np.int16),
    torch.uint8: ("U8", np.uint8),
    torch.bool: ("BOOL", np.bool_),
}
_FROM_TAG = {tag: np_dtype for tag, np_dtype in _NUMPY_DTYPES.values()}


_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname().replace(".", "_") or "host"
# A temporary older than this is stale even when its writer cannot be checked (another host's).
STALE_TEMPORARY_SECONDS = 24 * 3600


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The caller writes the temporary file completely; on an exception it is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600, and some writers (safetensors) replace the file with another 0600 one:
        # give the finished file the mode open() would, so users sharing a cache or run can read it
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries that ``atomic_path`` left for the target ``name`` (or for any target) in
    ``directory`` when their writer died: the writer's process no longer runs on this host, or the file
    is older than ``STALE_TEMPORARY_SECONDS`` (another host's writer, or one that cannot be told).
    Returns the removed paths."""
    directory = Path(directory)
    removed = []
    now = time.time()
    for tmp in directory.glob(f".{name}.*.tmp" if name is not None else ".*.tmp"):
        host, _, pid = tmp.name[: -len(".tmp")].rsplit(".", 2)[-2].rpartition("-")
        try:
            dead = host == _HOST and pid.isdigit() and not _process_alive(int(pid))
            if dead or now - tmp.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: Mapping[str, Any], length: int = 16) -> str:
    """A short hex digest of a cache key, for file names."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:length]


def _jsonl_lines(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` with these records as JSON lines, atomically."""
    write_bytes_atomic(path, _jsonl_lines(records).encode())


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Append records as JSON lines, then flush and fsync, so a kill loses at most this batch."""
    lines = _jsonl_lines(records)
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read JSON lines; a torn last line (a process killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _tensor_checksum(named_arrays: Iterable[tuple[str, str, tuple[int, ...], memoryview]]) -> str:
    h = hashlib.sha256()
    for name, tag, shape, data in named_arrays:
        h.update(f"{name}|{tag}|{shape}|".encode())
        h.update(data)
    return h.hexdigest()


def _as_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], key: Mapping[str, Any]
) -> None:
    """Write ``tensors`` to ``path`` atomically, with ``key`` and a checksum in the header."""
    prepared: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _NUMPY_DTYPES:
            raise ValueError(
                f"tensors[{name!r}]: expected one of dtypes "
                f"{', '.join(str(d) for d in _NUMPY_DTYPES)}, got {t.dtype}"
            )
        prepared[name] = t.detach().to("cpu").contiguous()
    checksum = _tensor_checksum(
        (n, _NUMPY_DTYPES[t.dtype][0], tuple(t.shape), _as_bytes(t.numpy())) for n, t in prepared.items()
    )
    metadata = {"fastcal_key": canonical_json(key), "fastcal_sha256": checksum}
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("truncated header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError("implausible header length")
        header = json.loads(f.read(n))
    return 8 + n, header


def load_tensors(
    path: str | os.PathLike, key: Mapping[str, Any], *, verify: bool = True
) -> dict[str, torch.Tensor] | None:
    """Memory-map the tensors at ``path``; ``None`` if missing, written for another key, or corrupt.
    A file that exists but cannot be read is a ``PermissionError``, not "corrupt".

    The returned tensors share pages with the file (copy-on-write), so loading costs no copy.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if not os.access(path, os.R_OK):
        raise PermissionError(
            f"{path}: expected a file this user can read, got one without read permission (another "
            "user's cache or run? make it readable, or point $FASTCAL_CACHE / --output elsewhere)"
        )
    try:
        data_start, header = _read_header(path)
        metadata = header.pop("__metadata__", {}) or {}
        if metadata.get("fastcal_key") != canonical_json(key):
            return None
        arrays: dict[str, np.ndarray] = {}
        size = path.stat().st_size
        for name in sorted(header):
            info = header[name]
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ValueError("truncated data")
            np_dtype = _FROM_TAG[info["dtype"]]
            shape = tuple(info["shape"])
            if end == begin:
                arrays[name] = np.zeros(shape, dtype=np_dtype)
            else:
                arrays[name] = np.memmap(
                    path, dtype=np_dtype, mode="c", offset=data_start + begin, shape=shape
                )
        if verify:
            checksum = _tensor_checksum(
                (n, header[n]["dtype"], tuple(header[n]["shape"]), _as_bytes(a)) for n, a in arrays.items()
            )
            if checksum != metadata.get("fastcal_sha256"):
                return None
    except (ValueError, KeyError, OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return {name: torch.from_numpy(a) for name, a in arrays.items()}


def cached_tensors(
    path: str | os.PathLike,
    key: Mapping[str, Any],
    compute: Callable[[], Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Load the tensors for ``key`` from ``path``, computing and saving them when absent or bad (once
    across processes: module docstring)."""
    loaded = load_tensors(path, key)
    if loaded is not None:
        return loaded
    with exclusive_lock(Path(path).with_name(Path(path).name + ".lock")):
        loaded = load_tensors(path, key)  # written by the process this one waited for
        if loaded is not None:
            return loaded
        if Path(path).exists():
            warnings.warn(
                f"cache {path}: stale or corrupt (key or checksum mismatch); recomputing",
                stacklevel=2,
            )
        save_tensors(path, compute(), key)
    loaded = load_tensors(path, key)
    if loaded is None:
        raise OSError(f"cache {path}: expected a readable file after writing it, got none")
    return loaded


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` (created if missing), waiting for any other
    holder; released on exit, or by the operating system when the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_torch_file(path: str | os.PathLike, *, what: str, hint: str = "") -> Any:
    """Load a torch file that a user may hand us without running code from it (``weights_only=True``:
    tensors, numbers, strings, lists, tuples and dicts only).

    Errors name ``what`` and the path: ``FileNotFoundError`` for a missing file, ``PermissionError``
    for one that cannot be read, ``ValueError`` for one that would need code to load (refused) and for
    a corrupt or truncated one (``hint``, e.g. how to start over, is appended).
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected a file, got {path}, which does not exist{suffix}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what}: expected a file this user can read, got {path} (permission denied)")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of damaged files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ... here
        if "Weights only load failed" in str(e) and "GLOBAL" in str(e):  # a class or function to import
            raise ValueError(
                f"{what}: expected plain tensors and values in {path}, got a file that needs code to load "
                "(refused: fastcal never runs code from a file)"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(
            f"{what}: expected a complete torch file, got {path}, which is corrupt or truncated "
            f"({type(e).__name__}: {first}){suffix}"
        ) from None


def default_cache_dir() -> Path:
    """Where fastcal caches features and weights: ``$FASTCAL_CACHE`` or ``~/.cache/fastcal``."""
    env = os.environ.get("FASTCAL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastcal"
