"""A sweep's grid: the command, its fixed options and the axes whose product are the cells.

The YAML a user writes::

    command: train                              # a registered run_command: train, tpt, finetune, zeroshot
    fixed: {shots: 16, protocol: base2new}      # any option of the command (no dataset: the testbed)
    axes:                                       # any option of the command; the product is the grid
      method: [coop, kgcoop]
      loss: [ce, calibrated]
      seed: [1, 2, 3]
    exclude: [{method: coop, loss: calibrated}]  # optional: combinations left out of the product

``$VAR`` and ``${VAR}`` in string values are replaced by the environment's values (``root:
${FASTCAL_DATA}``). ``load_grid`` checks everything before any cell starts: the keys, the command,
every axis and fixed key against the command's settings, every axis non-empty, every cell's settings
(types and choices, as the command would), and every dataset root on disk. A cell's folder name is its
axis values in the grid's axis order (``method=coop,loss=ce,seed=1``), so a rerun of the same grid finds
its cells.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcal import registry
from fastcal._checks import fail
from fastcal.runs.options import load_yaml
from fastcal.runs.sweep.commands import RunCommand

GRID_KEYS = ("command", "fixed", "axes", "exclude", "description")
# Options the sweep sets for every cell itself.
SWEEP_OWNED = ("output", "resume", "overwrite", "config")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder ``name``, its axis ``values`` and its full ``options``."""

    name: str
    values: dict[str, Any]
    options: dict[str, Any]


@dataclass(frozen=True)
class Grid:
    """A checked grid (module docstring)."""

    command: str
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]
    exclude: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""

    @property
    def spec(self) -> RunCommand:
        return registry.get("run_command", self.command, argument="command")

    def cells(self) -> list[Cell]:
        names = list(self.axes)
        cells = []
        for combination in itertools.product(*self.axes.values()):
            values = dict(zip(names, combination, strict=True))
            if any(all(values[k] == v for k, v in rule.items()) for rule in self.exclude):
                continue
            cells.append(Cell(cell_name(values), values, {**self.fixed, **values}))
        return cells

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "fixed": self.fixed,
            "axes": self.axes,
            "exclude": self.exclude,
            "description": self.description,
        }


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_text(v) for v in value) or "none"
    if isinstance(value, dict):
        return "+".join(f"{k}-{_text(v)}" for k, v in value.items()) or "none"
    return str(value)


def cell_name(values: dict[str, Any]) -> str:
    """The folder name of the cell with these axis values: ``axis=value`` joined by commas, characters a
    folder name should not hold replaced by ``-``; ``run`` for a grid without axes."""
    name = ",".join(f"{axis}={_text(value)}" for axis, value in values.items())
    return _UNSAFE.sub("-", name) or "run"


def grid_from_dict(data: Any, where: str) -> Grid:
    """A ``Grid`` from the YAML mapping ``data``; errors start with ``where`` (the file)."""
    if not isinstance(data, dict):
        raise fail(where, "a mapping with command, fixed and axes", type(data).__name__)
    unknown = [k for k in data if k not in GRID_KEYS]
    if unknown:
        raise fail(f"{where}: {unknown[0]}", "one of the keys " + ", ".join(GRID_KEYS), repr(unknown[0]))
    command = data.get("command")
    if command not in registry.names("run_command"):
        raise fail(f"{where}: command", "one of " + ", ".join(registry.names("run_command")), repr(command))
    spec: RunCommand = registry.get("run_command", command)
    known = spec.settings_class().field_names()

    def option_name(section: str, key: Any) -> str:
        name = str(key).replace("-", "_")
        if name in SWEEP_OWNED:
            raise fail(f"{where}: {section}.{key}", "an option the sweep does not set itself", repr(key))
        if name not in known:
            options = ", ".join(sorted(set(known) - set(SWEEP_OWNED)))
            raise fail(f"{where}: {section}.{key}", f"an option of {command}: {options}", repr(key))
        return name

    fixed_in, axes_in = data.get("fixed") or {}, data.get("axes") or {}
    if not isinstance(fixed_in, dict):
        raise fail(f"{where}: fixed", "a mapping of options", type(fixed_in).__name__)
    if not isinstance(axes_in, dict):
        raise fail(f"{where}: axes", "a mapping of options to lists of values", type(axes_in).__name__)
    fixed = {option_name("fixed", k): _expand(v) for k, v in fixed_in.items()}
    axes: dict[str, list[Any]] = {}
    for key, values in axes_in.items():
        name = option_name("axes", key)
        if name in fixed:
            raise fail(f"{where}: axes.{key}", "an option not also in fixed", repr(key))
        if not isinstance(values, list) or not values:
            raise fail(f"{where}: axes.{key}", "a non-empty list of values", repr(values))
        axes[name] = [_expand(v) for v in values]
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(r, dict) and r for r in exclude):
        raise fail(f"{where}: exclude", "a list of mappings of axis values", repr(exclude))
    for rule in exclude:
        for key in rule:
            if str(key).replace("-", "_") not in axes:
                raise fail(f"{where}: exclude", "axes of the grid: " + ", ".join(axes), repr(key))
    exclude = [{str(k).replace("-", "_"): _expand(v) for k, v in rule.items()} for rule in exclude]
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail(f"{where}: description", "a string", type(description).__name__)
    grid = Grid(command, fixed, axes, exclude, description)
    check_cells(grid, where)
    return grid


def check_cells(grid: Grid, where: str) -> None:
    """Every cell's settings built as the command builds them, every dataset root an existing folder,
    and no two cells sharing a folder name."""
    settings_class = grid.spec.settings_class()
    seen: dict[str, dict[str, Any]] = {}
    for cell in grid.cells():
        try:
            settings = settings_class.from_dict(cell.options)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: cell {cell.name}: {error}") from None
        root = getattr(settings, "root", None)
        if root is not None and not Path(root).expanduser().is_dir():
            raise fail(f"{where}: cell {cell.name}: root", "an existing dataset folder", root)
        if cell.name in seen:
            raise fail(f"{where}: axes", "values that name distinct cells", f"two cells named {cell.name}")
        seen[cell.name] = cell.values


def load_grid(path: str | Path) -> Grid:
    """The checked grid in the YAML file ``path`` (module docstring)."""
    path = Path(path)
    return grid_from_dict(load_yaml(path, argument="GRID"), path.name)
