"""fastcal.runs.sweep.presets: the papers' grids ship as package data and load as a user's grid would
(every cell's settings built and checked), with the datasets, methods, losses and seeds of the papers."""

import pytest

from fastcal.data.protocols import CROSS_DATASET_SOURCE, CROSS_DATASET_TARGETS, DOMAIN_GENERALIZATION_TARGETS
from fastcal.runs.sweep import load_grid
from fastcal.runs.sweep.presets import preset_names, resolve_grid

# the papers' 11 base-to-new datasets, and ImageNet with its four natural shifts
ELEVEN = {CROSS_DATASET_SOURCE, *CROSS_DATASET_TARGETS}
VARIANTS = {CROSS_DATASET_SOURCE, *DOMAIN_GENERALIZATION_TARGETS}


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCAL_DATA", str(tmp_path))
    return tmp_path


def test_every_preset_is_shipped_and_valid(data):
    assert preset_names() == [
        "carot_imagenet",
        "ctpt_fpp_finegrained",
        "ctpt_fpp_imagenet_variants",
        "dor_base2new",
        "tcpt_base2new",
    ]
    for name in preset_names():
        grid = load_grid(resolve_grid(name))
        assert grid.description and grid.cells()
        assert all(c.options["root"] == str(data) for c in grid.cells())
        seeds = grid.axes["seed"]
        assert len(seeds) == 3


def test_the_papers_axes(data):
    tcpt = load_grid(resolve_grid("tcpt_base2new"))
    assert tcpt.command == "train" and set(tcpt.axes["dataset"]) == ELEVEN
    assert tcpt.axes["loss"] == ["ce", "calibrated"] and tcpt.fixed["n_bins"] == 10  # TCPT reports 10 bins
    assert len(tcpt.cells()) == 11 * 5 * 2 * 3
    dor = load_grid(resolve_grid("dor_base2new"))
    assert dor.axes["regularizers"] == [[], ["dor"]] and set(dor.axes["dataset"]) == ELEVEN
    fine = load_grid(resolve_grid("ctpt_fpp_finegrained"))
    assert set(fine.axes["dataset"]) == ELEVEN - {"imagenet"} and fine.axes["init"] == ["hard", "fpp"]
    assert len(fine.cells()) == 10 * (3 * 2 - 1) * 3  # zero-shot has no initialization to vary
    variants = load_grid(resolve_grid("ctpt_fpp_imagenet_variants"))
    assert set(variants.axes["dataset"]) == VARIANTS
    carot = load_grid(resolve_grid("carot_imagenet"))
    assert carot.command == "finetune" and carot.axes["method"] == ["ft", "flyp", "carot"]


def test_without_the_data_folder_a_preset_names_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCAL_DATA", str(tmp_path / "absent"))
    with pytest.raises(
        ValueError, match=r"tcpt_base2new.yaml: cell dataset=imagenet,.*: root: expected an existing"
    ):
        load_grid(resolve_grid("tcpt_base2new"))
