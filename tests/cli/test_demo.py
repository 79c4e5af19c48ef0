"""``fastcal demo``: the stage registry, the table, and the zero-shot stage end to end on the testbed."""

import json
import sys
import types

import pytest

from fastcal.cli import main
from fastcal.metrics.functional import REPORT_KEYS
from fastcal.runs import demo
from fastcal.runs.rows import check_row, format_table


def report(accuracy, ece):
    return {"accuracy": accuracy, "ece": ece, "count": 10, "n_bins": 15}


def test_demo_on_the_testbed_writes_results_and_diagrams(testbed_cache, tmp_path, capsys):
    output = tmp_path / "results"
    assert main(["demo", "--only", "zeroshot", "--output", str(output), "--quiet"]) == 0
    printed = capsys.readouterr().out

    results = json.loads((output / "results.json").read_text())
    assert results["n_bins"] == 15 and results["calibration_size"] == 50
    assert results["testbed"]["model"] == "fastcal-testbed"
    assert list(results["stages"]) == ["zeroshot"] and results["total_seconds"] > 0
    rows = results["rows"]
    assert [r["method"] for r in rows] == [
        "CLIP zero-shot, hard prompt",
        "CLIP zero-shot, hard prompt + TS",
        "CLIP zero-shot, 5-prompt ensemble",
        "CLIP zero-shot, 5-prompt ensemble + TS",
    ]
    for row in rows:
        assert row["stage"] == "zeroshot" and row["section"] == "zero-shot"
        assert set(row["metrics"]) == {"base", "new"}
        for group in ("base", "new"):
            assert set(REPORT_KEYS) <= set(row["metrics"][group])
            assert row["metrics"][group]["n_bins"] == 15
            assert (output / row["notes"]["figures"][group]).stat().st_size > 0
        base, new = row["metrics"]["base"]["accuracy"], row["metrics"]["new"]["accuracy"]
        assert row["hm_accuracy"] == pytest.approx(2 * base * new / (base + new))
    # 361 base and 359 new test images; TS does not change the predictions
    assert rows[0]["metrics"]["base"]["count"] + rows[0]["metrics"]["new"]["count"] == 720
    assert rows[1]["metrics"]["base"]["accuracy"] == rows[0]["metrics"]["base"]["accuracy"]
    assert rows[1]["notes"]["calibration_size"] == 50 and rows[1]["notes"]["calibration_split"] == "val"
    assert len(list(output.glob("*.png"))) == 8

    assert "== zero-shot ==" in printed and "base acc" in printed and "HM" in printed
    assert f"T={rows[1]['notes']['temperature']:.2f}" in printed
    assert "total" in printed


