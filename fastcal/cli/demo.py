"""Every method on the embedded testbed, one table: fastcal's main job, offline and on a CPU.

With no argument it pretrains the testbed CLIP once (cached; seconds), then runs each stage on
the digits testbed (base classes 0-4, new classes 5-9, each evaluated among its own classes) and
writes to --output: results.json (every row with its full calibration reports, 15-bin ECE), one
reliability diagram (PNG) per row and class group, and prints the table with the total runtime.

Stages (--only NAME[,NAME] runs a selection; --list names them):
  zeroshot   zero-shot CLIP (hard prompt, prompt ensemble), temperature scaling fitted on 50
             base-class validation images applied to base and new
  coop, coop_calibrated, coop_dor, kgcoop, cocoop, maple, vpt
             prompt tuning on 16 shots of the base classes (CoOp with CE, with seed 000's
             calibrated loss and with DOR's WordNet outliers, KgCoOp, CoCoOp, MaPLe, VPT; short testbed
             schedules), tested on base and new

A stage is a function ``stage(ctx) -> list[row]`` named in ``STAGES`` as ("name", "module:function");
a method adds one line there. ``ctx`` is a ``DemoContext``; a row is a dict
``{"section": str, "method": str, "metrics": {group: calibration_report}, "notes": {...}}``: rows are
printed by section, each section with the columns of its groups (accuracy and ECE in percent per
group, and HM, the harmonic mean of base and new accuracy, where a section has both).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fastcal.cli import UsageError

# (name, "module:function"), run in this order.
STAGES: list[tuple[str, str]] = [
    ("zeroshot", "fastcal.methods.zeroshot:demo_stage"),
    ("coop", "fastcal.train.demo:coop_stage"),
    ("coop_calibrated", "fastcal.train.demo:coop_calibrated_stage"),
    ("coop_dor", "fastcal.train.demo:coop_dor_stage"),
    ("kgcoop", "fastcal.train.demo:kgcoop_stage"),
    ("cocoop", "fastcal.train.demo:cocoop_stage"),
    ("maple", "fastcal.train.demo:maple_stage"),
    ("vpt", "fastcal.train.demo:vpt_stage"),
    ("tpt", "fastcal.tpt.demo:demo_stage"),
    ("finetune", "fastcal.finetune.demo:demo_stage"),
]

DEFAULT_OUTPUT = "fastcal-results"
N_BINS = 15
CALIBRATION_SIZE = 50
SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, metavar="DIR", help=f"results folder (default ./{DEFAULT_OUTPUT})"
    )
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these stages (see --list)")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="write over a folder that holds another command's run"
    )


@dataclass
class DemoContext:
    """What a stage gets: the testbed, its data and the run's settings, plus a figure writer.

    Attributes:
        output: the results folder.
        n_bins: ECE bins (15).
        calibration_size: images in a temperature-scaling calibration set (50).
        seed: the run's seed.
        progress: show progress bars.
        cache_dir: fastcal's cache root (``default_cache_dir()``); the testbed weights live in
            ``cache_dir/testbed``, frozen features in ``cache_dir/features`` (``feature_cache_dir``).
        clip: the pretrained testbed (``LoadedClip``), loaded (pretrained the first time) on first use.
        splits: the digits ``DatasetSplits`` (train / val / test, classes "zero".."nine").
    """

    output: Path
    n_bins: int = N_BINS
    calibration_size: int = CALIBRATION_SIZE
    seed: int = SEED
    progress: bool = True
    cache_dir: Path | None = None
    figures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cache_dir is None:
            from fastcal._io import default_cache_dir

            self.cache_dir = default_cache_dir()

    @property
    def feature_cache_dir(self) -> Path:
        return Path(self.cache_dir) / "features"

    @cached_property
    def clip(self) -> Any:
        from fastcal.models.testbed import load_testbed_clip

        return load_testbed_clip(cache_dir=Path(self.cache_dir) / "testbed", progress=self.progress)

    @cached_property
    def splits(self) -> Any:
        from fastcal.data.testbed import digits_splits

        return digits_splits(self.seed)

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


def select_stages(only: str | None) -> list[tuple[str, str]]:
    """The registry entries named in ``only`` (comma-separated), in registry order; all if ``None``."""
    if only is None:
        return list(STAGES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [name for name, _ in STAGES]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise UsageError(
            f"--only: expected stage names among {', '.join(known)}, got {only!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [(name, target) for name, target in STAGES if name in names]


def resolve(target: str) -> Any:
    """The function named by ``"module:function"``."""
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def check_row(stage: str, row: Any) -> dict[str, Any]:
    """A stage's row, checked, with ``stage`` and (for base and new groups) ``hm_accuracy`` added."""
    ok = (
        isinstance(row, dict)
        and isinstance(row.get("section"), str)
        and isinstance(row.get("method"), str)
        and isinstance(row.get("metrics"), dict)
        and all(isinstance(r, dict) and "accuracy" in r and "ece" in r for r in row["metrics"].values())
    )
    if not ok:
        raise TypeError(
            f"stage {stage}: expected rows {{'section': str, 'method': str, 'metrics': {{group: report}}}}, "
            f"got {row!r:.200}"
        )
    row = {"stage": stage, **row}
    metrics = row["metrics"]
    if "base" in metrics and "new" in metrics:
        row["hm_accuracy"] = harmonic_mean(metrics["base"]["accuracy"], metrics["new"]["accuracy"])
    return row


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows grouped by section; per section: method, then accuracy and ECE (%) per group, and HM."""
    sections: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        sections.setdefault(row["section"], []).append(row)
    blocks = []
    for section, section_rows in sections.items():
        groups: list[str] = []
        for row in section_rows:
            groups.extend(g for g in row["metrics"] if g not in groups)
        with_hm = "base" in groups and "new" in groups
        header = ["method", *(f"{g} {m}" for g in groups for m in ("acc", "ECE"))] + ["HM"] * with_hm
        table = [header]
        for row in section_rows:
            label = row["method"]
            temperature = row.get("notes", {}).get("temperature")
            if temperature is not None:
                label += f" (T={temperature:.2f})"
            cells = [label]
            for g in groups:
                report = row["metrics"].get(g, {})
                cells += [_percent(report.get("accuracy")), _percent(report.get("ece"))]
            table.append(cells + [_percent(row.get("hm_accuracy"))] * with_hm)
        widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
        lines = [
            "  ".join(
                [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            )
            for cells in table
        ]
        blocks.append("\n".join([f"== {section} ==", lines[0], "-" * len(lines[0]), *lines[1:]]))
    return "\n\n".join(blocks)


def run_stages(ctx: DemoContext, stages: list[tuple[str, str]]) -> dict[str, Any]:
    """Run ``stages``; after each, rewrite ``results.json`` (atomically) with everything so far."""
    from dataclasses import asdict

    import fastcal
    from fastcal._io import write_json_atomic
    from fastcal.models.testbed import TESTBED_MODEL, PretrainRecipe

    start = time.perf_counter()
    results: dict[str, Any] = {
        "fastcal_version": fastcal.__version__,
        "testbed": {"model": TESTBED_MODEL, "recipe": asdict(PretrainRecipe())},
        "n_bins": ctx.n_bins,
        "calibration_size": ctx.calibration_size,
        "seed": ctx.seed,
        "stages": {},
        "rows": [],
    }
    for name, target in stages:
        stage = resolve(target)
        ctx.log(f"fastcal demo: stage {name}")
        stage_start = time.perf_counter()
        rows = [check_row(name, row) for row in stage(ctx)]
        results["stages"][name] = {"seconds": time.perf_counter() - stage_start, "rows": len(rows)}
        results["rows"].extend(rows)
        results["total_seconds"] = time.perf_counter() - start
        write_json_atomic(ctx.output / "results.json", results)
    return results


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, target in STAGES:
            print(f"{name}\t{target}")
        return 0
    from fastcal.runs.folder import RunFolder

    stages = select_stages(args.only)
    # the demo replaces its own earlier results; a folder holding another command's run is refused
    with RunFolder.open(args.output, kind="demo", overwrite=args.overwrite, replace_own=True) as folder:
        folder.write_manifest({"stages": [name for name, _ in stages]})
        ctx = DemoContext(output=folder.path, progress=not args.quiet)
        results = run_stages(ctx, stages)
    output = folder.path
    print(format_table(results["rows"]))
    print(
        f"\n{len(results['rows'])} rows, {len(ctx.figures)} reliability diagrams, results in "
        f"{output / 'results.json'}; total {results['total_seconds']:.1f} s"
    )
    return 0
