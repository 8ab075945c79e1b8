"""What a user steers generation with: every EOS id, stop strings, repetition penalty, chat
templates and --max-new-tokens — each against an independent oracle (transformers' logits
processor, a cache-free reference loop, the reference text cut by hand)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from lite_llm import ModelConfig, build_model
from lite_llm.cli import app
from lite_llm.data import ByteTokenizer
from lite_llm.data.tokenizer import BPETokenizer, load_tokenizer, render_chat
from lite_llm.errors import DataError, PromptError
from lite_llm.generate import apply_repetition_penalty, generate_ids, generate_text

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig.from_preset("tiny"), seed=4).eval()


def _reference(model, prompt, n, penalty=1.0):
    """Greedy decoding with a full forward per token and transformers' own penalty processor."""
    processors = pytest.importorskip("transformers").RepetitionPenaltyLogitsProcessor(penalty=penalty)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[:, -1]
            ids.append(int(processors(torch.tensor([ids]), logits).argmax()))
    return ids[len(prompt) :]


def test_repetition_penalty_equals_transformers_processor():
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=gen) * 3  # positive and negative logits
    seen = [3, 7, 7, 11, 49, 0, 3]
    for penalty in (1.3, 0.7):
        expected = transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty)(torch.tensor([seen]), logits.clone())
        got = apply_repetition_penalty(logits[0], seen, penalty)
        assert torch.equal(got, expected[0])
        untouched = [i for i in range(50) if i not in seen]
        assert torch.equal(got[untouched], logits[0, untouched])


def test_repetition_penalty_in_the_kv_cached_loop_matches_the_reference(model):
    prompt = [5, 17, 99, 5, 5]
    for penalty in (1.0, 1.5):
        assert list(generate_ids(model, prompt, 20, repetition_penalty=penalty)) == _reference(model, prompt, 20, penalty)
    assert list(generate_ids(model, prompt, 20, repetition_penalty=1.5)) != list(generate_ids(model, prompt, 20))


def test_any_listed_eos_id_ends_generation_and_is_not_printed(model):
    prompt = [1, 2, 3]
    full = _reference(model, prompt, 30)
    k = next(i for i in range(2, 30) if full[i] not in full[:i])
    unused = next(i for i in range(256) if i not in full)
    # The end token is yielded (as transformers' generate returns it) and nothing after it.
    assert list(generate_ids(model, prompt, 30, eos_ids=[unused, full[k]])) == full[: k + 1]
    assert list(generate_ids(model, prompt, 30, eos_ids=[unused])) == full
    text = "".join(generate_text(model, ByteTokenizer(eos_id=full[k]), bytes(prompt).decode(), 30, temperature=0.0))
    assert text == ByteTokenizer().decode(full[:k])


def test_stop_strings_cut_the_text_before_them(model):
    tok = ByteTokenizer()
    full = tok.decode(list(generate_ids(model, tok.encode("ab"), 60, temperature=1.0, seed=3)))
    start = next(i for i in range(5, len(full) - 3) if full.find(full[i : i + 3]) == i)
    stop = full[start : start + 3]
    pieces = list(generate_text(model, tok, "ab", 60, stop=["never-there", stop], temperature=1.0, seed=3))
    assert "".join(pieces) == full[:start]
    assert "".join(generate_text(model, tok, "ab", 60, stop=["never-there"], temperature=1.0, seed=3)) == full


def _bpe(tmp_path, meta_extra: dict) -> BPETokenizer:
    bpe = BPETokenizer.train(texts=["hello world " * 20, "<|im_start|>user<|im_end|>"], vocab_size=300, min_frequency=1)
    bpe.save(tmp_path / "tok")
    meta_path = tmp_path / "tok" / "lite_tokenizer.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("eos_ids")
    meta.update(meta_extra)
    meta_path.write_text(json.dumps(meta))
    return bpe


def test_old_tokenizer_metadata_with_only_eos_id_still_loads(tmp_path):
    bpe = _bpe(tmp_path, {})
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.eos_ids == (bpe.eos_id,) and loaded.eos_id == bpe.eos_id and loaded.chat_template is None


