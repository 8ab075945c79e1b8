"""A Hugging Face folder grown from our checkpoint keeps the chat stop tokens ``export`` writes.

``export`` and ``expand ... --format hf`` each wrote ``generation_config.json``, and only the
first listed every EOS id of the tokenizer: a chat model's folder grown in one pass lost
``<|im_end|>``, so transformers' ``generate`` ran past the end of the turn.  Here a checkpoint
whose tokenizer stops on two ids (SmolLM2's ``<|im_end|>`` and ``<|endoftext|>``) is exported
and grown, and the two folders must say the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import save_checkpoint
from lite_llm.cli import app
from lite_llm.data.tokenizer import EOS_TOKEN, BPETokenizer
from lite_llm.interop import export_hf

transformers = pytest.importorskip("transformers")

IM_END = "<|im_end|>"


def _chat_tokenizer() -> BPETokenizer:
    """A BPE tokenizer that, like SmolLM2-Instruct's, ends a turn at ``<|im_end|>`` and a text at
    ``<|endoftext|>``, the turn end listed first."""
    tok = BPETokenizer.train(texts=["hello world " * 20, "<|im_start|>user hi<|im_end|>"], vocab_size=280, min_frequency=1)
    tok.backend.add_special_tokens([IM_END])
    tok.eos_ids = [tok.backend.token_to_id(IM_END), tok.backend.token_to_id(EOS_TOKEN)]
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> tuple[Path, list[int]]:
    tok = _chat_tokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=64)
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    save_checkpoint(path, build_model(config, seed=0), tokenizer=tok)
    eos_ids = list(tok.eos_ids)
    assert len(eos_ids) == 2 and eos_ids[0] != eos_ids[1]
    return path, eos_ids


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_expand_to_hf_keeps_every_eos_id_export_writes(chat_ckpt, tmp_path):
    ckpt, eos_ids = chat_ckpt
    exported = export_hf(ckpt, tmp_path / "exported")
    grown = tmp_path / "grown"
    result = CliRunner().invoke(app, ["expand", str(ckpt), "--method", "llama_pro", "--target-layers", "4", "-o", str(grown), "--format", "hf"])
    assert result.exit_code == 0, result.output

    assert _json(exported / "generation_config.json")["eos_token_id"] == eos_ids
    assert (grown / "generation_config.json").read_bytes() == (exported / "generation_config.json").read_bytes()
    grown_config, exported_config = _json(grown / "config.json"), _json(exported / "config.json")
    assert (grown_config.pop("num_hidden_layers"), exported_config.pop("num_hidden_layers")) == (4, 2)
    assert grown_config == exported_config  # token ids and dtype too, not only the architecture

    generation = transformers.GenerationConfig.from_pretrained(grown)
    assert list(generation.eos_token_id) == eos_ids
    assert transformers.AutoConfig.from_pretrained(grown).num_hidden_layers == 4
