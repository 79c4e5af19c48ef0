"""The machinery the bench scripts share: timing, peak memory, environment, targets, results.

Timing calls every variant once per round, in turn, after a warm-up, so that load on a shared machine
hits all variants alike. Peak memory is read from /proc/self/status (Linux) in a fresh process, which
``in_subprocess`` starts with this module as its entry point: ``python bench/harness.py SCRIPT FUNCTION
THREADS KWARGS`` prints ``FUNCTION(**KWARGS)`` of the bench script as JSON.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcal._io import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
Clocks = Mapping[str, Callable[[], float]]
WALL = {"wall": time.perf_counter}
WALL_AND_CPU = {"wall": time.perf_counter, "cpu": time.process_time}
# a smaller VmHWM - VmRSS is freed pages being reused, not a peak this measurement can resolve
PEAK_RESOLUTION = 2**20  # bytes
# glibc: blocks of 64 KiB and more are mapped and unmapped one by one and a freed heap top is trimmed at
# once, so RSS follows the live tensors rather than the allocator's cache
RELEASE_FREED = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}
_COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
_UNITS = {"ratio": "x", "seconds": " s"}


# ---- time ------------------------------------------------------------------------------------------
@dataclass
class Runs:
    """One variant's timed calls: the seconds of each, per clock, and the last call's output."""

    seconds: dict[str, list[float]]
    output: Any = None

    @property
    def median(self) -> dict[str, float]:
        return {clock: statistics.median(values) for clock, values in self.seconds.items()}


def timed(fn: Callable[[], Any], clocks: Clocks = WALL) -> tuple[dict[str, float], Any]:
    """The seconds of one call of ``fn`` on each clock, and its output."""
    start = {clock: read() for clock, read in clocks.items()}
    out = fn()
    return {clock: read() - start[clock] for clock, read in clocks.items()}, out


def interleaved(
    variants: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    clocks: Clocks = WALL,
) -> dict[str, Runs]:
    """``warmup`` untimed calls of every variant, then ``rounds`` rounds that call each variant once, in
    turn, timed on ``clocks``."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    runs = {name: Runs({clock: [] for clock in clocks}) for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds, runs[name].output = timed(fn, clocks)
            for clock, value in seconds.items():
                runs[name].seconds[clock].append(value)
    return runs


def repeated(
    fn: Callable[[], Any],
    repeats: int,
    *,
    warmup: int = 1,
    clocks: Clocks = WALL,
) -> Runs:
    """``interleaved`` for a single variant: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    return interleaved({"": fn}, repeats, warmup=warmup, clocks=clocks)[""]


# ---- peak memory -----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], Any]) -> tuple[int, Any]:
    """The peak resident memory of a call of ``fn`` above what the process held before it, in bytes
    (VmHWM after the call minus VmRSS before it, the high-water mark reset first), and its output."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - before) * 1024, out


def peak_ratio(baseline: int, candidate: int) -> tuple[float, bool]:
    """``baseline / candidate`` peak bytes, and whether that is only a lower bound (a candidate peak below
    ``PEAK_RESOLUTION`` counts as ``PEAK_RESOLUTION``)."""
    return baseline / max(candidate, PEAK_RESOLUTION), candidate < PEAK_RESOLUTION


def in_subprocess(fn: Callable[..., dict], /, *, release_freed: bool = True, **kwargs: Any) -> dict:
    """``fn(**kwargs)`` in a fresh Python process with this process's torch threads (``fn``: a module-level
    function of a bench script that returns a JSON object), under ``RELEASE_FREED`` if ``release_freed``.
    A process that fails gives ``{"error": reason}``; the kernel's OOM killer: "killed (out of memory)"."""
    command = [sys.executable, __file__, inspect.getfile(fn), fn.__name__, str(torch.get_num_threads())]
    env = {**os.environ, **RELEASE_FREED} if release_freed else None
    done = subprocess.run([*command, json.dumps(kwargs)], capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode in (-9, 137):
        return {"error": "killed (out of memory)"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(script: str, function: str, threads: str, kwargs: str) -> None:
    """``in_subprocess``'s other end: import ``script`` and print ``function(**kwargs)`` as JSON."""
    torch.set_num_threads(int(threads))
    spec = importlib.util.spec_from_file_location("bench_child", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    print(json.dumps(getattr(module, function)(**json.loads(kwargs))))


# ---- environment, targets, results -----------------------------------------------------------------
def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def start(threads: int | None) -> dict[str, Any]:
    """Set torch's intra-op threads (None or 0: torch's default); print and return what the results are
    measured on, for ``write_results``."""
    if threads:
        torch.set_num_threads(threads)
    env = {
        "machine": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }
    print(
        f"torch {env['torch']}, {env['threads']} threads, {env['cpu']} ({env['cpu_count']} CPUs), "
        f"load average {env['load_average_start'][0]:.1f}"
    )
    return env


@dataclass(frozen=True)
class Target:
    """An issue's target: ``measured`` (None: not measured) ``op`` ``wanted``; ``quantity`` ("ratio" or
    "seconds") is the measured value's key in the JSON and sets its unit in the table."""

    label: str
    measured: float | None
    wanted: float
    op: str = ">="
    quantity: str = "ratio"

    @property
    def met(self) -> bool | None:
        return None if self.measured is None else _COMPARE[self.op](self.measured, self.wanted)


def report_targets(targets: Mapping[str, Target]) -> dict[str, dict[str, Any]]:
    """Print ``targets`` as a table (measured, wanted, met / NOT met) and return them for the JSON under
    the same keys: ``{quantity: measured, "target": wanted, "met": met}``."""
    width = max(len(target.label) for target in targets.values())
    print(f"\n{'target':<{width}} {'measured':>9} {'wanted':>9}")
    for t in targets.values():
        unit = _UNITS[t.quantity]
        measured = "-" if t.measured is None else f"{t.measured:.2f}{unit}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        print(f"{t.label:<{width}} {measured:>9} {f'{t.op} {t.wanted:g}{unit}':>9}  {verdict}")
    return {key: {t.quantity: t.measured, "target": t.wanted, "met": t.met} for key, t in targets.items()}


def write_results(name: str, results: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    """Write ``results`` with ``env`` (``start()``) and the load average now to
    bench/results/<name>.json, atomically."""
    path, load_average = RESULTS / f"{name}.json", os.getloadavg()
    write_json_atomic(path, {"bench": name, **env, "load_average_end": load_average, **results})
    print(f"wrote {path.relative_to(ROOT)} (load average {load_average[0]:.1f})")


if __name__ == "__main__":
    _child(*sys.argv[1:])
