"""fastcal.runs.sweep.grid: a grid file is checked whole before any cell starts, every problem one line
naming the file and the key; cells are the product of the axes, named stably by their values."""

import pytest

from fastcal.cli import main
from fastcal.runs.sweep.grid import cell_name, load_grid

GOOD = """
command: train
fixed: {shots: 2, epochs: 1}
axes:
  method: [coop, kgcoop]
  loss: [ce, calibrated]
  seed: [1, 2]
"""


def write(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cells_are_the_product_of_the_axes_with_stable_names(tmp_path):
    grid = load_grid(write(tmp_path, GOOD))
    cells = grid.cells()
    assert len(cells) == 8
    assert cells[0].name == "method=coop,loss=ce,seed=1"
    assert cells[-1].name == "method=kgcoop,loss=calibrated,seed=2"
    assert cells[5].options == {"shots": 2, "epochs": 1, "method": "kgcoop", "loss": "ce", "seed": 2}
    assert [c.name for c in load_grid(write(tmp_path, GOOD, "again.yaml")).cells()] == [c.name for c in cells]
    excluded = load_grid(write(tmp_path, GOOD + "exclude: [{method: kgcoop, loss: ce}]\n", "ex.yaml"))
    assert len(excluded.cells()) == 6
    assert all(not (c.values["method"] == "kgcoop" and c.values["loss"] == "ce") for c in excluded.cells())


def test_cell_names_of_lists_paths_and_empty_values():
    assert cell_name({"regularizers": [], "seed": 1}) == "regularizers=none,seed=1"
    assert cell_name({"regularizers": ["dor", "kgcoop"]}) == "regularizers=dor+kgcoop"
    assert cell_name({"pretrained": "/w/a b.pt"}) == "pretrained=-w-a-b.pt"
    assert cell_name({}) == "run"  # a grid without axes: one cell


def test_environment_variables_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_DATA", str(tmp_path))
    text = "command: train\nfixed:\n  dataset: dtd\n  root: ${SWEEP_DATA}\naxes: {seed: [1]}\n"
    assert load_grid(write(tmp_path, text)).cells()[0].options["root"] == str(tmp_path)


BAD = [
    (
        "command: trian\naxes: {seed: [1]}\n",
        "grid.yaml: command: expected one of train, tpt, finetune, zeroshot",
    ),
    ("command: train\naxes: {methd: [coop]}\n", "grid.yaml: axes.methd: expected an option of train: "),
    (
        "command: train\nfixed: {learning_rate: 0.1}\n",
        "grid.yaml: fixed.learning_rate: expected an option of",
    ),
    (
        "command: train\naxes: {method: []}\n",
        "grid.yaml: axes.method: expected a non-empty list of values, got []",
    ),
    ("command: train\naxes: {method: coop}\n", "grid.yaml: axes.method: expected a non-empty list"),
    (
        "command: train\nfixed: {dataset: dtd, root: /no/such/data}\naxes: {seed: [1]}\n",
        "grid.yaml: cell seed=1: root: expected an existing dataset folder, got /no/such/data",
    ),
    (
        "command: train\naxes: {method: [coop, nosuch]}\n",
        "grid.yaml: cell method=nosuch: method: expected one of",
    ),
    ("command: train\nfixed: {lr: fast}\n", "grid.yaml: cell run: lr: expected a number, got 'fast'"),
    (
        "command: train\nfixed: {output: x}\n",
        "grid.yaml: fixed.output: expected an option the sweep does not set",
    ),
    ("command: train\nfixd: {shots: 2}\n", "grid.yaml: fixd: expected one of the keys command, fixed, axes"),
    (
        "command: train\naxes: {seed: [1]}\nexclude: [{loss: ce}]\n",
        "grid.yaml: exclude: expected axes of the grid",
    ),
    ("- train\n", "GRID: expected a YAML mapping of settings"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_grid_is_one_line_and_no_cell_starts(tmp_path, capsys, text, message):
    out = tmp_path / "sweep"
    assert main(["sweep", str(write(tmp_path, text)), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcal sweep: error: ") and message in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_a_missing_grid_file_and_an_unknown_preset(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "GRID: expected a YAML file" in capsys.readouterr().err
    assert main(["sweep", "no_such_preset", "--output", str(tmp_path / "o")]) == 2
    assert "GRID: expected a grid YAML file or a preset: carot_imagenet" in capsys.readouterr().err
