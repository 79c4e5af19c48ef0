"""The ``fastcal`` command: one sub-command per module of this package.

Each module named in ``COMMANDS`` defines ``add_arguments(parser)`` and ``run(args) -> int``; only the
module of the command being run is imported, so ``fastcal --help`` stays fast. Errors a user can fix
(bad arguments, missing or unreadable files, offline weights, a refused output folder) end the command
with one line on stderr and exit 2; ``--debug`` (or ``FASTCAL_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

COMMANDS: dict[str, tuple[str, str]] = {
    "metrics": ("fastcal.cli.metrics", "calibration report (JSON) for a file of predictions"),
    "calibrate": ("fastcal.cli.calibrate", "post-hoc calibration of saved predictions (TS ... DAC)"),
    "demo": ("fastcal.cli.demo", "the main job: every method on the embedded testbed, one table"),
    "zeroshot": ("fastcal.cli.zeroshot", "zero-shot accuracy and calibration on a dataset"),
    "train": ("fastcal.cli.train", "prompt tuning (CoOp, CoCoOp, KgCoOp, MaPLe, VPT)"),
    "eval": ("fastcal.cli.evaluate", "evaluate a saved prompt on new classes and other datasets"),
    "tpt": ("fastcal.cli.tpt", "test-time prompt tuning (TPT, C-TPT, FPP init)"),
    "finetune": ("fastcal.cli.finetune", "robust fine-tuning (FT, FLYP, CaRot)"),
    "wise": ("fastcal.cli.wise", "WiSE-FT weight interpolation sweep"),
    "sweep": ("fastcal.cli.sweep", "a grid of runs (datasets x methods x losses x seeds), resumable"),
    "table": ("fastcal.cli.table", "a sweep's results: mean and std over seeds, papers' layout, a figure"),
    "wordnet": ("fastcal.cli.wordnet", "make WordNet 3.0 readable by nltk (for DOR outliers)"),
}


class UsageError(ValueError):
    """An error the user can fix; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``fastcal CMD: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fastcal", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also FASTCAL_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            module = importlib.import_module(module_name)
            p = sub.add_parser(
                name,
                help=help_text,
                description=module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            module.add_arguments(p)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            p.set_defaults(run=module.run)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def one_line(error: BaseException) -> str:
    """The message of a user error on one line. An error raised in a DataLoader worker arrives wrapped
    with the worker's traceback: its last line is the original message."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FASTCAL_DEBUG", "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as err:  # bad arguments, missing or unreadable files, refused folders
        if debug:
            raise
        print(f"fastcal {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