def test_eos_list_and_chat_template_round_trip(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    _bpe(tmp_path, {"eos_ids": [5, 0, 5], "chat_template": template})
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.eos_ids == (5, 0) and loaded.eos_id == 5
    assert render_chat(loaded, [{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    loaded.save(tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").eos_ids == (5, 0)
    assert load_tokenizer(tmp_path / "again").chat_template == template


def test_chat_template_is_rendered_as_transformers_renders_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}\n"
        "{% for message in messages %}\n  <|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n  {% endfor %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _bpe(tmp_path, {"chat_template": template})
    ours = load_tokenizer(tmp_path / "tok")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    theirs.chat_template = template
    messages = [{"role": "user", "content": " What is 2+2? "}]
    assert render_chat(ours, messages) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(DataError, match="user first"):
        render_chat(ours, [{"role": "system", "content": "x"}])


def test_hf_generation_config_eos_list_is_read(tmp_path):
    from lite_llm.interop.hf_import import read_hf_tokenizer

    bpe = BPETokenizer.train(texts=["hello world " * 20], vocab_size=280, min_frequency=1)
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    files = read_hf_tokenizer(tmp_path)
    assert files.tokenizer.eos_ids == (7, 3) and files.tokenizer.chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert read_hf_tokenizer(tmp_path).tokenizer.eos_ids == (9,)


def test_a_template_that_starts_with_the_bos_token_renders_it_as_transformers_does(tmp_path):
    """Llama 3, Mistral and Gemma templates open with ``{{ bos_token }}``: the imported
    tokenizer keeps the token and the rendered prompt equals apply_chat_template's."""
    transformers = pytest.importorskip("transformers")
    from lite_llm.interop.hf_import import read_hf_tokenizer

    bpe = BPETokenizer.train(texts=["hello world " * 20, "<|im_start|>user<|im_end|>"], vocab_size=300, min_frequency=1)
    bpe.backend.add_special_tokens(["<s>"])
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": template}))
    files = read_hf_tokenizer(tmp_path)
    files.tokenizer.save(tmp_path / "ours")
    ours = load_tokenizer(tmp_path / "ours")
    assert ours.bos_token == "<s>"
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(ours, messages) == theirs.apply_chat_template(messages, tokenize=False) == "<s>[user]hi"


def _fails(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert fragment in result.output and "Traceback" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 2, result.output


def test_cli_refuses_bad_counts_and_chat_without_template(tmp_path):
    for bad in ("0", "-5"):  # a count below its range: Click's usage error (exit 2), naming the option and the range
        result = runner.invoke(app, ["generate", str(tmp_path / "anything"), "--max-new-tokens", bad])
        assert result.exit_code == 2 and "--max-new-tokens" in result.output and "greater than or equal" in result.output, result.output
    _fails(["generate", str(tmp_path / "anything"), "--repetition-penalty", "0"], "--repetition-penalty must be between 0.01 and 100")
    _fails(["generate", str(tmp_path / "anything"), "--repetition-penalty", "1e-300"], "--repetition-penalty must be between 0.01 and 100")
    _fails(["generate", str(tmp_path / "anything"), "--temperature", "nan"], "--temperature must be 0 (greedy) or a finite positive number")
    for bad in ("0", "1.5", "-1"):  # 0 used to sample from everything, as no filter at all
        _fails(["generate", str(tmp_path / "anything"), "--top-p", bad], "--top-p must be above 0 and at most 1")
    ckpt = tmp_path / "ckpt"
    assert runner.invoke(app, ["init", "--preset", "tiny", "-o", str(ckpt)]).exit_code == 0
    _fails(["generate", str(ckpt), "--chat", "--prompt", "hi"], "has no chat template")


def test_gguf_eos_ids_take_eos_eot_and_the_templates_turn_end():
    from lite_llm.interop.gguf_import import gguf_eos_ids

    bpe = BPETokenizer.train(texts=["hello world " * 20], vocab_size=280, min_frequency=1)
    bpe.backend.add_special_tokens(["<|im_end|>"])
    im_end = bpe.backend.token_to_id("<|im_end|>")
    metadata = {"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 5}
    assert gguf_eos_ids(metadata, bpe) == [0, 5]
    bpe.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    assert gguf_eos_ids(metadata, bpe) == [0, 5, im_end]
    bpe.eos_ids = gguf_eos_ids({"tokenizer.ggml.eos_token_id": im_end}, bpe)
    assert bpe.eos_ids == (im_end,)  # listed once


def test_a_tiny_temperature_is_greedy_and_extreme_penalties_are_refused(model):
    """Dividing by 1e-45 made the logits inf and the draw a NaN traceback; vLLM's rule (below
    1e-5 is greedy) gives the argmax instead.  A penalty of 1e-300 overflowed the same way."""
    greedy = list(generate_ids(model, [1, 2, 3], 8, temperature=0))
    assert list(generate_ids(model, [1, 2, 3], 8, temperature=1e-45, seed=3)) == greedy
    for bad in (1e-300, 0.0, 1e9, float("nan")):
        with pytest.raises(ValueError, match="repetition_penalty must be between"):
            list(generate_ids(model, [1, 2, 3], 2, repetition_penalty=bad))
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite positive number"):
        list(generate_ids(model, [1, 2, 3], 2, temperature=float("nan")))
    for name in ("presence_penalty", "frequency_penalty"):
        for bad in (2.5, -3.0, float("nan")):
            with pytest.raises(ValueError, match=f"{name} must be between -2 and 2"):
                list(generate_ids(model, [1, 2, 3], 2, **{name: bad}))


def _llama3_style_folder(tmp_path):
    """A Hugging Face tokenizer folder whose post-processor prepends ``<|begin_of_text|>`` to
    every encoded text, as Llama 3's does."""
    from tokenizers.processors import TemplateProcessing

    bpe = BPETokenizer.train(texts=["hello world " * 20], vocab_size=280, min_frequency=1)
    bpe.backend.add_special_tokens(["<|begin_of_text|>"])
    bos = bpe.backend.token_to_id("<|begin_of_text|>")
    bpe.backend.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}))
    return bos


def test_plain_prompts_get_the_special_tokens_transformers_tokenizer_adds(tmp_path):
    """A Llama 3 model sees ``<|begin_of_text|>`` first in training; a plain prompt without it
    is another input.  transformers' ``tokenizer(prompt)`` adds it, and so do we — also for an
    empty prompt, which transformers' generate starts from the BOS."""
    transformers = pytest.importorskip("transformers")
    from lite_llm.generate import prompt_start
    from lite_llm.interop.hf_import import read_hf_tokenizer

    bos = _llama3_style_folder(tmp_path)
    read_hf_tokenizer(tmp_path).tokenizer.save(tmp_path / "ours")
    ours = load_tokenizer(tmp_path / "ours")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for prompt in ("hello world", " hello", ""):
        assert prompt_start(ours, prompt) == theirs(prompt).input_ids
    assert prompt_start(ours, "hello")[0] == bos and ours.encode("hello")[0] != bos  # training text gets none
    # A tokenizer trained here adds nothing; an empty prompt starts a document after <|endoftext|>.
    plain = BPETokenizer.train(texts=["hello world " * 20], vocab_size=280, min_frequency=1)
    assert prompt_start(plain, "hello") == plain.encode("hello")
    assert prompt_start(plain, "") == [plain.backend.token_to_id("<|endoftext|>")]
    with pytest.raises(PromptError, match="the prompt is empty and the tokenizer has no beginning- or end-of-sequence token"):
        prompt_start(ByteTokenizer(), "")


def test_special_tokens_are_left_out_of_the_generated_text_as_transformers_pipeline_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lite_llm.generate import TextStream
    from lite_llm.interop.hf_import import read_hf_tokenizer

    bos = _llama3_style_folder(tmp_path)
    ours = read_hf_tokenizer(tmp_path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = ours.encode("hello") + [bos] + ours.encode(" world hello")
    stream = TextStream(ours)
    text = "".join(stream.push(i) for i in ids) + stream.finish()
    assert text == theirs.decode(ids, skip_special_tokens=True) == "hello world hello"


def test_generate_refuses_a_prompt_longer_than_the_context_before_printing(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert runner.invoke(app, ["init", "--preset", "tiny", "-o", str(ckpt)]).exit_code == 0
    context = ModelConfig.from_preset("tiny").max_seq_len
    _fails(["generate", str(ckpt), "--prompt", "x" * (context + 5)], f"the prompt is {context + 5} tokens but the model's context is {context}")


def test_library_sampling_settings_out_of_range_are_one_sentence(model):
    """``top_k=-1`` and ``top_p=2`` were ignored silently by ``generate_ids`` (the CLI and the
    server refuse them); every range error is a :class:`SamplingError`, still a ValueError."""
    from lite_llm.errors import LiteLLMError, SamplingError

    for kwargs, said in (({"top_k": -1}, "top_k must be a whole number >= 1"), ({"top_k": 1.5}, "top_k must be a whole number >= 1"),
                         ({"top_p": 2.0}, "top_p must be above 0 and at most 1"), ({"top_p": 0.0}, "top_p must be above 0 and at most 1"),
                         ({"temperature": -1.0}, "temperature must be 0 (greedy) or a finite positive number")):
        with pytest.raises(SamplingError, match=re.escape(said)) as caught:
            list(generate_ids(model, [1, 2, 3], 2, **kwargs))
        assert isinstance(caught.value, (LiteLLMError, ValueError))
    assert len(list(generate_ids(model, [1, 2, 3], 2, top_k=1, top_p=1.0, temperature=0.5))) == 2


def test_a_stop_given_as_one_string_is_one_stop_string():
    """Was: the string's characters, each a stop: stop="Nova" cut at the first "o"."""
    model = build_model(ModelConfig.from_preset("tiny"), seed=0)
    tok = ByteTokenizer()
    full = "".join(generate_text(model, tok, "ab", 24, temperature=0))
    # a stop whose characters come earlier one by one than together (the old reading stopped there)
    stop = next(full[k : k + 3] for k in range(len(full) - 3) if min(full.find(c) for c in full[k : k + 3]) < full.find(full[k : k + 3]))
    assert "".join(generate_text(model, tok, "ab", 24, temperature=0, stop=stop)) == full[: full.index(stop)]
    assert "".join(generate_text(model, tok, "ab", 24, temperature=0, stop=[stop])) == full[: full.index(stop)]
