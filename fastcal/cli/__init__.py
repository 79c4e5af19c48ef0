"""The ``fastcal`` command: one sub-command per module of this package.

Each module named in ``COMMANDS`` defines ``add_arguments(parser)`` and ``run(args) -> int``; only the
module of the command being run is imported, so ``fastcal --help`` stays fast. Errors a user can fix
(bad arguments, missing files, offline weights) end the command with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "metrics": ("fastcal.cli.metrics", "calibration report (JSON) for a file of predictions"),
    "demo": ("fastcal.cli.demo", "the main job: every method on the embedded testbed, one table"),
    "zeroshot": ("fastcal.cli.zeroshot", "zero-shot accuracy and calibration on a dataset"),
    "train": ("fastcal.cli.train", "prompt tuning (CoOp, CoCoOp, KgCoOp, MaPLe, VPT)"),
    "eval": ("fastcal.cli.evaluate", "evaluate a saved prompt on new classes and other datasets"),
    "tpt": ("fastcal.cli.tpt", "test-time prompt tuning (TPT, C-TPT, FPP init)"),
    "finetune": ("fastcal.cli.finetune", "robust fine-tuning (FT, FLYP, CaRot)"),
    "wise": ("fastcal.cli.wise", "WiSE-FT weight interpolation sweep"),
    "wordnet": ("fastcal.cli.wordnet", "make WordNet 3.0 readable by nltk (for DOR outliers)"),
}


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
            p.set_defaults(run=module.run)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"fastcal {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
