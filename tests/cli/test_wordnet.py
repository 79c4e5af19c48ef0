"""`fastcal wordnet`: builds the nltk_data tree from Debian-style files, reports an existing one, and
fails with one line naming both ways out."""

import importlib.util
from pathlib import Path

import nltk.data
import pytest

from fastcal.cli import main


@pytest.fixture(autouse=True)
def _nltk_path(monkeypatch):
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))


@pytest.fixture
def fake_debian(tmp_path):
    path = Path(__file__).parents[1] / "outliers" / "fake_wordnet.py"
    spec = importlib.util.spec_from_file_location("fake_wordnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_fake_wordnet(tmp_path / "usr-share-wordnet")


def test_builds_then_reports_the_corpus(fake_debian, tmp_path, capsys):
    target = tmp_path / "nltk_data"
    assert main(["wordnet", "--nltk-data", str(target), "--source", str(fake_debian)]) == 0
    corpus = target / "corpora" / "wordnet"
    assert capsys.readouterr().out.strip() == f"WordNet for nltk: {corpus} (built from {fake_debian})"
    assert (corpus / "lexnames").is_file()

    assert main(["wordnet", "--nltk-data", str(target), "--source", str(tmp_path / "gone")]) == 0
    assert capsys.readouterr().out.strip() == f"WordNet for nltk: {corpus} (already there)"

    (corpus / "extra").write_text("x")
    assert main(["wordnet", "--nltk-data", str(target), "--source", str(fake_debian), "--rebuild"]) == 0
    assert not (corpus / "extra").exists()


def test_without_wordnet_one_line_and_exit_2(tmp_path, capsys):
    code = main(["wordnet", "--nltk-data", str(tmp_path / "empty"), "--source", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcal wordnet: error: WordNet 3.0")
    assert "\n" not in err
    assert "apt-get install -y wordnet-base wordnet-sense-index" in err
    assert "nltk.downloader wordnet" in err
