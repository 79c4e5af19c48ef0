"""Make WordNet 3.0 readable by nltk, for DOR's outlier vocabulary; print where it is.

If nltk already finds its 'wordnet' corpus, nothing is written. Otherwise the corpus is built from
Debian's WordNet files (packages wordnet-base and wordnet-sense-index, in /usr/share/wordnet) into an
nltk_data folder: --nltk-data DIR, else <sys.prefix>/nltk_data (the virtual environment) when writable,
else ~/nltk_data. With neither, the command says how to get one and exits 2.

Examples:
  sudo apt-get install -y wordnet-base wordnet-sense-index && fastcal wordnet
  fastcal wordnet --nltk-data ~/nltk_data
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nltk-data",
        metavar="DIR",
        help="the nltk_data folder to look in and build into (default: nltk's path)",
    )
    parser.add_argument(
        "--source",
        metavar="DIR",
        default=None,
        help="the WordNet database files to build from (default /usr/share/wordnet)",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild from --source even when nltk finds a corpus"
    )


def run(args: argparse.Namespace) -> int:
    from fastcal.outliers.wordnet import (
        DEBIAN_WORDNET_DIR,
        build_nltk_data,
        corpus_location,
        ensure_wordnet,
        find_wordnet,
    )

    source = args.source if args.source is not None else DEBIAN_WORDNET_DIR
    found = None if args.rebuild else find_wordnet(args.nltk_data)
    if found is not None:
        print(f"WordNet for nltk: {corpus_location(found)} (already there)")
        return 0
    if args.rebuild:
        build_nltk_data(args.nltk_data, source=source)
    root = ensure_wordnet(args.nltk_data, source=source)
    print(f"WordNet for nltk: {corpus_location(root)} (built from {source})")
    return 0
