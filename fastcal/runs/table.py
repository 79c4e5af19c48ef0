"""A sweep's results as the papers lay them out: one row per combination of the grid's axes other than
``seed`` and ``dataset`` (method x loss, ...), one column group per dataset plus their average, each
value the mean and standard deviation over the seeds that finished.

Every number is a fraction in the results and percent here. The standard deviation is the sample one
(n - 1); a value over fewer seeds than the grid has is marked ``(k/N)``, one over none is ``missing``:
nothing is averaged over silently. The average column takes, for each seed finished on every dataset,
the mean over the datasets, then the mean and spread of those; a seed missing on one dataset is
missing from the average.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcal.runs.sweep.cell import DONE, RUN, cell_state
from fastcal.runs.sweep.launch import read_grid

FORMATS = ("md", "csv", "latex")
AVERAGE = "Average"
TESTBED = "testbed"
GROUP_AXES = ("seed", "dataset")


@dataclass(frozen=True)
class Stat:
    """A value over seeds: mean, sample standard deviation (None below 2 seeds), seeds present and
    expected. Fractions."""

    mean: float | None
    std: float | None
    n: int
    expected: int

    @classmethod
    def of(cls, values: list[float], expected: int) -> Stat:
        n = len(values)
        if n == 0:
            return cls(None, None, 0, expected)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
        return cls(mean, std, n, expected)

    def text(self, pm: str = "±") -> str:
        if self.mean is None:
            return "missing"
        text = f"{100 * self.mean:.2f}"
        if self.std is not None:
            text += f" {pm} {100 * self.std:.2f}"
        if self.n < self.expected:
            text += f" ({self.n}/{self.expected})"
        return text


@dataclass
class Table:
    """Aggregated cells: ``values[row][group][metric]`` with rows labelled by ``row_axes``."""

    command: str
    row_axes: list[str]
    groups: list[str]
    metrics: list[str]
    seeds: list[Any]
    bins: list[int]
    values: dict[tuple, dict[str, dict[str, Stat]]] = field(default_factory=dict)
    pairs: tuple[tuple[str, str], ...] = ()

    def footer(self) -> str:
        bins = " or ".join(str(b) for b in self.bins) or "?"
        seeds = ", ".join(str(s) for s in self.seeds) if self.seeds else "one run"
        lines = [
            f"Percent; mean ± sample standard deviation over seeds ({seeds}); (k/N): only k of N seeds "
            "finished; missing: none finished.",
            f"ECE: {bins} equal-width bins over the top-label confidence.",
        ]
        if "HM" in self.metrics:
            lines.append("HM: harmonic mean of base and new accuracy; HM ECE: of base and new ECE.")
        if AVERAGE in self.groups:
            lines.append("Average: the mean over the datasets for each seed finished on all of them.")
        return " ".join(lines)


def _dataset_groups(grid: Any) -> list[str]:
    if "dataset" in grid.axes:
        return [str(d or TESTBED) for d in grid.axes["dataset"]]
    return [str(grid.fixed.get("dataset") or TESTBED)]


def collect(output: str | os.PathLike) -> tuple[Any, list[tuple[Any, dict[str, float] | None, int]]]:
    """The grid of the sweep in ``output`` and, per cell, ``(cell, metrics or None, ECE bins)``: metrics
    of finished cells only."""
    path = Path(output)
    grid = read_grid(path)
    spec = grid.spec
    found = []
    for cell in grid.cells():
        folder = path / cell.name
        if cell_state(folder).state == DONE:
            metrics, bins = spec.metrics(json.loads((folder / RUN / "results.json").read_text()))
            found.append((cell, metrics, bins))
        else:
            found.append((cell, None, 0))
    return grid, found


def build_table(output: str | os.PathLike) -> Table:
    """Aggregate the sweep in ``output`` (module docstring)."""
    grid, found = collect(output)
    row_axes = [a for a in grid.axes if a not in GROUP_AXES]
    datasets = _dataset_groups(grid)
    metrics: list[str] = []
    for _, values, _ in found:
        for name in values or {}:
            if name not in metrics:
                metrics.append(name)
    if not metrics:
        metrics = [m for pair in grid.spec.pairs for m in pair]
    table = Table(
        command=grid.command,
        row_axes=row_axes,
        groups=datasets + ([AVERAGE] if len(datasets) > 1 else []),
        metrics=metrics,
        seeds=list(grid.axes.get("seed", [])),
        bins=sorted({b for _, values, b in found if values is not None}),
        pairs=grid.spec.pairs,
    )
    # per row: dataset -> seed -> metrics (None: not finished)
    runs: dict[tuple, dict[str, dict[Any, dict[str, float] | None]]] = {}
    for cell, values, _ in found:
        row = tuple(_hashable(cell.values[a]) for a in row_axes)
        dataset = str(cell.values["dataset"] or TESTBED) if "dataset" in cell.values else datasets[0]
        runs.setdefault(row, {}).setdefault(dataset, {})[cell.values.get("seed")] = values
    for row, by_dataset in runs.items():
        table.values[row] = {}
        for dataset, by_seed in by_dataset.items():
            done = [v for v in by_seed.values() if v is not None]
            table.values[row][dataset] = {
                m: Stat.of([v[m] for v in done if m in v], len(by_seed)) for m in metrics
            }
        if AVERAGE in table.groups:
            seeds = set.union(*(set(s) for s in by_dataset.values()))
            complete = [s for s in seeds if all(by_dataset.get(d, {}).get(s) is not None for d in datasets)]
            table.values[row][AVERAGE] = {
                m: Stat.of(
                    [sum(by_dataset[d][s][m] for d in datasets) / len(datasets) for s in complete], len(seeds)
                )
                for m in metrics
            }
    return table


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _label(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(str(v) for v in value) or "none"
    return str(value)


def _cells(table: Table, row: tuple) -> list[Stat]:
    missing = Stat(None, None, 0, 0)
    return [table.values[row].get(g, {}).get(m, missing) for g in table.groups for m in table.metrics]


def format_markdown(table: Table) -> str:
    header = [
        *(table.row_axes or [table.command]),
        *(f"{g} {m}" for g in table.groups for m in table.metrics),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.values:
        labels = [_label(v) for v in row] or [table.command]
        lines.append("| " + " | ".join(labels + [s.text() for s in _cells(table, row)]) + " |")
    return "\n".join(lines) + "\n\n" + table.footer() + "\n"


def format_csv(table: Table) -> str:
    """One line per row, group and metric (percent): the axes, group, metric, mean, std, n, expected."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*table.row_axes, "group", "metric", "mean", "std", "n", "expected"])
    for row, groups in table.values.items():
        for group in table.groups:
            for metric in table.metrics:
                stat = groups.get(group, {}).get(metric, Stat(None, None, 0, 0))
                number = ["" if x is None else repr(100 * x) for x in (stat.mean, stat.std)]
                writer.writerow([*(_label(v) for v in row), group, metric, *number, stat.n, stat.expected])
    writer.writerow([f"# {table.footer()}"])
    return buffer.getvalue()


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def format_latex(table: Table) -> str:
    axes = table.row_axes or [table.command]
    width = len(table.metrics)
    lines = [
        r"\begin{tabular}{" + "l" * len(axes) + ("|" + "c" * width) * len(table.groups) + "}",
        r"\hline",
        " & " * (len(axes) - 1)
        + "".join(f" & \\multicolumn{{{width}}}{{c}}{{{_tex(g)}}}" for g in table.groups)
        + r" \\",
        " & ".join([*(_tex(a) for a in axes), *(_tex(m) for _ in table.groups for m in table.metrics)])
        + r" \\",
        r"\hline",
    ]
    for row in table.values:
        labels = [_tex(_label(v)) for v in row] or [table.command]
        values = [
            "$" + s.text(pm=r"\pm") + "$" if s.mean is not None else "missing" for s in _cells(table, row)
        ]
        lines.append(" & ".join(labels + values) + r" \\")
    lines += [r"\hline", r"\end{tabular}", "% " + _tex(table.footer())]
    return "\n".join(lines) + "\n"


