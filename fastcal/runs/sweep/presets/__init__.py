"""The papers' grids, as the YAML a user would write (``fastcal sweep --presets`` lists them)."""

from __future__ import annotations

from pathlib import Path

from fastcal._checks import fail

FOLDER = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def resolve_grid(grid: str) -> Path:
    """``grid`` as a file: a path that exists, else the preset of that name."""
    path = Path(grid).expanduser()
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    if grid in preset_names():
        return FOLDER / f"{grid}.yaml"
    raise fail("GRID", "a grid YAML file or a preset: " + ", ".join(preset_names()), repr(grid))
