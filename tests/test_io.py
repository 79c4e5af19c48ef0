"""fastcal._io: loads that run no code from a file, the modes of written files, unreadable vs corrupt."""

import os
import stat

import pytest
import torch

from fastcal._io import load_tensors, load_torch_file, save_tensors


class WritesAMarker:
    """A pickle that runs code when loaded unsafely: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "prompt.pt"
    torch.save({"tuned": torch.ones(2), "payload": WritesAMarker(marker)}, path)
    with pytest.raises(ValueError, match=r"prompt: expected plain tensors .* needs code to load \(refused"):
        load_torch_file(path, what="prompt")
    assert not marker.exists()


def test_damaged_files_are_corrupt_and_plain_ones_load(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.arange(5.0), "meta": {"epochs": [1, 2], "name": "coop"}}, good)
    loaded = load_torch_file(good, what="checkpoint")
    assert torch.equal(loaded["x"], torch.arange(5.0)) and loaded["meta"]["name"] == "coop"
    data = good.read_bytes()
    for name, content in (
        ("truncated", data[: len(data) // 2]),
        ("garbage", b"not torch" * 9),
        ("empty", b""),
    ):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(
            ValueError, match=r"checkpoint: expected a complete torch file.*corrupt or truncated.*; hint"
        ):
            load_torch_file(path, what="checkpoint", hint="hint")
    with pytest.raises(FileNotFoundError, match="checkpoint: expected a file"):
        load_torch_file(tmp_path / "missing.pt", what="checkpoint")


def test_written_files_get_the_umask_mode(tmp_path):
    path = tmp_path / "cache" / "features.safetensors"
    save_tensors(path, {"a": torch.ones(3)}, {"key": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_an_unreadable_cache_file_is_not_called_corrupt(tmp_path, monkeypatch):
    """As root every file is readable, so the test makes os.access answer as another user would."""
    path = tmp_path / "features.safetensors"
    save_tensors(path, {"a": torch.ones(3)}, {"key": 1})
    assert load_tensors(path, {"key": 1}) is not None
    monkeypatch.setattr(os, "access", lambda p, mode: not (str(p) == str(path) and mode & os.R_OK))
    with pytest.raises(PermissionError, match="without read permission"):
        load_tensors(path, {"key": 1})


def _compute_once_worker(path, log, start):
    import time

    from fastcal._io import cached_tensors

    while time.time() < start:
        time.sleep(0.005)

    def compute():
        with open(log, "a") as f:
            f.write("computed\n")
        time.sleep(0.5)  # long enough for the other processes to find the file missing
        return {"x": torch.arange(7.0)}

    return cached_tensors(path, {"kind": "test"}, compute)["x"].tolist()


def test_processes_asking_for_a_missing_cache_file_at_once_compute_it_once(tmp_path):
    import concurrent.futures
    import multiprocessing
    import time

    path, log = tmp_path / "t.safetensors", tmp_path / "log"
    start = time.time() + 1.0
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=context) as pool:
        results = list(pool.map(_compute_once_worker, [path] * 3, [log] * 3, [start] * 3))
    assert results == [list(map(float, range(7)))] * 3
    assert log.read_text() == "computed\n"
