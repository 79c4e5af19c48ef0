"""A sweep's results in the layout of the papers' tables, and ECE against accuracy as a figure.

  fastcal table sweeps/tcpt                        # Markdown on stdout
  fastcal table sweeps/tcpt --format latex --output table.tex
  fastcal table sweeps/tcpt --format csv           # one line per row, dataset and metric

One row per combination of the grid's axes other than seed and dataset (method x loss, ...), one column
group per dataset plus their average; each value is the mean and sample standard deviation over the seeds
that finished, in percent (base / new accuracy and ECE, HM and the HM of the ECEs for prompt tuning;
accuracy and ECE for test-time tuning; ID and mean OOD for fine-tuning). A value over fewer seeds than
the grid has is marked (k/N), one over none is "missing". A footer records the ECE bins and these
conventions. The figure (--figure, default DIR/ece_accuracy.png) plots each row's ECE against its
accuracy with the spread over seeds as error bars.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="DIR", help="a sweep folder (fastcal sweep --output)")
    parser.add_argument("--format", default="md", help="md (default), csv or latex")
    parser.add_argument("--output", metavar="FILE", help="write the table to FILE (default: print it)")
    parser.add_argument("--figure", metavar="PNG", help="the figure's path (default DIR/ece_accuracy.png)")
    parser.add_argument("--no-figure", action="store_true", help="no figure")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastcal._io import write_bytes_atomic
    from fastcal.runs.folder import check_output_file
    from fastcal.runs.table import build_table, ece_accuracy_figure, format_table

    table = build_table(args.sweep)
    text = format_table(table, args.format)
    if args.output is not None:
        write_bytes_atomic(check_output_file(args.output, "--output"), text.encode())
        print(f"table in {args.output}")
    else:
        print(text, end="")
    if not args.no_figure:
        figure = args.figure or Path(args.sweep) / "ece_accuracy.png"
        print(f"figure in {ece_accuracy_figure(table, check_output_file(figure, '--figure'))}")
    return 0
