"""prepare_data writes exact, deterministic, atomically installed token files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lite_llm.data import BPETokenizer, ByteTokenizer, prepare_data, resolve_source
from lite_llm.data import prepare as prepare_mod
from lite_llm.errors import DataError

from .conftest import assert_one_sentence, make_text


def read_tokens(path: Path, dtype: str = "uint16") -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


def test_counts_and_contents_match_the_documents(corpus, tmp_path):
    index = prepare_data({"notes": str(corpus)}, tmp_path / "out", ByteTokenizer(), val_fraction=0.25, seed=3)
    out = tmp_path / "out"
    assert json.loads((out / "index.json").read_text()) == index
    assert index["format_version"] == 1
    assert index["tokenizer"] == {"kind": "byte", "vocab_size": 256, "eos_id": None}
    entry = index["domains"]["notes"]
    assert entry["source"] == str(corpus) and entry["split_by"] == "document" and entry["dtype"] == "uint16"

    texts = {d.key: d.text for d in resolve_source(str(corpus))}
    keys = json.loads((out / "notes" / "documents.json").read_text())
    assert keys["train"] and keys["val"]
    assert not set(keys["train"]) & set(keys["val"])
    assert set(keys["train"]) | set(keys["val"]) == set(texts)
    for split in ("train", "val"):
        expected = b"\n\n".join(texts[k].encode("utf-8") for k in keys[split])
        tokens = read_tokens(out / "notes" / f"{split}.bin")
        assert tokens.tobytes() == np.frombuffer(expected, np.uint8).astype(np.uint16).tobytes()
        stats = entry[split]
        assert stats["documents"] == len(keys[split])
        assert stats["tokens"] == len(tokens) == (out / "notes" / f"{split}.bin").stat().st_size // 2
        assert stats["bytes"] == len(expected)
    assert ByteTokenizer().decode(read_tokens(out / "notes" / "val.bin")).count("doc ") > 0
    assert (out / "tokenizer" / "lite_tokenizer.json").is_file()


def test_deterministic_across_runs(corpus, single_file, tmp_path):
    sources = {"notes": str(corpus), "book": [str(single_file)]}
    index = prepare_data(sources, tmp_path / "a", ByteTokenizer(), val_fraction=0.2, seed=1)
    assert index["domains"]["book"]["source"] == [str(single_file)]
    prepare_data(sources, tmp_path / "b", ByteTokenizer(), val_fraction=0.2, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) >= 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # Another seed holds out other documents (checked over a few seeds: any single one could tie).
    splits = set()
    for seed in range(4):
        prepare_data({"notes": str(corpus)}, tmp_path / "c", ByteTokenizer(), val_fraction=0.2, seed=seed)
        splits.add(tuple(json.loads((tmp_path / "c" / "notes" / "documents.json").read_text())["val"]))
    assert len(splits) > 1


def test_single_document_is_split_by_position(single_file, tmp_path):
    index = prepare_data({"book": str(single_file)}, tmp_path / "out", ByteTokenizer(), val_fraction=0.1)
    entry = index["domains"]["book"]
    text = single_file.read_bytes()
    train = read_tokens(tmp_path / "out" / "book" / "train.bin").astype(np.uint8).tobytes()
    val = read_tokens(tmp_path / "out" / "book" / "val.bin").astype(np.uint8).tobytes()
    assert entry["split_by"] == "position"
    assert train + val == text
    assert abs(len(val) / len(text) - 0.1) < 0.01
    assert entry["train"]["bytes"] + entry["val"]["bytes"] == len(text)
    val.decode("utf-8")  # cut at a character boundary


def test_every_split_gets_a_document(corpus, tmp_path):
    index = prepare_data({"notes": str(corpus)}, tmp_path / "out", ByteTokenizer(), val_fraction=0.001)
    assert index["domains"]["notes"]["val"]["documents"] == 1
    index = prepare_data({"notes": str(corpus)}, tmp_path / "out", ByteTokenizer(), val_fraction=0.999)
    assert index["domains"]["notes"]["train"]["documents"] == 1


def test_max_bytes_truncates_by_document(tmp_path):
    index = prepare_data({"code": "stdlib-code"}, tmp_path / "out", ByteTokenizer(), max_bytes_per_domain=200_000)
    entry = index["domains"]["code"]
    docs = entry["train"]["documents"] + entry["val"]["documents"]
    assert entry["truncated"] and docs >= 2
    assert entry["train"]["bytes"] + entry["val"]["bytes"] - 2 * (docs - 2) <= 200_000


def test_bpe_prepare_matches_the_tokenizer(corpus, tmp_path):
    tok = BPETokenizer.train(texts=[make_text(i, 40) for i in range(10)], vocab_size=400)
    index = prepare_data({"notes": str(corpus)}, tmp_path / "out", tok, val_fraction=0.3)
    texts = {d.key: d.text for d in resolve_source(str(corpus))}
    keys = json.loads((tmp_path / "out" / "notes" / "documents.json").read_text())
    sep = tok.encode("\n\n") + [tok.eos_id]
    for split in ("train", "val"):
        expected: list[int] = []
        for i, key in enumerate(keys[split]):
            expected += (sep if i else []) + tok.encode(texts[key])
        assert read_tokens(tmp_path / "out" / "notes" / f"{split}.bin").tolist() == expected
        assert index["domains"]["notes"][split]["tokens"] == len(expected)
    assert index["tokenizer"]["kind"] == "bpe"
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert prepare_mod.token_dtype(400) == np.uint16 and prepare_mod.token_dtype(70_000) == np.uint32


def test_interrupted_prepare_leaves_nothing(corpus, single_file, tmp_path, monkeypatch):
    real = prepare_mod._write_split
    calls = []

    def crash_on_third_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_write_split", crash_on_third_file)
    parent = tmp_path / "datasets"
    with pytest.raises(KeyboardInterrupt):
        prepare_data({"notes": str(corpus), "book": str(single_file)}, parent / "out", ByteTokenizer())
    assert list(parent.iterdir()) == []

    # An existing dataset survives an interrupted replacement untouched.
    monkeypatch.setattr(prepare_mod, "_write_split", real)
    prepare_data({"notes": str(corpus)}, parent / "out", ByteTokenizer())
    before = {p: p.read_bytes() for p in (parent / "out").rglob("*") if p.is_file()}
    calls.clear()
    monkeypatch.setattr(prepare_mod, "_write_split", crash_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        prepare_data({"notes": str(corpus), "book": str(single_file)}, parent / "out", ByteTokenizer())
    assert [p.name for p in parent.iterdir()] == ["out"]
    assert {p: p.read_bytes() for p in (parent / "out").rglob("*") if p.is_file()} == before


def test_replaces_a_dataset_but_not_other_folders(corpus, single_file, tmp_path):
    prepare_data({"notes": str(corpus)}, tmp_path / "out", ByteTokenizer())
    index = prepare_data({"book": str(single_file)}, tmp_path / "out", ByteTokenizer())
    assert list(index["domains"]) == ["book"] and not (tmp_path / "out" / "notes").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError) as err:
        prepare_data({"book": str(single_file)}, tmp_path / "mine", ByteTokenizer())
    assert_one_sentence(str(err.value))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    "sources, kwargs",
    [
        ({}, {}),
        ({"bad name": "stdlib-docs"}, {}),
        ({"tokenizer": "stdlib-docs"}, {}),
        ({"docs": "stdlib-docs"}, {"val_fraction": 0.0}),
        ({"docs": "stdlib-docs"}, {"max_bytes_per_domain": 0}),
        ({"docs": "/no/such/folder"}, {}),
    ],
)
def test_bad_input_is_one_sentence(sources, kwargs, tmp_path):
    with pytest.raises(DataError) as err:
        prepare_data(sources, tmp_path / "out", ByteTokenizer(), **kwargs)
    assert_one_sentence(str(err.value))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
