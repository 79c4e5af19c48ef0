"""``fastcal eval`` of a saved prompt on the testbed: base and new classes (the training numbers
again), the style-shifted domain, all classes, and errors."""

import json

from fastcal.cli import main


def test_eval_on_new_classes_and_the_shifted_domain(testbed_cache, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--method", "kgcoop", "--epochs=1", "--shots=4", "--batch_size=8", "--output", str(run)]
    assert main([*argv, "--quiet"]) == 0
    trained = json.loads((run / "results.json").read_text())
    capsys.readouterr()

    assert main(["eval", "--run", str(run), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run / "eval.json").read_text())
    assert results["method"] == "kgcoop" and results["trained_on"] == ["zero", "one", "two", "three", "four"]
    assert set(results["targets"]) == {"testbed", "testbed_shifted"}
    for group in ("base", "new"):
        assert results["targets"]["testbed"][group] == trained[group]
        shifted = results["targets"]["testbed_shifted"][group]
        assert shifted["count"] == trained[group]["count"] and shifted["n_bins"] == 15
        assert (run / f"reliability_testbed_shifted_{group}.png").stat().st_size > 0
    assert results["targets"]["testbed"]["hm"] == trained["hm"]
    assert "testbed_shifted" in printed and "HM" in printed

    out = tmp_path / "all"
    assert (
        main(
            [
                "eval",
                "--run",
                str(run / "prompt.pt"),
                "--targets",
                "testbed",
                "--groups",
                "all",
                "--n-bins",
                "20",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    everything = json.loads((out / "eval.json").read_text())["targets"]["testbed"]
    assert (
        list(everything) == ["all"]
        and everything["all"]["count"] == 720
        and everything["all"]["n_bins"] == 20
    )


def test_eval_errors(cache_dir, tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "prompt.pt" in capsys.readouterr().err
