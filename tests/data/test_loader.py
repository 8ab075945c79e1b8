"""TokenData: memory-mapped splits, batches that are pure functions of (seed, step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lite_llm.data import ByteTokenizer, TokenData, prepare_data
from lite_llm.errors import DataError

from .conftest import assert_one_sentence


@pytest.fixture(scope="module")
def data(std_data) -> TokenData:
    return TokenData(std_data)


def split_array(data: TokenData, domain: str, split: str) -> np.ndarray:
    return np.fromfile(data.data_dir / domain / f"{split}.bin", dtype=np.uint16).astype(np.int64)


def test_opens_prepared_data(data):
    assert data.domains == ["code", "prose"]
    assert isinstance(data.tokenizer, ByteTokenizer)
    assert data.index["domains"]["code"]["source"] == "stdlib-code"
    assert data.bytes_per_token("code") == 1.0 and data.bytes_per_token("prose", "train") == 1.0
    assert data.num_tokens("prose", "val") == len(split_array(data, "prose", "val"))


def test_sample_batch_is_a_pure_function_of_seed_step_micro(data, std_data):
    weights = {"code": 1.0, "prose": 1.0}
    x, domains = data.sample_batch("train", weights, 8, 32, seed=5, step=10)
    assert x.shape == (8, 32) and x.dtype == torch.long and len(domains) == 8

    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    y, domains_y = TokenData(std_data).sample_batch("train", {"prose": 1.0, "code": 1.0}, 8, 32, seed=5, step=10)
    assert torch.equal(x, y) and domains == domains_y
    assert torch.equal(torch.get_rng_state(), torch_state)  # global RNG untouched
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()

    for other in (dict(seed=5, step=11), dict(seed=6, step=10), dict(seed=5, step=10, micro=1)):
        z, _ = data.sample_batch("train", weights, 8, 32, **other)
        assert not torch.equal(x, z), other


def test_rows_are_windows_of_their_domain(data):
    x, domains = data.sample_batch("val", {"code": 1.0, "prose": 2.0}, 16, 24, seed=0, step=0)
    for row, domain in zip(x.tolist(), domains):
        haystack = split_array(data, domain, "val").astype(np.uint8).tobytes()
        assert bytes(row) in haystack


def test_mixture_shares_follow_weights(data):
    _, domains = data.sample_batch("train", {"code": 0.3, "prose": 0.7}, 4000, 8, seed=1, step=0)
    assert abs(domains.count("code") / 4000 - 0.3) < 0.03
    _, domains = data.sample_batch("train", {"code": 0.0, "prose": 1.0}, 500, 8, seed=1, step=0)
    assert set(domains) == {"prose"}
    _, domains = data.sample_batch("train", {"code": 1.0}, 50, 8, seed=1, step=0)
    assert set(domains) == {"code"}


def test_val_batches_are_deterministic_consecutive_windows(data):
    val = split_array(data, "prose", "val")
    first = list(data.val_batches("prose", 4, 64))
    second = list(data.val_batches("prose", 4, 64))
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
    rows = torch.cat(first)
    assert rows.shape == (len(val) // 64, 64) and all(b.shape[0] <= 4 for b in first)
    assert rows.reshape(-1).tolist() == val[: rows.numel()].tolist()
    assert len(list(data.val_batches("prose", 4, 64, max_batches=2))) == 2


def test_same_batches_in_a_fresh_process_with_another_hash_seed(std_data, data):
    """Python salts str hashes per process; the split and the batches must not depend on it."""
    code = (
        "import sys; from lite_llm.data import TokenData; "
        "x, d = TokenData(sys.argv[1]).sample_batch('train', {'code': 1, 'prose': 1}, 4, 16, seed=2, step=7); "
        "print(x.sum().item(), ','.join(d))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(std_data)], env=env, capture_output=True, text=True, check=True)
    x, d = data.sample_batch("train", {"code": 1, "prose": 1}, 4, 16, seed=2, step=7)
    assert out.stdout.split() == [str(x.sum().item()), ",".join(d)]


def test_bad_requests_are_one_sentence(data, tmp_path):
    cases = {
        "unknown domain": lambda: data.sample_batch("train", {"code": 1.0, "poetry": 1.0}, 2, 8, seed=0, step=0),
        "unknown split": lambda: data.sample_batch("test", {"code": 1.0}, 2, 8, seed=0, step=0),
        "zero weights": lambda: data.sample_batch("train", {"code": 0.0}, 2, 8, seed=0, step=0),
        "negative weight": lambda: data.sample_batch("train", {"code": -1.0}, 2, 8, seed=0, step=0),
        "too short": lambda: data.sample_batch("val", {"prose": 1.0}, 2, 10**7, seed=0, step=0),
        "too short val": lambda: data.val_batches("prose", 2, 10**7),
        "unknown val domain": lambda: data.val_batches("poetry", 2, 8),
        "missing folder": lambda: TokenData(tmp_path / "nowhere"),
        "not a dataset": lambda: TokenData(tmp_path),
    }
    messages = {}
    for name, case in cases.items():
        with pytest.raises(DataError) as err:
            case()
        assert_one_sentence(str(err.value))
        messages[name] = str(err.value)
    assert "'poetry'" in messages["unknown domain"] and "code, prose" in messages["unknown domain"]
    assert "'prose'" in messages["too short"] and "seq_len" in messages["too short"]


def test_truncated_or_newer_data_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    prepare_data({"notes": str(corpus)}, out, ByteTokenizer())
    index = json.loads((out / "index.json").read_text())
    index["format_version"] = 99
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError) as err:
        TokenData(out)
    assert "newer" in str(err.value)

    prepare_data({"notes": str(corpus)}, out, ByteTokenizer())
    val = out / "notes" / "val.bin"
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(DataError) as err:
        TokenData(out)
    assert_one_sentence(str(err.value))


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_ids_outside_the_vocabulary_are_refused(corpus, tmp_path, split):
    """A token file damaged behind an intact index (same size, ids past the vocabulary) is one
    sentence when a batch reaches it, not an IndexError from the model's embedding."""
    out = tmp_path / "out"
    prepare_data({"notes": str(corpus)}, out, ByteTokenizer())
    data = TokenData(out)
    good = next(iter(data.val_batches("notes", 2, 16)))
    assert int(good.max()) < data.tokenizer.vocab_size
    path = out / "notes" / f"{split}.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[:] = 60000
    tokens.tofile(path)
    data = TokenData(out)
    with pytest.raises(DataError) as err:
        if split == "val":
            list(data.val_batches("notes", 2, 16))
        else:
            data.sample_batch("train", {"notes": 1.0}, 2, 16, seed=0, step=0)
    assert_one_sentence(str(err.value))
    assert "60000" in str(err.value) and f"{split}.bin" in str(err.value)
