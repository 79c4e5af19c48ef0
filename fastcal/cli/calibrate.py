"""Post-hoc calibration of saved predictions: fit a calibrator on one file, apply it to another.

--fit and --apply are predictions files with `logits` and `labels` (a run's predictions/<group>.npz;
--fit may come from another run, or be the same file). --method is a registered calibrator: ts
(temperature), vector and matrix (scaling, ODIR weights as options), histogram and isotonic
(one-vs-rest, renormalized), dac (DAC: needs both files' class text features, which prompt-tuning runs
save). ts and dac transfer to other classes (base -> new); the others need --apply over the classes of
--fit. --option KEY=VALUE sets a constructor argument of the calibrator (repeatable), e.g.
`--option n_bins=15` for histogram, `--option off_diagonal_weight=0.01` for matrix, `--option k=3` for
dac.

The JSON report (printed, and with --output written as results.json of a run folder) holds the metrics
of `fastcal metrics` before (the file as its run reported it) and after calibration. With --output the
folder also gets run.json, reliability diagrams before and after, the risk-coverage curves after, the
fitted calibrator (calibrator.pt, its state_dict) and the calibrated predictions
(predictions/calibrated.npz, which `fastcal metrics` reads).

Example:
  fastcal calibrate --method dac --fit runs/pets/predictions/base.npz \\
      --apply runs/pets/predictions/new.npz --output runs/pets-dac
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.cli.metrics import add_report_arguments

    parser.add_argument("--method", required=True, help="ts, vector, matrix, histogram, isotonic or dac")
    parser.add_argument("--fit", required=True, metavar="FILE", help="predictions to fit the calibrator on")
    parser.add_argument("--apply", required=True, metavar="FILE", help="predictions to calibrate")
    parser.add_argument("--output", metavar="DIR", help="write a run folder (report, diagrams, calibrator)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a calibrator argument (YAML)"
    )
    add_report_arguments(parser, bootstrap=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the run --output holds")


def _options(pairs: list[str]) -> dict:
    import yaml

    from fastcal._checks import fail

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise fail("--option", "KEY=VALUE", repr(pair))
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise fail("--option", "a YAML value after '='", repr(value)) from None
    return options


def run(args: argparse.Namespace) -> int:
    import torch

    from fastcal.cli.metrics import check_report_arguments, report_metrics
    from fastcal.runs.folder import RunFolder, check_output_path, check_run_rules
    from fastcal.runs.posthoc import build_calibrator, fit_and_apply
    from fastcal.runs.predictions import load_predictions, save_predictions

    check_report_arguments(args)
    options = _options(args.option)
    calibrator = build_calibrator(args.method, options)
    if args.output is not None:
        output = check_output_path(args.output)
        check_run_rules(output, kind="calibrate", resume=False, overwrite=args.overwrite, argument="--output")
    fit = load_predictions(args.fit, "--fit")
    apply = load_predictions(args.apply, "--apply")
    calibrated = fit_and_apply(calibrator, fit, apply)

    before_probs = torch.softmax(apply.scores.double() / apply.temperature, dim=1)
    after_probs = torch.softmax(calibrated, dim=1)
    report = {
        "method": args.method,
        "options": options,
        "calibrator": repr(calibrator),
        "fit": {"file": str(args.fit), "count": len(fit.labels), "num_classes": fit.scores.shape[1]},
        "apply": {"file": str(args.apply), "count": len(apply.labels), "num_classes": apply.scores.shape[1]},
        "n_bins": args.n_bins,
        "before": {"temperature": apply.temperature},
        "after": {},
    }
    temperature = getattr(calibrator, "temperature", None)
    if isinstance(temperature, float):
        report["after"]["temperature"] = temperature
    for key, probs in (("before", before_probs), ("after", after_probs)):
        report[key].update(report_metrics(probs, apply.labels, args, False, apply.proximity))

    if args.output is not None:
        from fastcal._io import atomic_path
        from fastcal.metrics import reliability_diagram, risk_coverage_plot
        from fastcal.runs.predictions import predictions_path

        name, after = Path(args.apply).name, f"after {args.method}"
        with RunFolder.open(output, kind="calibrate", overwrite=args.overwrite) as folder:
            folder.write_manifest({"config": {k: report[k] for k in ("method", "options", "n_bins")}})
            bins = {"n_bins": args.n_bins}
            for file_name, draw, probs, title in (
                ("reliability_before.png", reliability_diagram, before_probs, "before"),
                ("reliability_after.png", reliability_diagram, after_probs, after),
                ("risk_coverage_after.png", risk_coverage_plot, after_probs, after),
            ):
                options = bins if draw is reliability_diagram else {}
                draw(probs, apply.labels, path=output / file_name, title=f"{name}, {title}", **options)
                report.setdefault("figures", []).append(file_name)
            with atomic_path(output / "calibrator.pt") as tmp:
                torch.save(calibrator.state_dict(), tmp)
            save_predictions(
                predictions_path(output, "calibrated"),
                calibrated,
                apply.labels,
                apply.classnames or [str(c) for c in range(calibrated.shape[1])],
                logit_scale=1.0,
                proximity=apply.proximity,
            )
            folder.write_results(report)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
