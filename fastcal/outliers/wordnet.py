"""Making WordNet 3.0 readable by nltk, from nltk's own corpus or from Debian's packages.

nltk (3.10) reads WordNet only from an nltk_data directory (``<nltk_data>/corpora/wordnet/``, or the
``wordnet.zip`` its downloader installs), searched along ``nltk.data.path`` (``$NLTK_DATA``,
``~/nltk_data``, ``<sys.prefix>/nltk_data``, ``/usr/share/nltk_data``, ...). Its reader
(``nltk.corpus.reader.wordnet.WordNetCorpusReader``) opens the fifteen files of ``NLTK_WORDNET_FILES``
and needs ``lexnames``, the table of the 45 lexicographer files (``lexnames(5WN)``: "NN<TAB>name<TAB>
syntactic category", category 1 noun, 2 verb, 3 adjective, 4 adverb).

Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages install the same WordNet 3.0 database in
``/usr/share/wordnet`` without ``lexnames``. ``build_nltk_data`` turns them into an nltk_data tree
(copies of the files, about 36 MB, plus a written ``lexnames``), so plain ``nltk.corpus.wordnet``
works too. Links would not do: nltk 3.10 (``nltk.pathsec``) resolves every path it opens, refuses one
outside its data folders (a symbolic link into ``/usr/share/wordnet``) and refuses a file with more than
one hard link.

``ensure_wordnet`` is what fastcal calls: nltk's corpus when present; else the tree built from Debian's
files (in ``<sys.prefix>/nltk_data`` when writable, else ``~/nltk_data``); else ``WordNetNotFoundError``
naming both ways out.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

# The files nltk's WordNetCorpusReader declares (its ``_FILES``); ``lexnames`` is the one Debian lacks.
NLTK_WORDNET_FILES = (
    "cntlist.rev",
    "lexnames",
    "index.sense",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)

# WordNet 3.0's lexicographer files in file-number order (lexnames(5WN), Princeton's ``dict/lexnames``).
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetNotFoundError(FileNotFoundError):
    """WordNet 3.0 is neither an nltk corpus nor installed from Debian's packages."""


def lexnames_text() -> str:
    """The ``lexnames`` file: ``"NN\\t<lexicographer file>\\t<category>\\n"`` for the 45 files."""
    return "".join(
        f"{number:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
        for number, name in enumerate(LEXNAMES)
    )


def default_nltk_data_dir() -> Path:
    """Where fastcal puts the nltk_data tree: ``<sys.prefix>/nltk_data`` when writable (a virtual
    environment), else ``~/nltk_data``; nltk searches both."""
    prefix_dir = Path(sys.prefix) / "nltk_data"
    probe = prefix_dir if prefix_dir.exists() else Path(sys.prefix)
    if os.access(probe, os.W_OK):
        return prefix_dir
    return Path.home() / "nltk_data"


def _search_paths(nltk_data: str | os.PathLike | None) -> list[str] | None:
    """``[nltk_data]``, now on ``nltk.data.path`` too (nltk opens files only under those folders)."""
    if nltk_data is None:
        return None
    import nltk.data

    folder = str(Path(nltk_data).expanduser().resolve())
    if folder not in nltk.data.path:
        nltk.data.path.append(folder)
    return [folder]


def find_wordnet(nltk_data: str | os.PathLike | None = None) -> Any | None:
    """nltk's path pointer to the ``wordnet`` corpus (a folder or inside ``wordnet.zip``), or None.

    Searches ``nltk_data`` only when given (and appends it to ``nltk.data.path``, nltk's list of the
    folders it may read), else ``nltk.data.path``. A folder missing one of the files nltk needs does
    not count.
    """
    import nltk.data

    try:
        root = nltk.data.find("corpora/wordnet", paths=_search_paths(nltk_data))
    except LookupError:
        return None
    if isinstance(root, nltk.data.FileSystemPathPointer):
        folder = Path(root.path)
        if any(not (folder / name).is_file() for name in NLTK_WORDNET_FILES):
            return None
    return root


