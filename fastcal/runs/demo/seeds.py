"""The demo's seeded sections: prompt tuning and test-time tuning over several seeds, as a sweep.

Every stage defined in a module of ``SEEDED_MODULES`` runs once per seed: each (section, seed) is one
cell of a ``fastcal.runs.sweep`` grid of the ``demo_section`` command (local processes, ``MAX_PARALLEL``
at a time, one torch thread each), whose run folder holds that seed's rows. Three at a time on two cores:
a cell that starts up or waits for a shared cache (``start_warming``) leaves its core to the others.
The demo's row of a method is the mean over the seeds of each group's accuracy and ECE, with their
sample standard deviations in ``notes["spread"]``. A row that improves on another (``IMPROVES_ON``: a
calibration method on the method it modifies) gets a mark in ``notes["marks"]`` for each number whose
difference to that row exceeds the sum of the two standard deviations; a smaller difference is not told
apart from seed-to-seed noise.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcal._checks import check_choice, check_int, fail
from fastcal.runs.options import Settings, setting
from fastcal.runs.sweep.commands import RunCommand

SEEDS = (1, 2, 3)
SEEDED_MODULES = {
    "fastcal.runs.demo.prompt_tuning": "prompt_tuning",
    "fastcal.runs.demo.test_time": "test_time",
}
# row -> the row it improves on (same section)
IMPROVES_ON = {
    "CoOp + calibrated loss": "CoOp",
    "CoOp + DOR": "CoOp",
    "KgCoOp": "CoOp",
    "TPT": "zero-shot (hard prompt, same samples)",
    "C-TPT": "TPT",
    "O-TPT": "TPT",
    "FPP + C-TPT": "C-TPT",
    "C-TPT (ensemble init)": "C-TPT",
}
MAX_PARALLEL = 3


def section_of(target: str) -> str | None:
    """The seeded section of a stage (its ``"module:function"``), or ``None`` for a stage run once."""
    return SEEDED_MODULES.get(target.partition(":")[0])


@dataclass
class DemoSectionConfig(Settings):
    """One cell of the demo's sweep: the stages of one section, with one seed."""

    section: str = setting("prompt_tuning", help="prompt_tuning or test_time")
    stages: list[str] = setting(default_factory=list, help="the section's stages to run (unset: all)")
    seed: int = setting(1, help="the seed of every stage")
    output: str | None = setting(None, help="the run folder")
    overwrite: bool = setting(False, help="replace the run the folder holds")
    progress: bool = setting(False, help="progress messages", negative="--quiet")

    def validate(self) -> DemoSectionConfig:
        check_choice("section", self.section, sorted(set(SEEDED_MODULES.values())))
        check_int("seed", self.seed, minimum=0)
        return self

    def selected(self) -> list[tuple[str, str]]:
        from fastcal.runs.demo import STAGES

        return [
            (name, target)
            for name, target in STAGES
            if section_of(target) == self.section and (not self.stages or name in self.stages)
        ]


def run_demo_section(config: DemoSectionConfig) -> dict[str, Any]:
    """Run the section's stages with ``config.seed`` into the run folder ``config.output`` (its
    results.json holds the rows)."""
    from fastcal.runs.demo import DemoContext, run_stages
    from fastcal.runs.folder import RunFolder

    if config.output is None:
        raise fail("output", "a run folder", "none")
    with RunFolder.open(config.output, kind="demo_section", overwrite=config.overwrite) as folder:
        folder.write_manifest({"config": config.to_dict()})
        ctx = DemoContext.on_testbed(folder.path, progress=config.progress)
        ctx.seed = config.seed
        return run_stages(ctx, config.selected())


def _row_metrics(results: dict[str, Any]) -> tuple[dict[str, float], int]:
    metrics = {}
    for row in results["rows"]:
        for group, report in row["metrics"].items():
            metrics[f"{row['method']}: {group} acc"] = float(report["accuracy"])
            metrics[f"{row['method']}: {group} ECE"] = float(report["ece"])
    return metrics, int(results["n_bins"])


COMMAND = RunCommand(
    "demo_section",
    "fastcal.runs.demo.seeds:DemoSectionConfig",
    "fastcal.runs.demo.seeds:run_demo_section",
    _row_metrics,
    (),
)


