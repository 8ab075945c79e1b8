"""OpenAI's request fields beyond the basics, through the real ``openai`` client against the real
server (uvicorn on 127.0.0.1), each value checked against an independent oracle: logprobs
against the log-softmax of a cache-free full forward of prompt + generated tokens; presence
and frequency penalties and logit_bias against a slow reference loop that applies OpenAI's
closed-form rule by hand; echo against the prompt itself.  Also: an unknown model is a 404,
a field the server does not implement is a 400 naming it, NaN is refused in words."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from lite_llm.checkpoint import load_checkpoint
from lite_llm.data.tokenizer import render_chat
from lite_llm.generate import generate_ids

openai = pytest.importorskip("openai")
TOL = dict(abs=1e-5, rel=1e-5)


@pytest.fixture(scope="module")
def reference(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt)
    return loaded.model.eval(), loaded.tokenizer


def _full_logprobs(model, ids) -> torch.Tensor:
    """log_softmax of one forward of the whole sequence, no KV cache: (len(ids), V)."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().log_softmax(-1)


def _ids(reference, prompt_ids, n, **kwargs) -> list[int]:
    model, tok = reference
    return list(generate_ids(model, prompt_ids, n, eos_ids=tok.eos_ids, **kwargs))


def _text(tok, ids) -> str:
    return tok.decode([i for i in ids if i not in tok.eos_ids], skip_special_tokens=True)


# ------------------------------------------------------------------------------ logprobs
def test_completion_logprobs_are_the_full_forwards_log_softmax(reference, client):
    model, tok = reference
    prompt = "def add"
    p = tok.encode_prompt(prompt)
    got = client.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0.9, seed=3, logprobs=3)
    ids = _ids(reference, p, 12, temperature=0.9, seed=3)
    choice = got.choices[0]
    choice_lp = choice.logprobs
    assert got.usage.completion_tokens == len(ids) == len(choice_lp.tokens)
    assert choice.text == _text(tok, ids)
    assert choice_lp.tokens == [tok.decode([i]) for i in ids]
    assert choice_lp.text_offset == [len(tok.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]
    lp = _full_logprobs(model, p + ids)
    for i, token in enumerate(ids):
        row = lp[len(p) - 1 + i]
        assert choice_lp.token_logprobs[i] == pytest.approx(float(row[token]), **TOL)
        top = choice_lp.top_logprobs[i]
        values, best = torch.topk(row, 3)
        expected: dict[str, float] = {}
        for b, v in zip(best.tolist(), values.tolist()):
            expected.setdefault(tok.decode([b]), v)  # two tokens with one text (say U+FFFD): the likelier's
        expected.setdefault(tok.decode([token]), float(row[token]))  # the sampled one is always listed
        assert top.keys() == expected.keys()
        assert all(top[k] == pytest.approx(v, **TOL) for k, v in expected.items())


def test_chat_logprobs_and_top_logprobs(reference, client):
    model, tok = reference
    messages = [{"role": "user", "content": "Hello"}]
    p = tok.encode(render_chat(tok, messages))
    got = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    ids = _ids(reference, p, 10, temperature=0)
    content = got.choices[0].logprobs.content
    assert got.choices[0].message.content == _text(tok, ids)
    assert [c.token for c in content] == [tok.decode([i]) for i in ids] and len(content) == got.usage.completion_tokens
    lp = _full_logprobs(model, p + ids)
    for i, (entry, token) in enumerate(zip(content, ids)):
        row = lp[len(p) - 1 + i]
        assert entry.logprob == pytest.approx(float(row[token]), **TOL)
        if "\ufffd" not in entry.token:  # a whole character or more: the text's bytes
            assert entry.bytes == list(entry.token.encode())
        values, best = torch.topk(row, 2)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([int(b)]) for b in best]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), **TOL)
    # a piece of a character has its own byte(s): together they are the reply's text
    shown = [e for e, t in zip(content, ids) if t not in tok.eos_ids]
    assert bytes(sum((e.bytes for e in shown), [])).decode("utf-8", errors="replace") == got.choices[0].message.content
    plain = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == got.choices[0].message.content