def test_the_whole_demo_runs_every_stage_on_one_shared_testbed(testbed_cache, tmp_path, capsys):
    """The README's main job as a user runs it: every stage in order, sharing one context (a stage that
    mutates the shared CLIP, e.g. freezing it, must not break the stages after it)."""
    from fastcal.outliers.wordnet import WordNetNotFoundError, ensure_wordnet

    try:
        ensure_wordnet()
        has_wordnet = True
    except WordNetNotFoundError:
        has_wordnet = False
    output = tmp_path / "results"
    assert main(["demo", "--output", str(output), "--quiet", "--seeds", "1"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert list(results["stages"]) == [name for name, _ in demo.STAGES]
    # the prompt-tuning and test-time stages ran as the demo's sweep: one cell per section and seed
    assert results["seeds"] == [1] and results["stages"]["tpt"]["sweep"] is True
    assert sorted(p.name for p in (output / "seeds").iterdir() if p.is_dir()) == [
        "section=prompt_tuning,seed=1",
        "section=test_time,seed=1",
    ]
    rows = results["rows"]
    assert {row["stage"] for row in rows} == set(results["stages"])
    for row in rows:
        if row["stage"] == "coop_dor" and not has_wordnet:
            assert "skipped" in row["notes"]
            continue
        assert row["metrics"], row["method"]
        for group, metrics in row["metrics"].items():
            assert 0.0 <= metrics["ece"] <= 1.0 and metrics["count"] > 0, (row["method"], group)
            assert metrics["accuracy"] > 0.5, (row["method"], group)  # 5-way: far above chance
    methods = {row["method"] for row in rows}
    expected = {"CoOp", "KgCoOp", "CoCoOp", "MaPLe", "VPT", "ProGrad", "PromptSRC", "TCP", "ProDA"}
    assert expected | {"TPT", "C-TPT", "O-TPT", "FT", "FLYP", "CaRot"} <= methods
    assert ("CoOp + DOR" in methods) == has_wordnet
    printed = capsys.readouterr().out
    assert f"{len(rows)} rows" in printed


@pytest.fixture
def fake_stage(monkeypatch):
    """A registry with the zero-shot stage and a fake robust fine-tuning stage (ID / OOD columns)."""
    calls = []

    def stage(ctx):
        calls.append(ctx)
        path = ctx.figure("fake_id", *fake_probs())
        return [
            {
                "section": "robust fine-tuning",
                "method": "FT",
                "metrics": {"ID": report(0.9, 0.05), "OOD": report(0.5, 0.2)},
                "notes": {"figure": path},
            },
            {"section": "robust fine-tuning", "method": "WiSE-FT", "metrics": {"ID": report(0.8, 0.03)}},
        ]

    module = types.ModuleType("fastcal_demo_fake_stage")
    module.stage = stage
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(demo, "STAGES", [*demo.STAGES, ("fake", f"{module.__name__}:stage")])
    return calls


def fake_probs():
    import torch

    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    return probs, torch.tensor([0, 1, 1]), "fake"


def test_only_runs_the_selected_stage_and_sections_get_their_own_columns(fake_stage, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["demo", "--only", "fake", "--output", str(output), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert len(fake_stage) == 1 and fake_stage[0].n_bins == 15
    results = json.loads((output / "results.json").read_text())
    assert list(results["stages"]) == ["fake"]
    assert [r["method"] for r in results["rows"]] == ["FT", "WiSE-FT"]
    assert "hm_accuracy" not in results["rows"][0]
    assert (output / "fake_id.png").is_file()
    assert "== robust fine-tuning ==" in printed and "OOD ECE" in printed
    assert "HM" not in printed and "zero-shot" not in printed
    wise = next(line for line in printed.splitlines() if line.startswith("WiSE-FT"))
    assert wise.split()[1:] == ["80.0", "3.0", "-", "-"]


def test_list_and_unknown_stage(fake_stage, capsys):
    assert main(["demo", "--list"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed[0] == "zeroshot" and listed[-1] == "fake"
    assert listed == [name for name, _ in demo.STAGES]
    assert main(["demo", "--only", "zeroshot,no_such_stage"]) == 2
    err = capsys.readouterr().err
    assert "--only: expected stage names among zeroshot, " in err and "unknown: no_such_stage" in err


def test_bad_rows_are_refused(monkeypatch, tmp_path):
    module = types.ModuleType("fastcal_demo_bad_stage")
    module.stage = lambda ctx: [{"section": "x", "metrics": {}}]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(demo, "STAGES", [("bad", f"{module.__name__}:stage")])
    with pytest.raises(TypeError, match="stage bad: expected rows"):
        main(["demo", "--output", str(tmp_path), "--quiet"])


def test_table_groups_rows_by_section_with_harmonic_mean():
    rows = [
        check_row(
            "a",
            {
                "section": "prompt tuning",
                "method": "CoOp",
                "metrics": {"base": report(0.8, 0.1), "new": report(0.6, 0.2)},
            },
        ),
        check_row(
            "b", {"section": "test-time tuning", "method": "TPT", "metrics": {"new": report(0.7, 0.05)}}
        ),
        check_row(
            "a",
            {
                "section": "prompt tuning",
                "method": "KgCoOp",
                "metrics": {"base": report(0.75, 0.04), "new": report(0.7, 0.03)},
                "notes": {"temperature": 1.234},
            },
        ),
    ]
    table = format_table(rows)
    blocks = table.split("\n\n")
    assert blocks[0].splitlines()[0] == "== prompt tuning =="
    assert blocks[0].splitlines()[1].split() == [
        "method",
        "base",
        "acc",
        "base",
        "ECE",
        "new",
        "acc",
        "new",
        "ECE",
        "HM",
    ]
    coop = blocks[0].splitlines()[3].split()
    assert coop == ["CoOp", "80.0", "10.0", "60.0", "20.0", f"{100 * 2 * 0.8 * 0.6 / 1.4:.1f}"]
    assert blocks[0].splitlines()[4].startswith("KgCoOp (T=1.23)")
    assert blocks[1].splitlines()[1].split() == ["method", "new", "acc", "new", "ECE"]


def test_bad_seeds_are_one_line(capsys):
    assert main(["demo", "--seeds", "1,x"]) == 2
    assert capsys.readouterr().err == "fastcal demo: error: --seeds: expected an integer, got 'x'\n"
