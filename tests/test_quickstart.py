"""The quickstart's path end to end on a tiny budget: BPE tokenizer trained on the train split,
a two-tier model, scores in bits per byte of text, a sampled continuation, a checkpoint."""

from __future__ import annotations

import math

from rich.console import Console

from lite_llm.checkpoint import load_checkpoint
from lite_llm.data import TokenData
from lite_llm.quickstart import QUICKSTART_SAMPLE, QUICKSTART_TRAIN, run_quickstart


def test_quickstart_runs_and_scores_bytes(tmp_path):
    result = run_quickstart(tmp_path / "q", steps=2, console=Console(quiet=True), max_bytes_per_domain=150_000)
    data = TokenData(tmp_path / "q" / "data")
    assert data.tokenizer.kind == "bpe" and data.tokenizer.vocab_size > 256
    loaded = load_checkpoint(result["checkpoint"])
    assert len(loaded.config.tiers) == 2 and loaded.config.vocab_size >= data.tokenizer.vocab_size
    for domain, score in result["scores"].items():
        # bits per byte = nats per token / ln 2 / bytes per token of the scored tokens' text
        train = QUICKSTART_TRAIN
        targets = [b[:, 1:] for b in data.val_batches(domain, train["eval_batch_size"], train["seq_len"], train["eval_batches"])]
        per_token = sum(data.bytes_of(t) for t in targets) / sum(t.numel() for t in targets)
        assert math.isclose(score["bpb"], score["loss"] / math.log(2) / per_token, rel_tol=1e-3), (domain, score, per_token)
    assert result["sample"] and QUICKSTART_SAMPLE["temperature"] > 0
    again = run_quickstart(tmp_path / "q2", steps=2, console=Console(quiet=True), max_bytes_per_domain=150_000)
    assert again["sample"] == result["sample"]  # seeded: same text
