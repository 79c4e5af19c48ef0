"""Calibration report of a file of predictions, printed as JSON.

PRED_FILE is a .npz or .pt file holding `labels` (N,) integers and either `logits` (N, C) or `probs`
(N, C) rows of probabilities (logits win when both are present), such as a run's
predictions/<group>.npz; logits are divided by the file's `temperature` when it has one (so a run's
saved predictions give the report of its results.json). The report has accuracy, ece, mce,
l2, l2_debiased, ace, classwise_ece, smooth_ece, brier, nll and mean confidence (top-label, uniform
(lo, hi] bins unless named otherwise), aurc and augrc (risk-coverage areas, ties grouped), piece when
the file holds each sample's proximity (a run's saved predictions do), the bin count, and percentile
bootstrap intervals.

With --temperature-from CALIB_FILE, a temperature is fitted on that file (same format; its classes
may differ from PRED_FILE's) and the report is repeated for softmax(logits / T). Probabilities are
scaled through their logarithm (softmax(log p / T)).

Example:
  fastcal metrics preds.npz --n-bins 15 --plot reliability.png --temperature-from calib.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LARGE_FILE_ROWS = 100_000
CHUNK_ROWS = 1 << 16
MAX_BOOTSTRAP = 100_000


def add_report_arguments(parser: argparse.ArgumentParser, *, bootstrap: int) -> None:
    """The options of the report (``--n-bins``, the bootstrap's); ``check_report_arguments`` checks them."""
    parser.add_argument(
        "--n-bins", type=int, default=15, help="bins for the binned metrics (default 15, at most 1,000,000)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=bootstrap,
        metavar="N",
        help=f"bootstrap resamples for intervals (0: none; default {bootstrap})",
    )
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def check_report_arguments(args: argparse.Namespace) -> None:
    """One-line errors for report options out of range."""
    from fastcal._checks import check_int, check_number, fail
    from fastcal.metrics.functional import MAX_BINS

    check_int("--n-bins", args.n_bins, minimum=1, maximum=MAX_BINS)
    check_int("--bootstrap", args.bootstrap, minimum=0, maximum=MAX_BOOTSTRAP)
    check_number("--level", args.level, minimum=0.0, maximum=1.0, strict_minimum=True)
    if args.level >= 1.0:
        raise fail("--level", "a number in (0, 1)", args.level)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_file", metavar="PRED_FILE", help=".npz or .pt with logits or probs, and labels")
    parser.add_argument("--plot", metavar="PNG", help="write a reliability diagram to this PNG file")
    parser.add_argument(
        "--temperature-from",
        metavar="CALIB_FILE",
        help="fit temperature scaling on this file; report after it",
    )
    add_report_arguments(parser, bootstrap=1000)
    parser.add_argument("--output", metavar="JSON", help="also write the report to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, even on large files")


def _to_probs(scores, kind: str):
    """Probabilities: the rows themselves, or the softmax of logits in their own precision (half
    precision upcast), as a run computed them."""
    import torch

    from fastcal._checks import check_tensor

    check_tensor(kind, scores, ndim=2, floating=True)
    if kind == "probs":
        return scores
    return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=1)


def _to_logits(scores, kind: str):
    """Logits for temperature scaling: the logits themselves, or the log of probabilities."""
    import torch

    if kind == "logits":
        return scores.double()
    return scores.double().clamp(min=torch.finfo(torch.float64).tiny).log()


def _metrics(probs, labels, n_bins: int, progress: bool, proximity=None) -> dict:
    from fastcal.metrics import CalibrationMeter, augrc, aurc, calibration_error, piece, smooth_ece

    meter = CalibrationMeter(n_bins)
    chunks = range(0, len(labels), CHUNK_ROWS)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="metrics", unit="chunk", leave=False)
    for start in chunks:
        meter.update(probs[start : start + CHUNK_ROWS], labels[start : start + CHUNK_ROWS])
    report = meter.compute()
    report["l2_debiased"] = float(calibration_error(probs, labels, n_bins=n_bins, norm="l2", debias=True))
    report["ace"] = float(calibration_error(probs, labels, n_bins=n_bins, binning="quantile"))
    report["classwise_ece"] = float(calibration_error(probs, labels, n_bins=n_bins, kind="classwise"))
    report["smooth_ece"] = float(smooth_ece(probs, labels))
    report["aurc"] = float(aurc(probs, labels))
    report["augrc"] = float(augrc(probs, labels))
    if proximity is not None:
        report["piece"] = float(piece(probs, labels, proximity))
    return report


