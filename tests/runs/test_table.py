"""fastcal.runs.table: a sweep's cells aggregated as the papers' tables, checked against numpy on
results written by hand: mean and sample std over seeds, the per-seed average over datasets, partial
and missing cells marked, never averaged over silently."""

import json

import numpy as np
import pytest

from fastcal.cli import main
from fastcal.runs.sweep.grid import grid_from_dict
from fastcal.runs.sweep.launch import prepare
from fastcal.runs.table import build_table, ece_accuracy_figure, format_table

DATASETS = ("dtd", "eurosat")


def finish(folder, base, new):
    (folder / "run").mkdir(parents=True)
    report = lambda acc, ece: {"accuracy": acc, "ece": ece, "n_bins": 10}  # noqa: E731
    results = {"base": report(*base), "new": report(*new), "hm": {}, "config": {}}
    (folder / "run" / "results.json").write_text(json.dumps(results))
    (folder / "events.jsonl").write_text('{"event": "start"}\n{"event": "done"}\n')


@pytest.fixture
def sweep(tmp_path):
    grid = grid_from_dict(
        {
            "command": "train",
            "fixed": {"root": str(tmp_path)},
            "axes": {"dataset": list(DATASETS), "method": ["coop", "kgcoop"], "seed": [1, 2, 3]},
        },
        "grid",
    )
    out = prepare(grid, tmp_path / "sweep")
    rng = np.random.default_rng(0)
    values = {}
    for cell in grid.cells():
        v = cell.values
        if v["method"] == "coop" and v["dataset"] == "eurosat":
            continue  # none finished
        if v["method"] == "kgcoop" and v["dataset"] == "eurosat" and v["seed"] == 3:
            continue  # one seed missing
        (base_acc, new_acc), (base_ece, new_ece) = rng.uniform(0.5, 1.0, 2), rng.uniform(0.0, 0.3, 2)
        finish(out / cell.name, (base_acc, base_ece), (new_acc, new_ece))
        values[(v["dataset"], v["method"], v["seed"])] = {"base acc": base_acc, "new acc": new_acc}
    return out, values


def test_mean_std_and_the_average_over_datasets(sweep):
    out, values = sweep
    table = build_table(out)
    assert table.row_axes == ["method"] and table.groups == [*DATASETS, "Average"] and table.bins == [10]
    assert table.metrics == ["base acc", "base ECE", "new acc", "new ECE", "HM", "HM ECE"]
    stat = table.values[("kgcoop",)]["dtd"]["base acc"]
    expected = [values[("dtd", "kgcoop", s)]["base acc"] for s in (1, 2, 3)]
    assert stat.mean == pytest.approx(np.mean(expected)) and stat.std == pytest.approx(
        np.std(expected, ddof=1)
    )
    assert (stat.n, stat.expected) == (3, 3)
    partial = table.values[("kgcoop",)]["eurosat"]["base acc"]
    assert (partial.n, partial.expected) == (2, 3)
    average = table.values[("kgcoop",)]["Average"]["base acc"]
    per_seed = [np.mean([values[(d, "kgcoop", s)]["base acc"] for d in DATASETS]) for s in (1, 2)]
    assert average.mean == pytest.approx(np.mean(per_seed)) and (average.n, average.expected) == (2, 3)
    hm = table.values[("kgcoop",)]["dtd"]["HM"]
    per_seed_hm = [
        2 * v["base acc"] * v["new acc"] / (v["base acc"] + v["new acc"])
        for v in (values[("dtd", "kgcoop", s)] for s in (1, 2, 3))
    ]
    assert hm.mean == pytest.approx(np.mean(per_seed_hm))
    assert table.values[("coop",)]["eurosat"]["base acc"].mean is None
    assert table.values[("coop",)]["Average"]["base acc"].mean is None  # not the dtd mean alone


def test_formats_mark_partial_and_missing_values(sweep, tmp_path, capsys):
    out, values = sweep
    table = build_table(out)
    md = format_table(table, "md")
    coop = next(line for line in md.splitlines() if line.startswith("| coop |"))
    cells = [c.strip() for c in coop.strip("|").split("|")]
    dtd = [values[("dtd", "coop", s)]["base acc"] for s in (1, 2, 3)]
    assert cells[1] == f"{100 * np.mean(dtd):.2f} ± {100 * np.std(dtd, ddof=1):.2f}"
    assert cells[7:] == ["missing"] * 12  # eurosat and the average
    kgcoop = next(line for line in md.splitlines() if line.startswith("| kgcoop |"))
    assert kgcoop.count("(2/3)") == 12
    assert "ECE: 10 equal-width bins" in md
    latex = format_table(table, "latex")
    assert r"\multicolumn{6}{c}{eurosat}" in latex and r"\pm" in latex and "% Percent" in latex
    rows = format_table(table, "csv").splitlines()
    assert rows[0] == "method,group,metric,mean,std,n,expected" and len(rows) == 1 + 2 * 3 * 6 + 1
    assert ece_accuracy_figure(table, tmp_path / "f.png").stat().st_size > 0
    with pytest.raises(ValueError, match="format: expected one of"):
        format_table(table, "html")
    assert main(["table", str(out), "--format", "latex", "--no-figure"]) == 0
    assert capsys.readouterr().out == latex
    assert main(["table", str(tmp_path)]) == 2
    assert "DIR: expected a sweep folder (holding sweep.json)" in capsys.readouterr().err
