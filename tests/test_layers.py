"""The package's layers import only downwards: the library (``fastcal.ops`` ... ``fastcal.finetune``)
never imports the runs layer, the commands or the demo, and each library layer only the layers below
it. Every import counts, at module level or inside a function, and so does a module named in a string to
``importlib.import_module``."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastcal"

# From the bottom up; a module may import from its own layer and the layers below it.
LAYERS = [
    ("fastcal", "fastcal._checks", "fastcal._io", "fastcal._seeds", "fastcal.registry"),
    ("fastcal_kernels", "fastcal_csrc"),
    ("fastcal.ops",),
    ("fastcal.losses", "fastcal.metrics", "fastcal.calibrate"),
    ("fastcal.models", "fastcal.data"),
    ("fastcal.methods", "fastcal.outliers", "fastcal.tpt", "fastcal.finetune"),
    ("fastcal.runs",),
    ("fastcal.cli", "fastcal.__main__"),
]


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or (p != "fastcal" and module.startswith(p + ".")) for p in prefixes):
            return index
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every fastcal module the file imports: import statements anywhere, and import_module strings."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == (
            "import_module"
        ):
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.add(argument.value)
    return {name for name in found if name.startswith("fastcal")}


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_go_only_down_the_layers(path):
    own = layer_of(module_name(path))
    assert own is not None, f"{module_name(path)} belongs to no layer of this test"
    upward = sorted(m for m in imported_modules(path) if (layer_of(m) or 0) > own)
    assert not upward, f"{module_name(path)} (layer {own}) imports from higher layers: {upward}"


def test_every_layer_is_checked():
    counts = [sum(layer_of(module_name(p)) == i for p in FILES) for i in range(len(LAYERS))]
    assert all(counts[2:]), counts  # every layer above the base holds modules the test reads