def report_metrics(probs, labels, args, progress: bool, proximity=None) -> dict:
    """``{"metrics": ..., "intervals": ...}`` of ``probs``: the report of this command (module docstring)
    with the options of ``add_report_arguments``; PIECE when each row's ``proximity`` is given."""
    from fastcal.metrics import bootstrap_report

    result = {"metrics": _metrics(probs, labels, args.n_bins, progress, proximity)}
    if args.bootstrap > 0:
        intervals = bootstrap_report(
            probs,
            labels,
            n_bins=args.n_bins,
            n=args.bootstrap,
            level=args.level,
            seed=args.seed,
            progress=progress,
        )
        result["intervals"] = {"level": args.level, "n": args.bootstrap, "seed": args.seed}
        result["intervals"].update({key: list(bounds) for key, bounds in intervals.items()})
    return result


def run(args: argparse.Namespace) -> int:
    from fastcal._checks import check_tensor
    from fastcal._io import write_json_atomic
    from fastcal.calibrate import fit_temperature
    from fastcal.metrics import reliability_diagram
    from fastcal.metrics.functional import check_probabilities
    from fastcal.runs.folder import check_output_file
    from fastcal.runs.predictions import load_predictions

    check_report_arguments(args)
    for option, value in (("--output", args.output), ("--plot", args.plot)):
        if value is not None:
            check_output_file(value, option)

    loaded = load_predictions(args.pred_file)
    scores, labels, kind, file_temperature = loaded[:4]
    if file_temperature != 1.0:  # a run's saved predictions: report them as the run did
        scores = scores / file_temperature
    calibration = None
    if args.temperature_from:
        calib_scores, calib_labels, calib_kind, _ = load_predictions(
            args.temperature_from, "--temperature-from"
        )[:4]
        check_tensor("--temperature-from", calib_scores, ndim=2, floating=True)
        calibration = (_to_logits(calib_scores, calib_kind), calib_labels, calib_kind)
    probs = _to_probs(scores, kind)
    check_probabilities(probs, labels, name=kind if kind == "probs" else "softmax(logits)")
    progress = not args.no_progress and len(labels) >= LARGE_FILE_ROWS

    report = {
        "file": str(args.pred_file),
        "input": kind,
        "count": len(labels),
        "num_classes": probs.shape[1],
        "n_bins": args.n_bins,
        "temperature": file_temperature,
    }
    report.update(report_metrics(probs, labels, args, progress, loaded.proximity))
    if args.plot:
        reliability_diagram(
            probs, labels, n_bins=args.n_bins, path=args.plot, title=Path(args.pred_file).name
        )
        report["plot"] = str(args.plot)

    if calibration is not None:
        calib_logits, calib_labels, calib_kind = calibration
        temperature = fit_temperature(calib_logits, calib_labels, assume_logits=calib_kind == "probs")
        scaled = _to_probs(_to_logits(scores, kind) / temperature, "logits")
        after = {
            "calibration_file": str(args.temperature_from),
            "calibration_count": len(calib_labels),
            "temperature": temperature,
        }
        after.update(report_metrics(scaled, labels, args, progress, loaded.proximity))
        if args.plot:
            plot = Path(args.plot)
            after_plot = plot.with_name(f"{plot.stem}_ts{plot.suffix or '.png'}")
            title = f"{Path(args.pred_file).name}, T = {temperature:.3g}"
            reliability_diagram(scaled, labels, n_bins=args.n_bins, path=after_plot, title=title)
            after["plot"] = str(after_plot)
        report["temperature_scaling"] = after

    text = json.dumps(report, indent=2)
    if args.output:
        write_json_atomic(args.output, report)
    sys.stdout.write(text + "\n")
    return 0
