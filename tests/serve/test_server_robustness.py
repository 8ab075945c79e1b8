"""The real server under real use, as vLLM's OpenAI server is used: clients that leave
mid-stream, a dozen mixed requests at once against the same requests sent alone, stop strings
that span tokens, bodies that are not what they should be (not JSON, too deep, not Unicode,
sent as a form, 10 MB), paths that do not exist, a prompt that takes seconds to tokenize, and a
second Ctrl-C while requests are in flight.  Every server test has its own deadline."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lite_llm import build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.data import ByteTokenizer
from lite_llm.generate import generate_ids

from .conftest import chat_tokenizer, free_port, serve_in_thread, tiny_two_tier, wait_healthy

openai = pytest.importorskip("openai")
SRC = Path(__file__).resolve().parents[2] / "src"
TS = ["all", "only:tier_1b", "only:tier_10b", ["tier_1b", "tier_10b"]]


@pytest.fixture(scope="module")
def reference(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt)
    return loaded.model.eval(), loaded.tokenizer


@pytest.fixture(scope="module")
def long_chat_ckpt(tmp_path_factory) -> Path:
    """The BPE chat checkpoint's tokenizer on a 4,096-token model: streams that last."""
    bpe = chat_tokenizer()
    model = build_model(tiny_two_tier(bpe.vocab_size, max_seq_len=4096), seed=8)
    return save_checkpoint(tmp_path_factory.mktemp("robust") / "longchat", model, tokenizer=bpe)


@pytest.fixture(scope="module")
def long_byte_ckpt(tmp_path_factory) -> Path:
    model = build_model(tiny_two_tier(256, max_seq_len=4096), seed=7)
    return save_checkpoint(tmp_path_factory.mktemp("robust") / "long", model, tokenizer=ByteTokenizer())


