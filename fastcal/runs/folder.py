"""Run folders: one writer at a time, no finished run replaced unasked, nothing left half-written.

A run folder holds what one command wrote for one run: its manifest ``run.json`` (which command wrote
it, and what the result depends on), results, checkpoints, records, predictions and figures.
``RunFolder.open`` is how a command takes a folder for writing:

- Before anything is created: a path that is a file, or a folder this user cannot write, is refused;
  so is ``resume`` on a folder that holds no run, and a folder that holds a run (its own command's or
  another's) unless the run is to be continued (``resume``, the same command) or replaced
  (``overwrite``: the previous run's files are removed first).
- An exclusive lock, ``fcntl.flock`` on ``.fastcal.lock`` (which records the holder's pid and host),
  is held for the life of the run. A second writer is refused at once, naming the holder; the
  operating system releases the lock when the holder exits or dies, so a crash never leaves it held.
- With the lock held, temporaries that dead writers left (``.*.tmp`` of ``fastcal._io.atomic_path``)
  are removed: no live writer owns one.

Every file in the folder is written atomically (``fastcal._io``), so a killed run leaves whole files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastcal._checks import fail
from fastcal._io import remove_stale_temporaries, write_json_atomic
from fastcal.runs.distributed import on_rank_zero

MANIFEST = "run.json"
RESULTS = "results.json"
LOCK = ".fastcal.lock"
# What fastcal wrote into run folders before they had a manifest: a folder holding one of these holds
# a run, and only these files (and the patterns below) are removed when it is overwritten.
EARLIER_RUN_FILES = (
    "results.json",
    "checkpoint.pt",
    "checkpoint.safetensors",
    "records.jsonl",
    "prompt.pt",
    "model.safetensors",
)
EARLIER_RUN_PATTERNS = (
    *EARLIER_RUN_FILES,
    "head.safetensors",
    "train_log.jsonl",
    "eval.json",
    "fpp_context.safetensors",
    "calibration_logits.safetensors",
    "reliability*.png",
    "reliability",
    "predictions",
)


def _check_creatable(path: Path, argument: str, what: str) -> None:
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise fail(argument, f"a {what} path", f"{path}, below the file {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise fail(argument, f"a {what} this user can write", f"{path} ({existing} is not writable)")


def package_versions() -> dict[str, str]:
    """The versions a run's results depend on: fastcal, Python, torch, open_clip, numpy."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("fastcal", "torch", "open_clip_torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def check_output_path(path: str | os.PathLike, argument: str = "--output") -> Path:
    """``path`` as a folder this user may create or write; checked without creating anything."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise fail(argument, "a folder", f"the file {path}")
    _check_creatable(path, argument, "folder")
    return path


def check_output_file(path: str | os.PathLike, argument: str) -> Path:
    """``path`` as a file this user may create or replace; checked without creating anything."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise fail(argument, "a file path", f"the folder {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise fail(argument, "a file this user can write", f"{path} (not writable)")
    _check_creatable(path.parent, argument, "file")
    return path


def _visible_entries(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK and not p.name.endswith(".tmp")]


def run_kind(path: str | os.PathLike) -> str | None:
    """The command whose run the folder holds (its manifest's ``kind``), ``"earlier"`` for a run written
    before manifests, or ``None`` for a folder without a run (missing, empty, or other files only)."""
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        return kind if isinstance(kind, str) else "unknown"
    if path.is_dir() and any((path / name).exists() for name in EARLIER_RUN_FILES):
        return "earlier"
    return None


def _describe(kind: str) -> str:
    return "a run written by an earlier fastcal" if kind == "earlier" else f"a {kind} run"


def check_run_rules(
    path: Path,
    *,
    kind: str,
    resume: bool,
    overwrite: bool,
    argument: str,
    replace_own: bool = False,
    resume_argument: str = "--resume",
) -> str | None:
    """Check the folder's run against the resume / overwrite rules (module docstring); return the kind
    of run it holds. ``replace_own``: a run of this same kind may be replaced without ``overwrite``;
    ``argument`` and ``resume_argument`` name the options in the errors."""
    if resume and overwrite:
        raise fail("--resume", "either --resume or --overwrite, not both", "both")
    found = run_kind(path)
    if resume:
        if found is None:
            raise fail(resume_argument, "a folder holding a run to continue", f"{path}, which holds none")
        if found not in (kind, "earlier"):  # an earlier run's own checks tell whether it matches
            raise fail(
                resume_argument, f"a folder holding a {kind} run", f"{path}, which holds {_describe(found)}"
            )
    elif found is not None and not overwrite and not (replace_own and found == kind):
        raise fail(
            argument,
            "a new or empty folder (--resume continues the run there, --overwrite replaces it)",
            f"{path}, which holds {_describe(found)}",
        )
    return found


def check_run_folder(
    path: str | os.PathLike,
    *,
    kind: str,
    resume: bool = False,
    overwrite: bool = False,
    replace_own: bool = False,
) -> Path:
    """The checks of ``RunFolder.open`` that read only (the path, the resume and overwrite rules), for
    a run to make before it loads its model and data."""
    path = check_output_path(path)
    rules = {"resume": resume, "overwrite": overwrite, "replace_own": replace_own}
    check_run_rules(path, kind=kind, argument="--output", **rules)
    return path


def take_lock(path: Path, argument: str = "--output", *, wait_seconds: float = 0.0) -> int:
    """Create the folder ``path`` and take its exclusive lock (``fcntl.flock`` on ``path/.fastcal.lock``,
    recording this process's pid and host); return the lock's file descriptor for ``release_lock``. A lock
    another process holds is an error naming the holder once ``wait_seconds`` have passed."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        raise fail(argument, "a folder this user can write", f"{path} (permission denied)") from None
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise fail(argument, "a folder no other run is writing", f"{path}, locked by {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    """Release a lock ``take_lock`` took."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the lock of the folder ``path`` (``"pid N on HOST"``), or ``None`` when nobody does.
    Probing takes a shared lock for an instant, so ``take_lock`` callers should wait a moment."""
    try:
        fd = os.open(Path(path) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunFolder:
    """A run's output folder, held for writing (module docstring). Use as a context manager, or call
    ``close()`` to release the lock."""

    def __init__(self, path: Path, kind: str, lock_fd: int | None) -> None:
        self.path = path
        self.kind = kind
        self._lock_fd = lock_fd

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        kind: str,
        resume: bool = False,
        overwrite: bool = False,
        argument: str = "--output",
        replace_own: bool = False,
        resume_argument: str = "--resume",
    ) -> RunFolder:
        """Take ``path`` for a ``kind`` run (the command's name): checks, lock, clean-up (module
        docstring). With ``overwrite`` (or ``replace_own`` and a run of the same kind) the previous
        run's files are removed."""
        path = check_output_path(path, argument)
        rules = {
            "kind": kind,
            "resume": resume,
            "overwrite": overwrite,
            "argument": argument,
            "replace_own": replace_own,
            "resume_argument": resume_argument,
        }
        check_run_rules(path, **rules)
        fd = take_lock(path, argument)
        folder = cls(path, kind, fd)
        try:
            # the checks again, now that no other writer can change the folder
            found = check_run_rules(path, **rules)
            for directory in (path, *(p for p in path.rglob("*") if p.is_dir())):
                remove_stale_temporaries(directory)
            if found is not None and not resume:
                folder._remove_previous_run(found)
        except BaseException:
            folder.close()
            raise
        return folder

    def _remove_previous_run(self, found: str) -> None:
        if found == "earlier":
            doomed = {p for pattern in EARLIER_RUN_PATTERNS for p in self.path.glob(pattern)}
        else:
            doomed = set(_visible_entries(self.path))
        for entry in doomed:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def manifest(self) -> dict[str, Any] | None:
        """The content of ``run.json``, or ``None`` before the run wrote it."""
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write ``run.json``: ``{"kind": <command>, "versions": {...}, **manifest}`` (the resolved
        config and the model's fingerprint, by convention)."""
        write_json_atomic(
            self.path / MANIFEST, {"kind": self.kind, "versions": package_versions(), **manifest}
        )

    def write_results(self, results: dict[str, Any]) -> None:
        """Write ``results.json`` atomically."""
        write_json_atomic(self.path / RESULTS, results)

    def close(self) -> None:
        """Release the lock (the lock file stays; it is empty of meaning without a holder)."""
        if self._lock_fd is not None:
            release_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def hold_run_folder(
    path: str | os.PathLike,
    *,
    kind: str,
    resume: bool = False,
    overwrite: bool = False,
    prepare: Callable[[RunFolder], None] | None = None,
) -> Iterator[Path]:
    """For every rank of a run: rank 0 opens ``path`` (``RunFolder.open``) and runs ``prepare(folder)``
    (manifest checks, repairs) while the others wait; then every rank runs the body with the folder's
    path, and rank 0 releases the folder at the end. An error on rank 0 is raised on every rank."""
    held: list[RunFolder] = []

    def take() -> None:
        folder = RunFolder.open(path, kind=kind, resume=resume, overwrite=overwrite)
        held.append(folder)
        if prepare is not None:
            prepare(folder)

    try:
        on_rank_zero(take)
        yield Path(path).expanduser()
    finally:
        for folder in held:
            folder.close()
