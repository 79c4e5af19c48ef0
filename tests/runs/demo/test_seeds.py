"""fastcal.runs.demo.seeds: the seeded rows are the mean over seeds with the sample standard deviation,
and a row is marked against the row it improves on only where the difference exceeds both spreads."""

import statistics

import pytest

from fastcal.runs.demo import STAGES
from fastcal.runs.demo.seeds import SEEDED_MODULES, DemoSectionConfig, aggregate_rows, section_of
from fastcal.runs.rows import check_row, format_table

SECTION = "prompt tuning (16 shots, train base, test base and new)"


def row(method, base, new):
    report = lambda acc, ece: {"accuracy": acc, "ece": ece, "count": 10, "n_bins": 15}  # noqa: E731
    return {
        "stage": method.lower(),
        "section": SECTION,
        "method": method,
        "metrics": {"base": report(*base), "new": report(*new)},
    }


def test_mean_spread_and_marks_against_the_row_improved_on():
    # per seed: CoOp, CoOp + calibrated loss (ECE clearly lower on base, within the noise on new)
    runs = [
        [row("CoOp", (0.80, 0.10), (0.70, 0.20)), row("CoOp + calibrated loss", (0.81, 0.04), (0.71, 0.15))],
        [row("CoOp", (0.82, 0.11), (0.66, 0.10)), row("CoOp + calibrated loss", (0.80, 0.05), (0.69, 0.19))],
        [row("CoOp", (0.81, 0.09), (0.74, 0.15)), row("CoOp + calibrated loss", (0.82, 0.03), (0.70, 0.11))],
    ]
    coop, calibrated = aggregate_rows(runs, (1, 2, 3))
    assert calibrated["stage"] == "coop + calibrated loss" and calibrated["notes"]["seeds"] == [1, 2, 3]
    base_ece = [r[1]["metrics"]["base"]["ece"] for r in runs]
    assert calibrated["metrics"]["base"]["ece"] == pytest.approx(statistics.mean(base_ece))
    assert calibrated["notes"]["spread"]["base"]["ece"] == pytest.approx(statistics.stdev(base_ece))
    assert calibrated["metrics"]["base"]["count"] == 10
    assert calibrated["notes"]["improves_on"] == "CoOp" and "improves_on" not in coop["notes"]
    # base ECE: 0.04 vs 0.10, spreads 0.01 + 0.01 -> marked; new ECE: 0.15 vs 0.15 -> not; accuracies
    # differ by less than their spreads -> not
    assert calibrated["notes"]["marks"] == {"base": {"ece": pytest.approx(0.04 - 0.10)}}

    text = format_table([check_row(r["stage"], r) for r in (coop, calibrated)])
    line = next(x for x in text.splitlines() if x.startswith("CoOp + calibrated loss"))
    assert "4.0±1.0*" in line and "81.0±1.0 " in line
    assert "mean±std over seeds 1, 2, 3" in text


def test_the_new_class_ece_after_ts_and_dac_is_averaged_and_printed():
    def seed_row(ts, dac):
        after = {"ts": ts, "dac": dac, "fit_split": "val"}
        if dac is None:
            after["dac_skipped"] = "no class text features"
        return {**row("CoOp", (0.8, 0.1), (0.7, 0.2)), "notes": {"new_ece_after": after}}

    (coop,) = aggregate_rows(
        [[seed_row(0.06, 0.05)], [seed_row(0.08, 0.04)], [seed_row(0.07, 0.06)]], (1, 2, 3)
    )
    after = coop["notes"]["new_ece_after"]
    assert after["ts"] == pytest.approx(0.07) and after["dac"] == pytest.approx(0.05)
    assert after["spread"] == {"ts": pytest.approx(0.01), "dac": pytest.approx(0.01)}
    assert after["fit_split"] == "val"
    text = format_table([check_row("coop", coop)])
    assert "new ECE +TS" in text.splitlines()[1] and "new ECE +DAC" in text.splitlines()[1]
    assert next(x for x in text.splitlines() if x.startswith("CoOp")).endswith("7.0±1.0       5.0±1.0")

    (cocoop,) = aggregate_rows([[seed_row(0.06, None)], [seed_row(0.08, None)]], (1, 2))
    after = cocoop["notes"]["new_ece_after"]
    assert "dac" not in after["spread"] and after["dac_skipped"] == "no class text features"
    assert next(
        x for x in format_table([check_row("cocoop", cocoop)]).splitlines() if x.startswith("CoOp")
    ).endswith(" -")


def test_a_stage_that_did_not_run_stays_one_row():
    skipped = {
        "stage": "coop_dor",
        "section": SECTION,
        "method": "CoOp + DOR (not run)",
        "metrics": {},
        "notes": {},
    }
    (only,) = aggregate_rows([[skipped], [skipped]], (1, 2))
    assert only == skipped


def test_the_seeded_sections_are_the_prompt_tuning_and_test_time_stages():
    seeded = [name for name, target in STAGES if section_of(target)]
    prompt_tuning = [name for name, target in STAGES if target.startswith("fastcal.runs.demo.prompt_tuning:")]
    assert "coop" in prompt_tuning and seeded == [*prompt_tuning, "tpt"]
    assert DemoSectionConfig(section="test_time").selected() == [
        ("tpt", "fastcal.runs.demo.test_time:test_time_stage")
    ]
    assert set(SEEDED_MODULES.values()) == {"prompt_tuning", "test_time"}
    with pytest.raises(ValueError, match="section: expected one of"):
        DemoSectionConfig(section="finetune")


def test_one_seed_marks_nothing():
    runs = [[row("CoOp", (0.80, 0.10), (0.70, 0.20)), row("KgCoOp", (0.90, 0.05), (0.80, 0.10))]]
    _, kgcoop = aggregate_rows(runs, (1,))
    assert kgcoop["notes"]["spread"]["base"]["ece"] == 0.0 and "marks" not in kgcoop["notes"]