def format_table(table: Table, fmt: str = "md") -> str:
    from fastcal._checks import check_choice

    check_choice("format", fmt, FORMATS)
    return {"md": format_markdown, "csv": format_csv, "latex": format_latex}[fmt](table)


def ece_accuracy_figure(table: Table, path: str | os.PathLike) -> Path:
    """ECE against accuracy, one point per row with its spread over seeds as error bars, one panel per
    (accuracy, ECE) pair of the command, on the last column group (the average, or the one dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    pairs = [p for p in table.pairs if p[0] in table.metrics and p[1] in table.metrics]
    group = table.groups[-1]
    figure = Figure(figsize=(4.5 * max(1, len(pairs)), 4), layout="constrained")
    axes = figure.subplots(1, max(1, len(pairs)), squeeze=False)[0]
    for ax, (accuracy, ece) in zip(axes, pairs, strict=False):
        for row, groups in table.values.items():
            x, y = groups.get(group, {}).get(accuracy), groups.get(group, {}).get(ece)
            if x is None or y is None or x.mean is None or y.mean is None:
                continue
            ax.errorbar(
                100 * x.mean,
                100 * y.mean,
                xerr=100 * (x.std or 0.0),
                yerr=100 * (y.std or 0.0),
                fmt="o",
                capsize=3,
                label=" / ".join(_label(v) for v in row) or table.command,
            )
        ax.set_xlabel(f"{accuracy} (%)")
        ax.set_ylabel(f"{ece} (%, {' or '.join(map(str, table.bins))} bins)")
        ax.set_title(f"{group}: {ece} vs {accuracy}")
        ax.legend(fontsize="small")
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