def corpus_location(root: Any) -> str:
    """Where an nltk path pointer points: a folder, or ``<zip file>/<entry>``."""
    zipfile = getattr(root, "zipfile", None)
    if zipfile is not None:
        return f"{zipfile.filename}/{root.entry}"
    return str(root.path)


def debian_wordnet_files(source: str | os.PathLike = DEBIAN_WORDNET_DIR) -> list[str]:
    """The files of ``NLTK_WORDNET_FILES`` (``lexnames`` aside) missing from ``source``."""
    source = Path(source)
    return [name for name in NLTK_WORDNET_FILES if name != "lexnames" and not (source / name).is_file()]


def build_nltk_data(
    target: str | os.PathLike | None = None,
    *,
    source: str | os.PathLike = DEBIAN_WORDNET_DIR,
) -> Path:
    """Build ``<target>/corpora/wordnet`` from the WordNet files in ``source``; return that folder.

    Each file is copied and ``lexnames`` is written. The folder is assembled under a temporary name
    and renamed into place, so a reader never sees half of it; an existing ``corpora/wordnet`` is
    replaced.
    """
    source = Path(source).resolve()
    missing = debian_wordnet_files(source)
    if missing:
        raise WordNetNotFoundError(
            f"source: expected the WordNet 3.0 database files in {source} (Debian packages wordnet-base "
            f"and wordnet-sense-index), got {len(missing)} missing: {', '.join(missing)}"
        )
    corpora = Path(target if target is not None else default_nltk_data_dir()) / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet.", dir=corpora))
    try:
        for name in NLTK_WORDNET_FILES:
            if name == "lexnames":
                (staging / name).write_text(lexnames_text(), encoding="ascii")
            else:
                shutil.copyfile(source / name, staging / name)
        staging.chmod(0o755)
        final = corpora / "wordnet"
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def not_found_message(nltk_data: str | os.PathLike | None, source: str | os.PathLike) -> str:
    import nltk.data

    searched = [str(nltk_data)] if nltk_data is not None else list(nltk.data.path)
    return (
        f"WordNet 3.0: expected nltk's 'wordnet' corpus (searched {', '.join(searched)}) or Debian's "
        f"WordNet files in {source}, got neither. Either install Debian's packages "
        "(`apt-get install -y wordnet-base wordnet-sense-index`, then `fastcal wordnet`), or nltk's "
        "corpus (`python -m nltk.downloader wordnet`, needs internet); or pass your own word list"
    )


def ensure_wordnet(
    nltk_data: str | os.PathLike | None = None, *, source: str | os.PathLike = DEBIAN_WORDNET_DIR
) -> Any:
    """nltk's path pointer to a readable WordNet corpus, building the nltk_data tree when needed.

    Order: the ``wordnet`` corpus in ``nltk_data`` (or along ``nltk.data.path`` when None); else one
    built from Debian's files in ``source`` into ``nltk_data`` (or ``default_nltk_data_dir()``); else
    ``WordNetNotFoundError``.
    """
    root = find_wordnet(nltk_data)
    if root is not None:
        return root
    if debian_wordnet_files(source):
        raise WordNetNotFoundError(not_found_message(nltk_data, source))
    target = Path(nltk_data) if nltk_data is not None else default_nltk_data_dir()
    build_nltk_data(target, source=source)
    root = find_wordnet(target)
    if root is None:
        raise WordNetNotFoundError(
            f"WordNet 3.0: expected a readable corpus in {target} after building it, got none"
        )
    return root


def open_wordnet(
    nltk_data: str | os.PathLike | None = None, *, source: str | os.PathLike = DEBIAN_WORDNET_DIR
) -> Any:
    """An nltk ``WordNetCorpusReader`` over the corpus ``ensure_wordnet`` finds (or builds).

    The reader skips the sense-key mapping to other WordNet versions (used only by the multilingual
    Open Multilingual Wordnet functions, which fastcal does not call), so opening it reads the lemma
    indices and exception lists only.
    """
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _EnglishWordNetReader(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            return None

    root = ensure_wordnet(nltk_data, source=source)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return _EnglishWordNetReader(root, None)
