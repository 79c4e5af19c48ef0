"""A tiny, valid WordNet 3.0 database written from a handful of synsets, as Debian installs it.

The layout follows wndb(5WN): ``data.noun`` lines ``offset lex_filenum ss_type w_cnt word lex_id ...
p_cnt [ptr offset pos src/tgt]... | gloss`` where ``offset`` is the line's own byte offset in the
file (8 digits; nltk seeks to it and checks it), ``w_cnt`` two hex digits, ``p_cnt`` three decimal
digits; ``index.noun`` lines ``lemma pos synset_cnt p_cnt [ptr]... sense_cnt tagsense_cnt offset...``
with the senses in order of frequency; ``index.sense`` lines ``sense_key offset sense_number tag_cnt``.
Both files start with the license header lines (two leading spaces) that nltk skips.
"""

from __future__ import annotations

from pathlib import Path

HEADER = "".join(
    f"  {i} {text}  \n"
    for i, text in enumerate(
        [
            "This is a tiny test database in the WordNet 3.0 format.",
            "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.",
            "",
        ],
        start=1,
    )
)

# (key, lexicographer file number, lemmas, hypernym key or None, gloss), in data.noun order.
NOUN_SYNSETS = [
    ("entity", 3, ["entity"], None, "that which is perceived to have its own distinct existence"),
    ("canine", 5, ["canine", "canid"], "entity", "a mammal with nonretractile claws"),
    ("dog", 5, ["dog", "domestic_dog", "Canis_familiaris"], "canine", "a member of the genus Canis"),
    ("wolf", 5, ["wolf"], "canine", "a wild carnivorous mammal of the dog family"),
    ("cat", 5, ["cat", "true_cat"], "entity", "a feline mammal"),
    (
        "frank",
        13,
        ["frank", "frankfurter", "hotdog", "hot_dog", "dog", "wiener"],
        "entity",
        "a smooth sausage",
    ),
    ("mouse", 5, ["mouse"], "entity", "a small rodent"),
    ("bus", 6, ["bus", "autobus", "coach"], "entity", "a vehicle carrying many passengers"),
    ("goose", 5, ["goose"], "entity", "web-footed long-necked bird"),
    ("church", 6, ["church", "church_building"], "entity", "a place for public worship"),
]
# lemma -> synset keys in sense order (most frequent first), as index.noun lists them.
SENSE_ORDER = {"dog": ["dog", "frank"]}
NOUN_EXCEPTIONS = [("geese", "goose"), ("mice", "mouse")]

EXPECTED_TERMS = [
    "entity",
    "canine",
    "canid",
    "dog",
    "domestic dog",
    "Canis familiaris",
    "wolf",
    "cat",
    "true cat",
    "frank",
    "frankfurter",
    "hotdog",
    "hot dog",
    "wiener",
    "mouse",
    "bus",
    "autobus",
    "coach",
    "goose",
    "church",
    "church building",
]


def _data_lines(offsets: dict[str, int]) -> list[str]:
    lines = []
    for key, lexfile, lemmas, hypernym, gloss in NOUN_SYNSETS:
        words = " ".join(f"{lemma} 0" for lemma in lemmas)
        pointers = [] if hypernym is None else [f"@ {offsets[hypernym]:08d} n 0000"]
        hyponyms = [f"~ {offsets[k]:08d} n 0000" for k, _, _, h, _ in NOUN_SYNSETS if h == key]
        pointers += hyponyms
        fields = [
            f"{offsets[key]:08d}",
            f"{lexfile:02d}",
            "n",
            f"{len(lemmas):02x}",
            words,
            f"{len(pointers):03d}",
        ]
        lines.append(" ".join(fields + pointers) + f" | {gloss}  \n")
    return lines


def write_fake_wordnet(folder: Path, *, with_sense_index: bool = True) -> Path:
    """Write the Debian-like WordNet files (no ``lexnames``) into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    # Offsets do not change line lengths (8 fixed digits): lay out with zeros, then fill them in.
    offsets = {key: 0 for key, *_ in NOUN_SYNSETS}
    position = len(HEADER.encode())
    for key, line in zip(offsets, _data_lines(offsets), strict=True):
        offsets[key] = position
        position += len(line.encode())
    (folder / "data.noun").write_text(HEADER + "".join(_data_lines(offsets)), encoding="ascii")

    senses: dict[str, list[str]] = {}
    for key, _, lemmas, _, _ in NOUN_SYNSETS:
        for lemma in lemmas:
            senses.setdefault(lemma.lower(), []).append(key)
    for lemma, order in SENSE_ORDER.items():
        senses[lemma] = order
    index_lines = []
    for lemma in sorted(senses):
        keys = senses[lemma]
        synset_offsets = " ".join(f"{offsets[k]:08d}" for k in keys)
        index_lines.append(f"{lemma} n {len(keys)} 1 @ {len(keys)} 0 {synset_offsets}  \n")
    (folder / "index.noun").write_text(HEADER + "".join(index_lines), encoding="ascii")

    lexfile = {key: lexfile for key, lexfile, *_ in NOUN_SYNSETS}
    sense_lines = []
    for lemma in sorted(senses):
        for number, key in enumerate(senses[lemma], start=1):
            sense_key = f"{lemma}%1:{lexfile[key]:02d}:00::"
            sense_lines.append(f"{sense_key} {offsets[key]:08d} {number} 0\n")
    if with_sense_index:
        (folder / "index.sense").write_text("".join(sorted(sense_lines)), encoding="ascii")

    (folder / "noun.exc").write_text("".join(f"{p} {s}\n" for p, s in NOUN_EXCEPTIONS), encoding="ascii")
    for pos in ("adj", "adv", "verb"):
        (folder / f"data.{pos}").write_text(HEADER, encoding="ascii")
        (folder / f"index.{pos}").write_text(HEADER, encoding="ascii")
        (folder / f"{pos}.exc").write_text("", encoding="ascii")
    (folder / "cntlist.rev").write_text("", encoding="ascii")
    return folder
