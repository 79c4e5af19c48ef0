"""The ``fastcal demo`` stage of robust fine-tuning on the testbed CLIP, with one-step schedules and
trimmed evaluation sets (the real stage runs in ``fastcal demo``)."""

import dataclasses
from pathlib import Path

import pytest

import fastcal.finetune.demo as finetune_demo
import fastcal.finetune.experiment as experiment
from fastcal.cli.demo import check_row, format_table
from fastcal.finetune import config as finetune_config


@dataclasses.dataclass
class FakeContext:
    """The part of ``fastcal.cli.demo.DemoContext`` the stage uses."""

    clip: object
    output: Path
    feature_cache_dir: Path
    n_bins: int = 15
    progress: bool = False
    figures: list = dataclasses.field(default_factory=list)

    def figure(self, stem, probs, labels, title):
        assert probs.shape[0] == labels.shape[0] and title
        self.figures.append(stem)
        return f"{stem}.png"

    def log(self, message):
        pass


def test_demo_stage_rows(testbed_clip, cache_dir, tmp_path, monkeypatch):
    full = experiment.testbed_data()

    def small(eval_set, n):
        return dataclasses.replace(eval_set, items=eval_set.items[:n])

    trimmed = dataclasses.replace(
        full,
        heldout=small(full.heldout, 30),
        test=small(full.test, 40),
        ood=tuple(small(s, 40) for s in full.ood),
    )
    monkeypatch.setattr(experiment, "testbed_data", lambda: trimmed)
    monkeypatch.setattr(
        finetune_demo,
        "testbed_config",
        lambda method: finetune_config.testbed_config(method).replace(max_steps=1, batch_size=16),
    )
    clip = testbed_clip
    ctx = FakeContext(clip, tmp_path, cache_dir / "features")
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}

    rows = [check_row("finetune", row) for row in finetune_demo.demo_stage(ctx)]
    methods = [row["method"] for row in rows]
    assert methods == [
        "CLIP zero-shot (ensemble)",
        "CLIP zero-shot (ensemble) + TS",
        "FT",
        "FT + TS",
        "WiSE-FT (FT, alpha=0.5)",
        "WiSE-FT (FT, alpha=0.5) + TS",
        "FLYP",
        "FLYP + TS",
        "CaRot",
        "CaRot + TS",
    ]
    for row in rows:
        assert set(row["metrics"]) == {"ID", "OOD"}
        assert row["metrics"]["ID"]["count"] == 40 and row["metrics"]["ID"]["n_bins"] == 15
        assert ("temperature" in row["notes"]) == row["method"].endswith("+ TS")
        assert set(row["notes"]["figures"]) == {"ID", "OOD"}
    assert len(ctx.figures) == 20
    assert rows[0]["metrics"]["ID"]["accuracy"] == pytest.approx(rows[1]["metrics"]["ID"]["accuracy"])
    # the shared pretrained model is left as it was (each method fine-tunes a copy)
    for name, value in clip.model.state_dict().items():
        assert value.equal(before[name]), name
    table = format_table(rows)
    assert "ID acc" in table and "OOD ECE" in table and "CaRot + TS" in table
