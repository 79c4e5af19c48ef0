"""``fastcal demo``: every method on the embedded testbed, one table; fastcal's main job, offline and on a
CPU.

The testbed CLIP is pretrained once (cached; seconds), then each stage runs on the digits testbed (base
classes 0-4, new classes 5-9, each evaluated among its own classes) and returns table rows
(``fastcal.runs.rows``). A stage is a function ``stage(ctx: DemoContext) -> list[Row]`` named in
``STAGES`` as ``("name", "module:function")``; a method adds one line there. The demo's folder gets
results.json (every row with its full calibration reports, 15-bin ECE), one reliability diagram (PNG)
per row and class group, and the stages' run folders.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcal._checks import fail
from fastcal.data.items import DatasetSplits
from fastcal.models.clip import LoadedClip
from fastcal.runs.rows import Row, check_row

# (name, "module:function"), run in this order.
STAGES: list[tuple[str, str]] = [
    ("zeroshot", "fastcal.runs.demo.zeroshot:zeroshot_stage"),
    ("coop", "fastcal.runs.demo.prompt_tuning:coop_stage"),
    ("coop_calibrated", "fastcal.runs.demo.prompt_tuning:coop_calibrated_stage"),
    ("coop_dor", "fastcal.runs.demo.prompt_tuning:coop_dor_stage"),
    ("kgcoop", "fastcal.runs.demo.prompt_tuning:kgcoop_stage"),
    ("kgcoop_dor", "fastcal.runs.demo.prompt_tuning:kgcoop_dor_stage"),
    ("cocoop", "fastcal.runs.demo.prompt_tuning:cocoop_stage"),
    ("prograd", "fastcal.runs.demo.prompt_tuning:prograd_stage"),
    ("prograd_calibrated", "fastcal.runs.demo.prompt_tuning:prograd_calibrated_stage"),
    ("tcp", "fastcal.runs.demo.prompt_tuning:tcp_stage"),
    ("tcp_dor", "fastcal.runs.demo.prompt_tuning:tcp_dor_stage"),
    ("proda", "fastcal.runs.demo.prompt_tuning:proda_stage"),
    ("maple", "fastcal.runs.demo.prompt_tuning:maple_stage"),
    ("maple_dor", "fastcal.runs.demo.prompt_tuning:maple_dor_stage"),
    ("promptsrc", "fastcal.runs.demo.prompt_tuning:promptsrc_stage"),
    ("vpt", "fastcal.runs.demo.prompt_tuning:vpt_stage"),
    ("vpt_dor", "fastcal.runs.demo.prompt_tuning:vpt_dor_stage"),
    ("tpt", "fastcal.runs.demo.test_time:test_time_stage"),
    ("finetune", "fastcal.runs.demo.finetuning:finetuning_stage"),
]

N_BINS = 15
CALIBRATION_SIZE = 50
SEED = 0


@dataclass
class DemoContext:
    """What a stage gets: the testbed, its data, the demo's settings and a figure writer.

    Attributes:
        output: the demo's folder.
        clip: the pretrained testbed CLIP (stages that change it work on a copy or make what they train
            trainable themselves).
        splits: the digits (train / val / test, classes "zero".."nine").
        cache_dir: fastcal's cache root; frozen features live in ``feature_cache_dir``.
        n_bins: ECE bins (15).
        calibration_size: images in a temperature-scaling calibration set (50).
        seed: the demo's seed.
        progress: show progress bars.
        figures: the diagrams written so far (paths relative to ``output``).
    """

    output: Path
    clip: LoadedClip
    splits: DatasetSplits
    cache_dir: Path
    n_bins: int = N_BINS
    calibration_size: int = CALIBRATION_SIZE
    seed: int = SEED
    progress: bool = True
    figures: list[str] = field(default_factory=list)

    @classmethod
    def on_testbed(cls, output: Path, *, progress: bool = True, cache_dir: Path | None = None) -> DemoContext:
        """The context of a demo run: the testbed CLIP from ``cache_dir/testbed`` (pretrained the first
        time) and the digits."""
        from fastcal._io import default_cache_dir
        from fastcal.data.testbed import digits_splits
        from fastcal.models.testbed import load_testbed_clip

        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        clip = load_testbed_clip(cache_dir=cache_dir / "testbed", progress=progress)
        return cls(output, clip, digits_splits(SEED), cache_dir, progress=progress)

    @property
    def feature_cache_dir(self) -> Path:
        return Path(self.cache_dir) / "features"

    def figure(self, stem: str, probs: Any, labels: Any, title: str) -> str:
        """Write the reliability diagram of ``probs`` as ``output/<stem>.png``; return the file name."""
        from fastcal.metrics import reliability_diagram

        name = f"{stem}.png"
        reliability_diagram(probs, labels, n_bins=self.n_bins, path=self.output / name, title=title)
        self.figures.append(name)
        return name

    def log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr)


Stage = Callable[[DemoContext], list[Row]]


def select_stages(only: str | None) -> list[tuple[str, str]]:
    """The registry entries named in ``only`` (comma-separated), in registry order; all if ``None``."""
    if only is None:
        return list(STAGES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [name for name, _ in STAGES]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        detail = f" (unknown: {', '.join(unknown)})" if unknown else ""
        raise fail("--only", f"stage names among {', '.join(known)}", f"{only!r}{detail}")
    return [(name, target) for name, target in STAGES if name in names]


def resolve(target: str) -> Stage:
    """The function named by ``"module:function"``."""
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def run_stages(
    ctx: DemoContext, stages: list[tuple[str, str]], seeds: Sequence[int] | None = None
) -> dict[str, Any]:
    """Run ``stages``; after each, rewrite ``results.json`` (atomically) with everything so far. With
    ``seeds``, the prompt-tuning and test-time stages run once per seed, as a sweep
    (``fastcal.runs.demo.seeds``), and the other stages run in this process meanwhile; the rows keep the
    order of ``stages``."""
    from dataclasses import asdict

    import fastcal
    from fastcal._io import write_json_atomic
    from fastcal.models.testbed import TESTBED_MODEL, PretrainRecipe
    from fastcal.runs.demo.seeds import section_of

    start = time.perf_counter()
    results: dict[str, Any] = {
        "fastcal_version": fastcal.__version__,
        "testbed": {"model": TESTBED_MODEL, "recipe": asdict(PretrainRecipe())},
        "n_bins": ctx.n_bins,
        "calibration_size": ctx.calibration_size,
        "seed": ctx.seed,
        "seeds": list(seeds or []),
        "stages": {},
        "rows": [],
    }
    seeded = [(name, target) for name, target in stages if seeds and section_of(target)]
    rows: dict[str, list[Row]] = {}
    lock = threading.Lock()

    def record(names: list[str], stage_rows: list[Row], seconds: float | None = None) -> None:
        with lock:
            if seconds is not None:
                results["stages"][names[0]] = {"seconds": seconds, "rows": len(stage_rows)}
            rows.update({name: [row for row in stage_rows if row["stage"] == name] for name in names})
            results["rows"] = [row for name, _ in stages for row in rows.get(name, [])]
            results["total_seconds"] = time.perf_counter() - start
            write_json_atomic(ctx.output / "results.json", results)

    def run_unseeded() -> None:
        for name, target in stages:
            if (name, target) in seeded:
                continue
            ctx.log(f"fastcal demo: stage {name}")
            stage_start = time.perf_counter()
            stage_rows = [check_row(name, row) for row in resolve(target)(ctx)]
            record([name], stage_rows, time.perf_counter() - stage_start)

    if not seeded:
        run_unseeded()
        return results
    ctx.log(f"fastcal demo: stages {', '.join(n for n, _ in seeded)}, seeds {list(seeds)}")
    stage_start = time.perf_counter()
    seeded_rows = _run_seeded(ctx, seeded, seeds, results, stage_start, alongside=run_unseeded)
    record([name for name, _ in seeded], seeded_rows)
    results["stages"] = {name: results["stages"][name] for name, _ in stages}
    write_json_atomic(ctx.output / "results.json", results)
    return results


def _run_seeded(
    ctx: DemoContext,
    stages: list[tuple[str, str]],
    seeds: Sequence[int],
    results: dict[str, Any],
    start: float,
    alongside: Callable[[], None],
) -> list[dict[str, Any]]:
    from fastcal.runs.demo.seeds import run_seeded

    rows = [check_row(row["stage"], row) for row in run_seeded(ctx, stages, seeds, alongside)]
    seconds = time.perf_counter() - start
    for name, _ in stages:
        count = sum(row["stage"] == name for row in rows)
        results["stages"][name] = {"seconds": seconds, "rows": count, "seeds": list(seeds), "sweep": True}
    return rows


def run_demo(
    output: str | Path,
    *,
    only: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    seeds: Sequence[int] | None = None,
) -> tuple[dict[str, Any], DemoContext]:
    """The demo into the folder ``output`` (it replaces its own earlier results; a folder holding another
    command's run needs ``overwrite``); the prompt-tuning and test-time stages run once per seed of
    ``seeds`` (default ``fastcal.runs.demo.seeds.SEEDS``) in other processes, while this one prepares
    their shared caches and runs the other stages with one torch thread. Returns the results and the
    context."""
    import torch

    from fastcal._io import default_cache_dir
    from fastcal.runs.demo.seeds import SEEDS, start_warming
    from fastcal.runs.folder import RunFolder, check_run_folder

    stages = select_stages(only)
    check_run_folder(output, kind="demo", overwrite=overwrite, replace_own=True)
    with RunFolder.open(output, kind="demo", overwrite=overwrite, replace_own=True) as folder:
        folder.write_manifest({"stages": [name for name, _ in stages]})
        seeds = SEEDS if seeds is None else seeds
        threads = torch.get_num_threads()
        if seeds:  # other processes share the cores from here on: one thread each, this one too
            torch.set_num_threads(1)
            start_warming(stages, default_cache_dir())
        try:
            ctx = DemoContext.on_testbed(folder.path, progress=progress)
            return run_stages(ctx, stages, seeds), ctx
        finally:
            torch.set_num_threads(threads)
