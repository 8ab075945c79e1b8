"""Tokenizers round-trip any text exactly and save in formats other tools read."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from lite_llm.data import BPETokenizer, ByteTokenizer, get_tokenizer, load_tokenizer
from lite_llm.errors import DataError

from .conftest import assert_one_sentence, make_text

HARD_TEXTS = [
    "",
    " ",
    "plain ascii",
    "naïve café, Straße, Ærøskøbing",
    "東京都 日本語のテキスト",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "  leading and trailing spaces  \r\n\ttabs\x00nul\x7f\u200b",
    "literal <|endoftext|> marker",
    "مرحبا بالعالم — עברית",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(texts=[make_text(i, 40) for i in range(20)], vocab_size=400, min_frequency=2)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.num_bytes(text) == len(ids)


def test_byte_decode_replaces_invalid_utf8_and_rejects_non_bytes():
    tok = ByteTokenizer()
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # a character cut in half
    with pytest.raises(DataError) as err:
        tok.decode([65, 300])
    assert_one_sentence(str(err.value))


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "lite_tokenizer.json").read_text())
    assert meta["kind"] == "byte" and meta["vocab_size"] == 256
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bpe_round_trips_arbitrary_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges(bpe):
    text = make_text(3, 10)
    assert bpe.kind == "bpe"
    assert 256 < bpe.vocab_size <= 400
    assert bpe.eos_id is not None
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_bpe_save_load_identical_and_readable_by_tokenizers(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "lite_tokenizer.json").read_text())
    assert meta == {"kind": "bpe", "vocab_size": bpe.vocab_size, "eos_id": bpe.eos_id, "eos_ids": [bpe.eos_id]}

    loaded = load_tokenizer(tmp_path / "tok")
    oracle = HFTokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))  # independent reader
    for text in HARD_TEXTS + [make_text(7, 3)]:
        ids = bpe.encode(text)
        assert loaded.encode(text) == ids
        assert oracle.encode(text, add_special_tokens=False).ids == ids
        assert oracle.decode(ids, skip_special_tokens=False) == text
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    # A bare tokenizer.json, as a file or in a folder without lite_tokenizer.json, loads too.
    assert get_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).encode("café") == bpe.encode("café")
    (tmp_path / "tok" / "lite_tokenizer.json").unlink()
    assert get_tokenizer(str(tmp_path / "tok")).vocab_size == bpe.vocab_size


def test_bpe_train_from_files(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(make_text(i, 30), encoding="utf-8")
    tok = BPETokenizer.train(files=files, vocab_size=300)
    assert tok.decode(tok.encode("unseen ✓ text")) == "unseen ✓ text"
    with pytest.raises(DataError):
        BPETokenizer.train(texts=["abc"], vocab_size=100)
    with pytest.raises(DataError):
        BPETokenizer.train(files=[tmp_path / "missing.txt"])


def test_tokenizer_loading_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "lite_tokenizer.json").write_text("{not json")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "tokenizer.json").write_text("{}")
    cases = [
        lambda: load_tokenizer(tmp_path / "missing"),
        lambda: load_tokenizer(tmp_path / "empty"),
        lambda: load_tokenizer(tmp_path / "corrupt"),
        lambda: load_tokenizer(tmp_path / "badjson"),
        lambda: get_tokenizer("no-such-tokenizer"),
    ]
    for case in cases:
        with pytest.raises(DataError) as err:
            case()
        assert_one_sentence(str(err.value))