def test_streamed_logprobs_are_the_whole_responses_split_over_the_chunks(client):
    kwargs = dict(model="chat", prompt="class Point", max_tokens=20, temperature=0.8, seed=7, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(c.choices[0].logprobs, field) for c in chunks), []) == getattr(whole, field), field
    # a stop string: tokens held back and the stop's own tokens still have their entries, in order
    text = client.completions.create(model="chat", prompt="The", max_tokens=20, temperature=0).choices[0].text
    stop = text[6:8]
    kw = dict(model="chat", prompt="The", max_tokens=20, temperature=0, stop=[stop], logprobs=0)
    cut = client.completions.create(**kw)
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text == text[: text.index(stop)]
    tokens = sum((c.choices[0].logprobs.tokens for c in streamed if c.choices and c.choices[0].logprobs), [])
    assert tokens == cut.choices[0].logprobs.tokens and len(tokens) == cut.usage.completion_tokens
    chat = dict(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
    whole_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    pieces = [c.choices[0].logprobs.content for c in client.chat.completions.create(stream=True, **chat) if c.choices and c.choices[0].logprobs]
    assert [e.model_dump() for e in sum(pieces, [])] == [e.model_dump() for e in whole_chat]


# ------------------------------------------------------------------------------ echo
def test_echo_with_max_tokens_0_scores_the_prompt(reference, client, chat_server):
    model, tok = reference
    prompt = "The quick brown fox"
    p = tok.encode_prompt(prompt)
    got = client.completions.create(model="chat", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = got.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and got.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [tok.decode([i]) for i in p]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    lp = _full_logprobs(model, p)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([float(lp[i - 1, p[i]]) for i in range(1, len(p))], **TOL)
    assert choice.logprobs.text_offset == [len(tok.decode(p[:i])) for i in range(len(p))]
    # lm-evaluation-harness's local-completions loglikelihood request: token ids, batched
    body = {"model": "chat", "prompt": [p], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    raw = httpx.post(chat_server[0] + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    assert raw["text"] == prompt and raw["logprobs"]["token_logprobs"] == choice.logprobs.token_logprobs
    # echo with generation: prompt then completion, tokens and offsets running on
    ids = _ids(reference, p, 5, temperature=0)
    more = client.completions.create(model="chat", prompt=prompt, max_tokens=5, echo=True, logprobs=0, temperature=0).choices[0]
    assert more.text == prompt + _text(tok, ids)
    assert more.logprobs.tokens == [tok.decode([i]) for i in p + ids]
    assert more.logprobs.text_offset[len(p):] == [len(prompt) + len(tok.decode(ids[:i])) for i in range(len(ids))]
    full = _full_logprobs(model, p + ids)
    assert more.logprobs.token_logprobs[1:] == pytest.approx([float(full[i - 1, (p + ids)[i]]) for i in range(1, len(p + ids))], **TOL)
    # echo without logprobs, and streamed
    assert client.completions.create(model="chat", prompt=prompt, max_tokens=0, echo=True).choices[0].text == prompt
    streamed = list(client.completions.create(model="chat", prompt=prompt, max_tokens=5, echo=True, temperature=0, stream=True, logprobs=0))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == more.text
    assert streamed[0].choices[0].text == prompt  # the echo comes first, with the prompt's entries
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert sum((getattr(c.choices[0].logprobs, field) for c in streamed if c.choices and c.choices[0].logprobs), []) == getattr(more.logprobs, field)


# ------------------------------------------------------------------------------ penalties and bias
def _reference_loop(model, tok, prompt_ids, n, *, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy decoding with a full forward per token, OpenAI's rule applied by hand:
    logit[j] += bias[j]; logit[j] -= frequency * count[j] + presence * (count[j] > 0), counting
    the generated tokens only."""
    ids, out = list(prompt_ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().tolist()
        for j, b in (bias or {}).items():
            logits[j] += b
        for j in set(out):
            logits[j] -= frequency * out.count(j) + presence
        token = max(range(len(logits)), key=logits.__getitem__)
        out.append(token)
        if token in tok.eos_ids:
            break
        ids.append(token)
    return out


@pytest.mark.parametrize("settings", [
    dict(presence=1.5), dict(frequency=1.0), dict(presence=-0.5, frequency=0.7), dict(bias=True), dict(bias=True, frequency=2.0),
], ids=["presence", "frequency", "both", "logit_bias", "bias+frequency"])
def test_penalties_and_logit_bias_equal_a_reference_loop(reference, client, settings):
    model, tok = reference
    prompt = "def add"
    p = tok.encode_prompt(prompt)
    plain = _reference_loop(model, tok, p, 24)
    bias = {plain[0]: -100.0, plain[1]: 4.0, tok.encode(" x")[0]: 3.0} if settings.get("bias") else None
    want = _reference_loop(model, tok, p, 24, presence=settings.get("presence", 0.0), frequency=settings.get("frequency", 0.0), bias=bias)
    assert want != plain  # the settings matter
    got = client.completions.create(
        model="chat", prompt=prompt, max_tokens=24, temperature=0, logprobs=0,
        presence_penalty=settings.get("presence", 0.0), frequency_penalty=settings.get("frequency", 0.0),
        logit_bias={str(k): v for k, v in bias.items()} if bias else None,
    ).choices[0]
    assert got.logprobs.tokens == [tok.decode([i]) for i in want]
    assert got.text == _text(tok, want)


def test_sampled_penalties_are_those_of_generate_ids(reference, client):
    """Seeded sampling with every setting at once: the server's text is generate_ids' (the
    invariant the engine keeps), and streamed is whole."""
    model, tok = reference
    kwargs = dict(temperature=0.9, seed=21, presence_penalty=0.6, frequency_penalty=0.4, logit_bias={"40": 2.5, "41": -100})
    p = tok.encode_prompt("Hello")
    ids = _ids(reference, p, 30, temperature=0.9, seed=21, presence_penalty=0.6, frequency_penalty=0.4, logit_bias={40: 2.5, 41: -100.0})
    whole = client.completions.create(model="chat", prompt="Hello", max_tokens=30, **kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="chat", prompt="Hello", max_tokens=30, stream=True, **kwargs) if c.choices)
    assert whole.choices[0].text == streamed == _text(tok, ids) and 41 not in ids


# ------------------------------------------------------------------------------ refusals
def test_an_unknown_model_is_a_404(chat_server, client):
    for call in (lambda: client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2),
                 lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        assert caught.value.body["type"] == "invalid_request_error"
        assert "`gpt-4o` does not exist" in caught.value.message and "`chat`" in caught.value.message
    assert httpx.post(chat_server[0] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30).json()["model"] == "chat"


def test_unimplemented_fields_are_400_naming_the_field(client):
    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = [
        ("n", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, n=2)),
        ("best_of", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, best_of=2)),
        ("suffix", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, suffix="end")),
        ("response_format", lambda: client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, response_format={"type": "json_object"})),
        ("tools", lambda: client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, tools=[tool])),
        ("tool_choice", lambda: client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, tool_choice="required")),
        ("functions", lambda: client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, functions=[tool["function"]])),
        ("function_call", lambda: client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, function_call="auto")),
        ("logprobs", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, logprobs=6)),
        ("top_logprobs", lambda: client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, top_logprobs=3)),
        ("max_tokens", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=0)),
        ("logit_bias", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, logit_bias={"99999": 1})),
        ("logit_bias", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, logit_bias={"5": 101})),
        ("logit_bias", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, logit_bias={"five": 1})),
        ("presence_penalty", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, presence_penalty=2.5)),
        ("frequency_penalty", lambda: client.completions.create(model="chat", prompt="hi", max_tokens=2, frequency_penalty=-3)),
    ]
    for field, call in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.param == field and field in caught.value.message, (field, caught.value.message)
        assert caught.value.message.count(". ") == 0  # one sentence
    # the defaults of those fields are accepted, and the server still serves
    ok = client.chat.completions.create(model="chat", messages=msgs, max_tokens=2, temperature=0, response_format={"type": "text"},
                                        tool_choice="none", extra_body={"suffix": None, "metadata": {"run": "a"}})
    assert ok.usage.completion_tokens >= 1
    assert client.completions.create(model="chat", prompt="hi", max_tokens=2, best_of=1, extra_body={"min_p": None}).usage.completion_tokens >= 1


@pytest.mark.parametrize("field, value, words", [
    ("temprature", 0, "field 'temprature' is not supported by this server (it would be ignored); did you mean 'temperature'?"),
    ("ignore_eos", True, "field 'ignore_eos' is not supported by this server (it would be ignored); remove it"),
    ("min_p", 0.1, "field 'min_p' is not supported"),
    ("best_of", 1, "field 'best_of' is not supported"),  # a completions field sent to chat
])
def test_a_field_the_server_would_ignore_is_a_400_naming_it(client, field, value, words):
    """Was: a 200 that ignored it: a typo'd temperature sampled at 1, ignore_eos stopped at the end of the turn."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={field: value})
    assert caught.value.param == field and words in caught.value.message, caught.value.message


def test_a_user_message_without_content_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user"}], max_tokens=2)
    assert caught.value.param == "messages.0.content" and "messages[0] has no content" in caught.value.message


def test_wrong_types_are_refused_not_converted(chat_server, client):
    """OpenAI refuses a value of the wrong type; pydantic's lax mode would have read "yes" as
    true, true as 1 and [true, false] as token ids."""
    completions, chat = chat_server[0] + "/v1/completions", chat_server[0] + "/v1/chat/completions"
    for url, body, param, words in [
        (completions, {"prompt": "hi", "max_tokens": 2, "stream": "yes"}, "stream", "valid boolean"),
        (completions, {"prompt": "hi", "max_tokens": True}, "max_tokens", "valid integer"),
        (completions, {"prompt": "hi", "max_tokens": 2.0}, "max_tokens", "valid integer"),
        (completions, {"prompt": "hi", "temperature": True}, "temperature", "valid number"),
        (completions, {"prompt": [True, False], "max_tokens": 2}, "prompt", "a list of token ids"),
        (completions, {"prompt": ["a", 1], "max_tokens": 2}, "prompt", "a list of strings"),
        (completions, {"prompt": "hi", "stop": 5}, "stop", "a string, a list of strings or null"),
        (completions, {"prompt": "hi", "max_tokens": 2, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages", "type 'image_url' are not supported"),
        (chat, {"messages": [{"role": "user", "content": 5}]}, "messages", "'messages.0.content' must be a string, a list of text parts"),
    ]:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)
        assert ".str'" not in error["message"] and "list[" not in error["message"]  # no pydantic union tags
    # floats may be written as integers, as JSON has one number type
    assert client.completions.create(model="chat", prompt="hi", max_tokens=2, temperature=1, top_p=1).usage.completion_tokens >= 1


def test_nan_and_infinite_numbers_are_refused_in_words(chat_server):
    url = chat_server[0] + "/v1/completions"
    for field, value, words in [
        ("temperature", float("nan"), "temperature must be a finite number between 0 and 2, got nan"),
        ("temperature", float("inf"), "temperature must be a finite number between 0 and 2, got inf"),
        ("top_p", float("nan"), "top_p must be a finite number greater than 0 and at most 1, got nan"),
        ("presence_penalty", float("nan"), "presence_penalty must be a finite number between -2 and 2, got nan"),
        ("frequency_penalty", float("-inf"), "frequency_penalty must be a finite number between -2 and 2, got -inf"),
        ("repetition_penalty", float("nan"), "repetition_penalty must be a finite number between 0.01 and 100, got nan"),
    ]:
        body = json.dumps({"prompt": "hi", "max_tokens": 2, field: value})  # Python's json writes NaN / Infinity
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == {"message": words, "type": "invalid_request_error", "param": field, "code": None}
    bias = httpx.post(url, content=json.dumps({"prompt": "hi", "logit_bias": {"5": float("nan")}}), headers={"Content-Type": "application/json"})
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
    nulls = httpx.post(url, json={"prompt": "hi", "max_tokens": 2, "temperature": None, "top_p": None, "presence_penalty": None}, timeout=30)
    assert nulls.status_code == 200  # null is the default, as OpenAI reads it
