"""WordNet set-up: lexnames, the Debian -> nltk_data builder, nltk reading the tree, and the errors."""

import gzip
import re
from pathlib import Path

import nltk.data
import pytest

from fastcal.outliers.wordnet import (
    LEXNAMES,
    NLTK_WORDNET_FILES,
    WordNetNotFoundError,
    build_nltk_data,
    corpus_location,
    ensure_wordnet,
    find_wordnet,
    lexnames_text,
    open_wordnet,
)

LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")


def test_lexnames_has_the_45_files_in_wordnet_order():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45 == len(LEXNAMES)
    fields = [line.split("\t") for line in lines]
    assert [int(f[0]) for f in fields] == list(range(45))
    assert all(len(f[0]) == 2 for f in fields)
    # Spot values of lexnames(5WN); category: 1 noun, 2 verb, 3 adjective, 4 adverb.
    assert fields[0] == ["00", "adj.all", "3"]
    assert fields[2] == ["02", "adv.all", "4"]
    assert fields[3] == ["03", "noun.Tops", "1"]
    assert fields[28] == ["28", "noun.time", "1"]
    assert fields[29] == ["29", "verb.body", "2"]
    assert fields[43] == ["43", "verb.weather", "2"]
    assert fields[44] == ["44", "adj.ppl", "3"]


@pytest.mark.skipif(not LEXNAMES_MAN_PAGE.is_file(), reason="Debian's WordNet man pages are not installed")
def test_lexnames_match_debians_man_page():
    text = gzip.decompress(LEXNAMES_MAN_PAGE.read_bytes()).decode()
    table = re.findall(r"^(\d\d)\t(\S+)", text, flags=re.MULTILINE)
    assert [name for _, name in table] == list(LEXNAMES)


def test_builder_writes_every_file_nltk_needs(fake_debian, tmp_path):
    corpus = build_nltk_data(tmp_path / "nd", source=fake_debian)
    assert corpus == tmp_path / "nd" / "corpora" / "wordnet"
    assert sorted(p.name for p in corpus.iterdir()) == sorted(NLTK_WORDNET_FILES)
    assert (corpus / "lexnames").read_text() == lexnames_text()
    assert not any(p.is_symlink() for p in corpus.iterdir())
    assert (corpus / "data.noun").read_bytes() == (fake_debian / "data.noun").read_bytes()
    # No staging folder is left behind.
    assert [p.name for p in (tmp_path / "nd" / "corpora").iterdir()] == ["wordnet"]


def test_nltk_reads_the_built_tree(fake_nltk_data, fake_wordnet):
    reader = open_wordnet(fake_nltk_data)
    synsets = list(reader.all_synsets("n"))
    assert [s.lemma_names() for s in synsets] == [s[2] for s in fake_wordnet.NOUN_SYNSETS]
    dog = reader.synset("dog.n.01")
    assert dog.lemma_names() == ["dog", "domestic_dog", "Canis_familiaris"]
    assert dog.lexname() == "noun.animal"
    # Pointers go through the byte offsets: hypernyms and hyponyms resolve to the right lines.
    assert dog.hypernyms() == [reader.synset("canine.n.01")]
    assert sorted(s.name() for s in reader.synset("canine.n.01").hyponyms()) == ["dog.n.01", "wolf.n.01"]
    # morphy and the exception list: plural lookups and the sense order of index.noun.
    assert [s.name() for s in reader.synsets("dogs", pos="n")] == ["dog.n.01", "frank.n.01"]
    assert reader.synsets("geese", pos="n") == [reader.synset("goose.n.01")]


def test_plain_nltk_reader_works_on_the_tree(fake_nltk_data, monkeypatch):
    """The full reader (with its sense-index mapping) reads the tree as ``nltk.corpus.wordnet`` would."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(fake_nltk_data)])
    root = nltk.data.find("corpora/wordnet")
    with pytest.warns(UserWarning, match="multilingual"):
        reader = WordNetCorpusReader(root, None)
    assert reader.get_version() == "3.0"
    assert reader.synset("cat.n.01").lemma_names() == ["cat", "true_cat"]


def test_find_and_ensure_use_an_existing_corpus(fake_nltk_data, tmp_path):
    root = find_wordnet(fake_nltk_data)
    assert Path(corpus_location(root)) == fake_nltk_data / "corpora" / "wordnet"
    # Present already: nothing is built from the (missing) source.
    again = ensure_wordnet(fake_nltk_data, source=tmp_path / "nowhere")
    assert corpus_location(again) == corpus_location(root)
    assert str(fake_nltk_data) in nltk.data.path


def test_ensure_builds_from_debians_files_when_nltk_has_none(fake_debian, tmp_path):
    target = tmp_path / "fresh"
    assert find_wordnet(target) is None
    root = ensure_wordnet(target, source=fake_debian)
    assert Path(corpus_location(root)) == target / "corpora" / "wordnet"
    assert open_wordnet(target).synset("bus.n.01").lemma_names() == ["bus", "autobus", "coach"]


def test_incomplete_corpus_folder_does_not_count(fake_nltk_data):
    (fake_nltk_data / "corpora" / "wordnet" / "lexnames").unlink()
    assert find_wordnet(fake_nltk_data) is None


def test_neither_way_gives_one_error_naming_both_ways_out(tmp_path):
    with pytest.raises(WordNetNotFoundError) as info:
        ensure_wordnet(tmp_path / "empty", source=tmp_path / "no-debian")
    message = str(info.value)
    assert "apt-get install -y wordnet-base wordnet-sense-index" in message
    assert "nltk.downloader wordnet" in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)


def test_builder_names_missing_source_files(tmp_path, fake_wordnet):
    source = fake_wordnet.write_fake_wordnet(tmp_path / "partial", with_sense_index=False)
    with pytest.raises(WordNetNotFoundError, match=r"index\.sense"):
        build_nltk_data(tmp_path / "nd", source=source)
    assert not (tmp_path / "nd" / "corpora" / "wordnet").exists()


def test_rebuild_replaces_an_existing_corpus(fake_nltk_data, fake_debian):
    corpus = fake_nltk_data / "corpora" / "wordnet"
    (corpus / "stale-file").write_text("x")
    build_nltk_data(fake_nltk_data, source=fake_debian)
    assert not (corpus / "stale-file").exists()
    assert sorted(p.name for p in corpus.iterdir()) == sorted(NLTK_WORDNET_FILES)
