"""Built-in corpora and user-named files become sorted, stable documents."""

from __future__ import annotations

import pytest

from lite_llm.data import BUILTIN_SOURCES, resolve_source
from lite_llm.errors import DataError

from .conftest import assert_one_sentence

TEST_DIRS = {"test", "tests", "idle_test", "site-packages"}


def test_builtin_sources_are_described():
    assert set(BUILTIN_SOURCES) == {"stdlib-code", "stdlib-docs"}
    assert all(isinstance(d, str) and d for d in BUILTIN_SOURCES.values())


def test_stdlib_code_is_real_code_without_tests():
    docs = resolve_source("stdlib-code")
    keys = [d.key for d in docs]
    assert len(docs) > 500
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(k.endswith(".py") and not k.startswith("/") for k in keys)
    assert not [k for k in keys if TEST_DIRS & set(k.split("/")[:-1])]
    assert "json/decoder.py" in keys
    assert sum(len(d.text) for d in docs) > 5_000_000
    assert sum("def " in d.text for d in docs) > 400


def test_stdlib_docs_is_english_prose():
    docs = resolve_source("stdlib-docs")
    keys = [d.key for d in docs]
    assert len(docs) > 20 and keys == sorted(keys)
    words = " ".join(d.text for d in docs).lower().split()
    assert len(words) > 10_000
    for word in ("the", "is", "of", "and"):
        assert words.count(word) > 500


def test_folder_keeps_text_skips_binary_hidden_and_empty(corpus):
    docs = resolve_source(str(corpus))
    keys = [d.key for d in docs]
    assert len(docs) == 12
    assert keys == sorted(keys)
    assert "nested/deeper/doc00.txt" in keys and "doc02.rst" in keys
    assert not [k for k in keys if k.startswith(".git") or k in ("image.dat", "empty.txt")]
    assert next(d.text for d in docs if d.key == "doc02.rst") == (corpus / "doc02.rst").read_text(encoding="utf-8")


def test_file_and_glob(corpus):
    (doc,) = resolve_source(str(corpus / "doc02.rst"))
    assert doc.key == "doc02.rst"
    md = resolve_source(str(corpus / "**" / "*.md"))
    assert [d.key for d in md] == ["doc05.md", "nested/deeper/doc09.md", "nested/doc01.md"]


def test_source_errors_are_one_sentence(corpus, tmp_path):
    (tmp_path / "only_binary").mkdir()
    (tmp_path / "only_binary" / "x.dat").write_bytes(b"\x00\x01\x02")
    for spec in (
        str(tmp_path / "missing"),
        str(tmp_path / "only_binary"),
        str(tmp_path / "*.nothing"),
        "stdlib-cod",
    ):
        with pytest.raises(DataError) as err:
            resolve_source(spec)
        assert_one_sentence(str(err.value))


def test_a_folder_mixing_latin1_and_utf8_keeps_both_and_names_the_latin1_file(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_utf8.txt").write_text("naïve café", encoding="utf-8")
    (folder / "b_latin1.txt").write_bytes("façade über".encode("latin-1"))
    (folder / "c_binary.dat2").write_bytes(bytes(range(1, 32)) * 10 + b"\xff")
    with pytest.warns(UserWarning, match=r"b_latin1\.txt is not UTF-8; read it as Latin-1"):
        docs = resolve_source(str(folder))
    assert {d.key: d.text for d in docs} == {"a_utf8.txt": "naïve café", "b_latin1.txt": "façade über"}
