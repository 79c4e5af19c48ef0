"""``fastcal wise`` end to end on tiny runs on the testbed (its pretrained CLIP, two training steps)."""

import json

import pytest

from fastcal.cli import main


def _finetune(tmp_path, method):
    out = tmp_path / method
    args = ["finetune", "--method", method, "--output", str(out)]
    assert (
        main([*args, "--max-steps", "2", "--batch-size", "16", "--quiet", "--no-diagrams", "--lr", "1e-3"])
        == 0
    )
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same(a[key], b[key])
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_wise_sweep_endpoints(testbed_cache, tmp_path, capsys):
    sweeps = {}
    for method in ("ft", "flyp"):
        run = _finetune(tmp_path, method)
        assert main(["wise", "--finetuned", str(run), "--alpha", "0", "--select", "1", "--quiet"]) == 0
        results = json.loads((run / "wise" / "results.json").read_text())
        assert [entry["alpha"] for entry in results["sweep"]] == [0.0, 1.0]  # the selected alpha is added
        assert set(results) == {"id", "ood", "config", "sweep"}
        assert results["id"] == results["sweep"][1]["id"] and results["ood"] == results["sweep"][1]["ood"]
        assert results["config"]["wise"]["select"] == 1.0
        assert len(list((run / "wise" / "reliability").glob("*.png"))) == 4
        # alpha = 1 is the fine-tuned model
        finetuned = json.loads((run / "results.json").read_text())
        _same(results["sweep"][1]["id"], finetuned["id"])
        _same(results["sweep"][1]["ood"], finetuned["ood"])
        sweeps[method] = results
        assert "alpha" in capsys.readouterr().out
    # alpha = 0 is zero-shot CLIP for both methods (FT's head starts as the zero-shot classifier)
    _same(sweeps["ft"]["sweep"][0]["id"], sweeps["flyp"]["sweep"][0]["id"])
    _same(sweeps["ft"]["sweep"][0]["ood"], sweeps["flyp"]["sweep"][0]["ood"])
    assert sweeps["flyp"]["sweep"][1]["id"] != sweeps["flyp"]["sweep"][0]["id"]


def test_wise_errors(cache_dir, tmp_path, capsys):
    assert main(["wise", "--finetuned", str(tmp_path), "--alpha", "0:1:0.5"]) == 2
    assert "--finetuned: expected a finished fastcal finetune run folder" in capsys.readouterr().err
    assert main(["wise", "--finetuned", str(tmp_path), "--alpha", "0:2:0.5"]) == 2
    assert "alpha" in capsys.readouterr().err