def _spread(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def aggregate_rows(runs: list[list[dict[str, Any]]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The rows of several seeds' runs (each a list of rows, in the same order) as one row per method:
    mean accuracy and ECE per group, their spread, the marks against ``IMPROVES_ON`` (module docstring),
    and the mean and spread of the new classes' ECE after TS and after DAC where the rows have them."""
    rows: list[dict[str, Any]] = []
    for seeded in zip(*runs, strict=True):
        first = seeded[0]
        if not first["metrics"]:  # a stage that did not run (says why in its notes)
            rows.append(dict(first))
            continue
        metrics, spread = {}, {}
        for group, report in first["metrics"].items():
            values = {key: [r["metrics"][group][key] for r in seeded] for key in ("accuracy", "ece")}
            metrics[group] = {**report, **{k: sum(v) / len(v) for k, v in values.items()}}
            spread[group] = {k: _spread(v) for k, v in values.items()}
        notes = {
            "seeds": list(seeds),
            "spread": spread,
            "per_seed": [
                {g: {k: r["metrics"][g][k] for k in ("accuracy", "ece")} for g in r["metrics"]}
                for r in seeded
            ],
        }
        after = [r["notes"]["new_ece_after"] for r in seeded if "new_ece_after" in r.get("notes", {})]
        if len(after) == len(seeded):
            values = {key: [a[key] for a in after] for key in ("ts", "dac")}
            values = {k: v for k, v in values.items() if None not in v}  # skipped (the notes say why)
            notes["new_ece_after"] = {
                **after[0],
                **{k: sum(v) / len(v) for k, v in values.items()},
                "spread": {k: _spread(v) for k, v in values.items()},
            }
        labels = {key: first[key] for key in ("stage", "section", "method")}
        rows.append({**labels, "metrics": metrics, "notes": notes})
    if len(seeds) < 2:  # one seed has no spread to tell noise by
        return rows
    by_label = {(row["section"], row["method"]): row for row in rows}
    for row in rows:
        base = by_label.get((row["section"], IMPROVES_ON.get(row["method"], "")))
        if base is None or not row["metrics"] or not base["metrics"]:
            continue
        marks = {}
        for group, report in row["metrics"].items():
            if group not in base["metrics"]:
                continue
            for key in ("accuracy", "ece"):
                delta = report[key] - base["metrics"][group][key]
                noise = row["notes"]["spread"][group][key] + base["notes"]["spread"][group][key]
                if abs(delta) > noise:
                    marks.setdefault(group, {})[key] = delta
        row["notes"]["improves_on"] = base["method"]
        row["notes"]["marks"] = marks
    return rows


def _cache_warmers(stages: list[tuple[str, str]]) -> dict[str, Any]:
    """``{section: warm_caches}`` of the seeded sections among ``stages`` whose module defines
    ``warm_caches(cache_dir, stage_names)``: what fills the caches their cells share."""
    warmers = {}
    for _, target in stages:
        module = target.partition(":")[0]
        warm = (
            getattr(importlib.import_module(module), "warm_caches", None)
            if module in SEEDED_MODULES
            else None
        )
        if warm is not None:
            warmers[SEEDED_MODULES[module]] = warm
    return warmers


def start_warming(stages: list[tuple[str, str]], cache_dir: Path) -> multiprocessing.Process | None:
    """Start the seeded sections' ``warm_caches`` in a forked process (a thread would hold the
    interpreter lock this process needs), so that one process computes the caches the cells share while
    this one pretrains the testbed CLIP and runs the other stages; the caches' file locks make the cells
    wait for it rather than repeat it. A failure there is left to the cells, which then compute what is
    missing and report it. ``None`` when no section has caches to warm."""
    warmers = _cache_warmers(stages)
    if not warmers:
        return None
    names = [name for name, _ in stages]
    process = multiprocessing.get_context("fork").Process(
        target=_warm, args=(list(warmers.values()), cache_dir, names), daemon=True
    )
    process.start()
    return process


def _warm(warmers: list[Any], cache_dir: Path, stage_names: list[str]) -> None:
    for warm in warmers:
        warm(cache_dir, stage_names)


def run_seeded(
    ctx: Any,
    stages: list[tuple[str, str]],
    seeds: Sequence[int],
    alongside: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the seeded ``stages`` for every seed as a sweep under ``ctx.output/seeds`` and return their
    aggregated rows, in stage order. While the cells run, this process runs ``alongside`` (the demo's
    other stages); an error there is raised once the sweep is over. The cells of sections with caches to
    warm (``start_warming``) start last."""
    from fastcal.runs.sweep import Launcher, run_sweep
    from fastcal.runs.sweep.cell import DONE, RUN
    from fastcal.runs.sweep.grid import grid_from_dict

    sections = list(dict.fromkeys(section_of(target) for _, target in stages))
    warmers = _cache_warmers(stages)
    grid = grid_from_dict(
        {
            "command": "demo_section",
            "fixed": {"stages": [name for name, _ in stages]},
            "axes": {
                "section": sorted(sections, key=lambda section: section in warmers),
                "seed": list(seeds),
            },
        },
        "demo",
    )
    folder = Path(ctx.output) / "seeds"
    errors: list[BaseException] = []

    def in_this_process() -> None:
        try:
            if alongside is not None:
                alongside()
        except BaseException as error:  # raised in the caller's thread after the sweep
            errors.append(error)

    beside = threading.Thread(target=in_this_process, daemon=True)
    beside.start()
    states = run_sweep(grid, folder, Launcher(max_parallel=MAX_PARALLEL), log=ctx.log, poll_seconds=0.2)
    beside.join()
    if errors:
        raise errors[0]
    failed = {name: state.detail for name, state in states.items() if state.state != DONE}
    if failed:
        name, detail = next(iter(failed.items()))
        raise RuntimeError(f"demo: the seeded cell {name} did not finish: {detail or 'see its logs/'}")
    import json

    rows: list[dict[str, Any]] = []
    for section in sections:
        runs = [
            json.loads((folder / cell.name / RUN / "results.json").read_text())["rows"]
            for cell in grid.cells()
            if cell.values["section"] == section
        ]
        rows.extend(aggregate_rows(runs, seeds))
    return rows