class _Records(logging.Handler):
    """Every record uvicorn and asyncio log while a test runs (they do not propagate to root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_Records":
        for name in ("uvicorn", "uvicorn.error", "asyncio"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *_) -> None:
        for name in ("uvicorn", "uvicorn.error", "asyncio"):
            logging.getLogger(name).removeHandler(self)

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info or r.levelno >= logging.ERROR]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"].count(". ") == 0
    return error


def _ask(client, spec: dict, model: str = "chat") -> tuple[str, list, int, int]:
    """(text, finish reasons, prompt tokens, completion tokens) of one request, streamed or whole."""
    kw = dict(model=model, max_tokens=spec["max_tokens"], temperature=spec["temperature"], stop=spec.get("stop"),
              extra_body={"tier_set": spec["tier_set"]})
    if spec.get("seed") is not None:
        kw["seed"] = spec["seed"]
    chat = spec["chat"]
    create = client.chat.completions.create if chat else client.completions.create
    if chat:
        kw["messages"] = [{"role": "user", "content": spec["prompt"]}]
    else:
        kw["prompt"] = spec["prompt"]
    if spec["stream"]:
        chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, reasons, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens
    reply = create(**kw)
    text = reply.choices[0].message.content if chat else reply.choices[0].text
    return text, [reply.choices[0].finish_reason], reply.usage.prompt_tokens, reply.usage.completion_tokens


# ------------------------------------------------------------------------------ already right, kept so
def _ascii_bias(tok) -> dict[int, float]:
    """A logit bias to the multi-character printable ASCII tokens: the random model's text is
    then readable, streams a piece per token (no byte waiting for the rest of a character), and
    its tokens are several characters long."""
    return {i: 50.0 for i in range(tok.vocab_size) if len(s := tok.decode([i], skip_special_tokens=True)) >= 2 and s.isascii() and s.isprintable()}


def test_a_dozen_mixed_requests_at_once_each_get_what_they_get_alone(long_chat_ckpt):
    """12 requests at once (chat and completions, streamed and whole, greedy and seeded, four
    TierSets, some with stop strings) while two other clients ask for 3,000 tokens and leave
    after 2 chunks: each answer, usage and finish reason equals the same request sent alone, the
    leavers' rows are dropped within a few tokens, and nothing is logged as an error."""
    readable = {str(k): v for k, v in _ascii_bias(load_checkpoint(long_chat_ckpt).tokenizer).items()}
    specs = [dict(chat=i % 3 == 0, stream=i % 2 == 0, max_tokens=12 + 3 * i, temperature=[0.0, 0.9, 0.0, 1.3][i % 4],
                  seed=None if i % 4 == 0 else 500 + i, tier_set=TS[i % 4], stop=["e t", "oo"] if i % 5 == 0 else None,
                  prompt=f"prompt {i} " * (1 + i % 3) + "Hello, how")
             for i in range(12)]
    with serve_in_thread(long_chat_ckpt, max_batch=8, max_queue=16) as (base, engine):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        alone = [_ask(client, s, "longchat") for s in specs]
        results: dict[int, tuple] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(len(specs) + 2)
        generated = engine.stats.generated_tokens

        def run(i: int) -> None:
            try:
                start.wait(10)
                results[i] = _ask(client, specs[i], "longchat")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def leave() -> None:
            try:
                start.wait(10)
                stream = client.completions.create(model="longchat", prompt="The", max_tokens=3000, temperature=0, stream=True,
                                                   logit_bias=readable)
                for n, _ in enumerate(stream, 1):
                    if n == 2:
                        break
                stream.close()  # the openai client's way of leaving mid-stream
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        with _Records() as logged:
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))] + [threading.Thread(target=leave) for _ in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            deadline = time.monotonic() + 10
            while engine.stats.requests_cancelled < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert not errors, errors
        for i, spec in enumerate(specs):
            assert results[i] == alone[i], f"request {i}: {spec}"
        assert engine.stats.requests_cancelled == 2 and engine.running == 0 and engine.queue_depth == 0
        left = engine.stats.generated_tokens - generated - sum(r[3] for r in alone)  # what the two leavers cost
        assert 4 <= left < 300
        assert logged.tracebacks() == []


def test_streamed_stop_strings_across_token_boundaries(reference, client):
    """Stop strings that begin inside one token and end inside a later one: the streamed pieces
    never show any of the stop string, their concatenation is the whole reply, finish_reason is
    "stop", and completion_tokens counts up to the token that completed the stop string (the
    tokenizer counts it independently).  A bias to multi-character ASCII tokens makes the text
    readable."""
    model, tok = reference
    bias = _ascii_bias(tok)
    prompt_ids = tok.encode_prompt("def add")
    ids = list(generate_ids(model, prompt_ids, 40, temperature=0.0, logit_bias=bias))
    full = tok.decode(ids, skip_special_tokens=True)
    ends = [len(tok.decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))]
    checked = 0
    for b in sorted(set(ends))[2:8]:
        stop = full[b - 2 : b + 3]  # two characters of one token, three of what follows
        cut = full.index(stop)
        needed = next(j + 1 for j in range(len(ids)) if stop in tok.decode(ids[: j + 1], skip_special_tokens=True))
        kw = dict(model="chat", prompt="def add", max_tokens=40, temperature=0, stop=[stop], logit_bias={str(k): v for k, v in bias.items()})
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        pieces = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == whole.choices[0].text == full[:cut], stop  # so no piece ever showed a character of the stop string
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"] == [whole.choices[0].finish_reason]
        assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == needed
        assert whole.usage.prompt_tokens == len(prompt_ids)
        checked += 1
    assert checked == 6
    # the text ends with the start of a stop string that never comes: held back while it might,
    # sent when max_tokens ends the reply, whose finish_reason is then "length"
    tail = full[-2:] + "\x00"
    kw = dict(model="chat", prompt="def add", max_tokens=40, temperature=0, stop=[tail], logit_bias={str(k): v for k, v in bias.items()})
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    never = client.completions.create(**kw)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == never.choices[0].text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"] == [never.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == never.usage.completion_tokens == 40


