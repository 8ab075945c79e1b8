"""Bits per byte over the bytes of the tokens actually scored (an oracle: their decoded text).

Was: the loss of the scored windows was divided by the whole validation split's average bytes
per token, off by 6% for SmolLM2 on a README's paragraphs and moving with --batches."""

from __future__ import annotations

import math

import pytest

from lite_llm.data import ByteTokenizer, TokenData, prepare_data
from lite_llm.data.tokenizer import BPETokenizer
from lite_llm.train.validation import score_domains

TEXT = "Ünïcode façade — naïve café 東京 " * 40 + "plain ascii words that repeat " * 80


@pytest.fixture(scope="module", params=["bpe", "byte"])
def data(request, tmp_path_factory) -> TokenData:
    root = tmp_path_factory.mktemp("bytes")
    for i in range(6):
        (root / f"d{i}.txt").write_text(TEXT[i * 50 :] + TEXT[: i * 50])
    tok = BPETokenizer.train(texts=[TEXT], vocab_size=400) if request.param == "bpe" else ByteTokenizer()
    prepare_data({"text": str(root / "d*.txt")}, root / "data", tok, val_fraction=0.34)
    return TokenData(root / "data")


def test_the_bytes_of_the_whole_split_are_those_of_its_source_text(data):
    """The oracle: data preparation counted the split's UTF-8 bytes from the documents' text."""
    import numpy as np
    import torch

    tokens = torch.from_numpy(np.asarray(data._array("text", "val"), dtype=np.int64))
    assert data.bytes_of(tokens.reshape(1, -1)) == data.index["domains"]["text"]["val"]["bytes"]


@pytest.mark.parametrize("batches", [1, 3])
def test_bpb_divides_by_the_scored_tokens_text(data, batches):
    nats = 1.7  # a constant loss per token: the figure is then nats / ln 2 / (bytes / tokens)
    score = score_domains(lambda batch: nats, data, ["text"], batch_size=2, seq_len=48, max_batches=batches)["text"]
    targets = [batch[:, 1:] for batch in data.val_batches("text", 2, 48, batches)]
    text_bytes = sum(data.bytes_of(t) for t in targets)
    tokens = sum(t.numel() for t in targets)
    assert score.tokens == tokens
    assert score.bpb == pytest.approx(nats / math.log(2) * tokens / text_bytes, rel=1e-12)
    if isinstance(data.tokenizer, BPETokenizer):  # multi-byte tokens: the split's average is not the scored tokens'
        assert text_bytes / tokens != pytest.approx(data.bytes_per_token("text", "val"), rel=1e-3)
