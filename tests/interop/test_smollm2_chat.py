"""Chat generation a user expects from SmolLM2-135M-Instruct (GGUF): the turn ends at
``<|im_end|>`` (the GGUF's eos), the chat template comes along, and the reply's token ids
equal transformers' greedy ``generate`` on the exported folder with its own
``AutoTokenizer.apply_chat_template``.  Without the file (``make fetch-smollm2``) these skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint
from lite_llm.cli import app
from lite_llm.data.tokenizer import load_tokenizer, render_chat
from lite_llm.generate import generate_ids
from lite_llm.interop import export_hf, import_gguf, import_hf

GGUF = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
IM_END, IM_START = 2, 1

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent; run `make fetch-smollm2` to fetch it"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_chat")
    ckpt = import_gguf(GGUF, root / "ckpt")
    return ckpt, export_hf(ckpt, root / "hf")


@pytest.fixture(scope="module")
def transformers_reply(smollm2):
    """Prompt ids and greedy reply ids from transformers alone, on the exported folder."""
    transformers = pytest.importorskip("transformers")
    _, hf = smollm2
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    return prompt, out[0, len(prompt) :].tolist(), tok


def test_import_records_im_end_and_the_chat_template(smollm2):
    ckpt, hf = smollm2
    tok = load_tokenizer(ckpt / "tokenizer")
    assert IM_END in tok.eos_ids and tok.eos_id == IM_END
    assert tok.chat_template is not None and "<|im_end|>" in tok.chat_template
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] in (IM_END, [IM_END])
    assert (hf / "tokenizer.json").is_file() and (hf / "tokenizer_config.json").is_file()


def test_chat_reply_equals_transformers_greedy_generate(smollm2, transformers_reply):
    ckpt, _ = smollm2
    hf_prompt, hf_reply, hf_tok = transformers_reply
    loaded = load_checkpoint(ckpt)
    prompt = loaded.tokenizer.encode(render_chat(loaded.tokenizer, [{"role": "user", "content": QUESTION}]))
    assert prompt == hf_prompt
    reply = list(generate_ids(loaded.model, prompt, 40, eos_ids=loaded.tokenizer.eos_ids))
    assert reply == hf_reply
    assert reply[-1] == IM_END and len(reply) < 40  # the turn ended by itself

    result = CliRunner().invoke(app, ["generate", str(ckpt), "--chat", "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "40"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "<|im_end|>" not in result.output and "<|im_start|>" not in result.output
    assert result.stdout == hf_tok.decode(hf_reply, skip_special_tokens=True) + "\n"
    assert "Paris" in result.output


def test_hf_import_keeps_eos_and_template(smollm2, tmp_path):
    ckpt, hf = smollm2
    tok = load_tokenizer(import_hf(hf, tmp_path / "again") / "tokenizer")
    original = load_tokenizer(ckpt / "tokenizer")
    assert tok.eos_ids == original.eos_ids and tok.chat_template == original.chat_template


def test_served_chat_equals_transformers_greedy_generate(smollm2, transformers_reply):
    """`lite-llm serve` on the imported SmolLM2, asked by the real openai client, whole and
    streamed: the reply transformers gives, ended at <|im_end|> by itself, with honest usage."""
    openai = pytest.importorskip("openai")
    from tests.serve.conftest import serve_in_thread

    ckpt, _ = smollm2
    hf_prompt, hf_reply, hf_tok = transformers_reply
    want = hf_tok.decode(hf_reply, skip_special_tokens=True)
    with serve_in_thread(ckpt, model_name="smol", max_batch=2) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTION}]
        whole = client.chat.completions.create(model="smol", messages=messages, max_tokens=40, temperature=0)
        assert whole.choices[0].message.content == want and "Paris" in want
        assert whole.choices[0].finish_reason == "stop"
        assert whole.usage.prompt_tokens == len(hf_prompt) and whole.usage.completion_tokens == len(hf_reply)
        stream = client.chat.completions.create(
            model="smol", messages=messages, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == len(hf_reply)


def test_chat_carries_the_conversation_as_transformers_renders_it(smollm2, transformers_reply):
    """`lite-llm chat`, two turns: the second reply equals transformers' greedy `generate` on
    `apply_chat_template` of the whole conversation (its own first reply included)."""
    transformers = pytest.importorskip("transformers")
    ckpt, hf = smollm2
    _, first_ids, tok = transformers_reply
    first = tok.decode(first_ids, skip_special_tokens=True)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
    prompt = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    second = tok.decode(out[0, len(prompt) :], skip_special_tokens=True)
    assert "Berlin" in second

    result = CliRunner().invoke(app, ["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "40"], input=f"{QUESTION}\nAnd of Germany?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{second}\n"


def test_the_readmes_generation_example_runs_and_its_chat_reply_is_transformers(smollm2, transformers_reply, capsys):
    """README "The library": generate_text and render_chat as written, on the imported model."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The library", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "load_checkpoint(" in b)
    ckpt, _ = smollm2
    exec(compile(block.replace('"ckpt/smollm2"', repr(str(ckpt))), "README.md", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out
    _, reply, tok = transformers_reply
    want = tok.decode(reply[:32], skip_special_tokens=True)
    assert printed.endswith(want + "\n") and want.startswith("The capital of France is Paris"), (printed, want)