def test_prompts_at_the_context_edge(chat_server, client):
    """The context is 128: 127 prompt tokens leave room for exactly one (the default
    max_tokens shrinks to it); 128 or one token too many asked is a 400 naming the room."""
    url = chat_server[0] + "/v1/completions"
    edge = client.completions.create(model="chat", prompt=[5] * 127, temperature=0)
    assert (edge.usage.prompt_tokens, edge.usage.completion_tokens, edge.choices[0].finish_reason) == (127, 1, "length")
    full = _error(httpx.post(url, json={"prompt": [5] * 128, "max_tokens": 1}), 400)
    assert full["param"] == "prompt" and "128 tokens" in full["message"] and full["code"] == "context_length_exceeded"
    chat_full = _error(httpx.post(chat_server[0] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello " * 200}]}), 400)
    assert chat_full["param"] == "messages" and chat_full["code"] == "context_length_exceeded" and "context is 128" in chat_full["message"]
    over = _error(httpx.post(url, json={"prompt": [5] * 100, "max_tokens": 29}), 400)
    assert over["code"] == "context_length_exceeded" and "at most 28" in over["message"]
    huge = _error(httpx.post(url, json={"prompt": "hi", "max_tokens": 10**30}), 400)
    assert huge["param"] == "max_tokens"
    filled = client.completions.create(model="chat", prompt=[5] * 100, max_tokens=28, temperature=0)
    assert filled.usage.completion_tokens + filled.usage.prompt_tokens <= 128 and filled.usage.prompt_tokens == 100


# ------------------------------------------------------------------------------ fixed
def test_malformed_bodies_and_paths_are_4xx_in_openais_form_and_serving_goes_on(chat_server, client, reference):
    """Were a 500 with a traceback (JSON nested past the parser's recursion limit; a lone
    surrogate escape, which the tokenizer and the JSON encoder of an error naming it choke on),
    a 200 (a JSON body sent as text/plain or as a form), or FastAPI's {"detail": ...} (an
    unknown path, a wrong method, the openai client's models.retrieve)."""
    base = chat_server[0]
    url = base + "/v1/completions"
    as_json = {"Content-Type": "application/json"}
    with _Records() as logged:
        deep = _error(httpx.post(url, content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=as_json, timeout=30), 400)
        assert deep["message"] == "the request body is nested too deeply to read as JSON"
        for body in (b'{"prompt": "hi \\ud800", "max_tokens": 2}', b'{"model": "\\udfff", "prompt": "hi"}',
                     b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'):
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            lone = _error(httpx.post(base + path, content=body, headers=as_json, timeout=30), 400)
            assert "lone surrogate" in lone["message"]
        paired = httpx.post(url, content=b'{"prompt": "hi \\ud83d\\ude00", "max_tokens": 2, "temperature": 0}', headers=as_json, timeout=30)
        assert paired.status_code == 200 and paired.json()["usage"]["prompt_tokens"] == len(reference[1].encode_prompt("hi \U0001F600"))
        good = json.dumps({"prompt": "hi", "max_tokens": 2})
        for declared in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            media = _error(httpx.post(url, content=good, headers={"Content-Type": declared}, timeout=30), 415)
            assert media["code"] == "unsupported_media_type" and declared.split(";")[0] in media["message"]
        assert _error(httpx.post(url, data={"prompt": "hi"}, timeout=30), 415)["code"] == "unsupported_media_type"
        for declared in ("application/json; charset=utf-8", "application/vnd.api+json"):
            assert httpx.post(url, content=good, headers={"Content-Type": declared}, timeout=30).json()["usage"]["completion_tokens"] == 2
        missing = _error(httpx.get(base + "/v1/nothing"), 404)
        assert missing["code"] == "not_found" and "GET /v1/nothing" in missing["message"]
        exposition = httpx.get(base + "/metrics").text  # counted by route: made-up paths add no series
        assert 'endpoint="/v1/nothing"' not in exposition and 'lite_llm_requests_total{endpoint="other",status="404"}' in exposition
        wrong = httpx.get(url)
        assert _error(wrong, 405)["message"] == "/v1/completions does not take GET; use POST" and wrong.headers["Allow"] == "POST"
        assert client.models.retrieve("chat").id == "chat" and client.models.retrieve("chat").max_model_len == 128
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.models.retrieve("gpt-4")
    assert logged.tracebacks() == []
    after = client.completions.create(model="chat", prompt="def add", max_tokens=12, temperature=0)
    model, tok = reference
    want = list(generate_ids(model, tok.encode_prompt("def add"), 12, temperature=0.0, eos_ids=tok.eos_ids))
    assert after.choices[0].text == tok.decode(want, skip_special_tokens=True) and after.usage.completion_tokens == len(want)


def test_a_10mb_body_is_413_without_being_read_and_serving_goes_on(long_byte_ckpt):
    """Was read whole and tokenized (10 M byte tokens) before its 400 for the context; now the
    Content-Length alone answers 413, and a chunked body without one is cut off at the limit.
    A body just under the limit is still read (and refused for the context it overflows)."""
    with serve_in_thread(long_byte_ckpt, max_batch=2, max_queue=2) as (base, engine):
        url = base + "/v1/completions"
        big = json.dumps({"prompt": "a" * 10_000_000, "max_tokens": 2}).encode()
        t0 = time.monotonic()
        error = _error(httpx.post(url, content=big, headers={"Content-Type": "application/json"}, timeout=30), 413)
        assert error["code"] == "request_too_large" and "4,194,304 bytes" in error["message"]

        def chunked():
            for _ in range(10):
                yield b" " * 1_000_000

        assert _error(httpx.post(url, content=chunked(), headers={"Content-Type": "application/json"}, timeout=30), 413)["code"] == "request_too_large"
        assert time.monotonic() - t0 < 10
        under = _error(httpx.post(url, json={"prompt": "a" * 4_000_000, "max_tokens": 2}, timeout=30), 400)
        assert "the prompt is 4000000 tokens" in under["message"]
        served = httpx.post(url, json={"prompt": "The", "max_tokens": 5, "temperature": 0}, timeout=30).json()
        assert served["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        assert engine.stats.requests_admitted == 1


def test_a_long_prompt_is_tokenized_without_stalling_other_streams(long_chat_ckpt):
    """A 3 MB prompt (1.5 M BPE tokens, seconds of tokenizing) used to be tokenized on the event
    loop, which also drives the engine: every stream in flight stopped for as long.  Now it is
    tokenized on a worker thread (the Rust tokenizer releases the GIL there); the other stream's
    longest pause is a small part of the time the long prompt took, and the token count in its
    400 is the one the tokenizer gives."""
    tok = load_checkpoint(long_chat_ckpt).tokenizer
    text = "a " * 1_500_000
    with serve_in_thread(long_chat_ckpt, max_batch=2, max_queue=2) as (base, engine):
        gaps: list[float] = []
        done = threading.Event()
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "The", "max_tokens": 4000, "temperature": 0, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
                last = time.monotonic()
                for n, _ in enumerate(response.iter_lines()):
                    now = time.monotonic()
                    if n > 10:
                        gaps.append(now - last)
                        started.set()
                    last = now
                    if done.is_set():
                        return

        th = threading.Thread(target=stream)
        th.start()
        assert started.wait(30)
        t0 = time.monotonic()
        refused = _error(httpx.post(base + "/v1/completions", json={"prompt": text, "max_tokens": 2}, timeout=60), 400)
        took = time.monotonic() - t0
        time.sleep(0.2)
        done.set()
        th.join(30)
        assert f"the prompt is {len(tok.encode_prompt(text))} tokens" in refused["message"]
        assert max(gaps) < took / 3, (max(gaps), took)


def _wait_port_free(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server binds
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                time.sleep(0.1)
    return False


def test_a_second_ctrl_c_ends_the_requests_in_flight_cleanly(long_byte_ckpt):
    """Ctrl-C waits for the requests in flight; the second Ctrl-C (uvicorn's "force quit") used to
    tear them down with the event loop: a 500, streams cut mid-chunk, and a traceback per
    request.  Now the engine ends them at the next token: the stream gets an error event and
    [DONE], the whole request a 503, and the server exits (0, or 130 when uvicorn re-raises the signal) without a
    traceback, its port free."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "LITE_LLM_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lite_llm.cli", "serve", str(long_byte_ckpt), "--port", str(port), "--log-level", "info"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout=60, proc=proc)
        body = {"prompt": "The", "max_tokens": 4000, "temperature": 0.0}
        whole: dict = {}
        lines: list[str] = []
        first = threading.Event()

        def ask_whole() -> None:
            whole["response"] = httpx.post(base + "/v1/completions", json=body, timeout=60)

        def ask_stream() -> None:
            with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        threads = [threading.Thread(target=ask_whole), threading.Thread(target=ask_stream)]
        for th in threads:
            th.start()
        assert first.wait(30)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first Ctrl-C waits for the requests
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
        for th in threads:
            th.join(20)
        stderr = proc.stderr.read()
        assert rc in (0, 130) and "Traceback" not in stderr and "Exception in ASGI application" not in stderr, stderr
        error = _error(whole["response"], 503)
        assert error["code"] == "shutting_down" and error["message"] == "generation failed: the server was stopped before this request finished"
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == error["message"]
        assert all("choices" in json.loads(line.removeprefix("data: ")) for line in lines[:-2])
        assert _wait_port_free(port, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
