"""The real server (uvicorn on 127.0.0.1) through the real ``openai`` client: completions and
chat, streamed and not, TierSets, seeds, agreement with `lite-llm generate`, concurrency, and
behaviour under pressure (disconnects, a full queue, bad input, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint
from lite_llm.config import TierSet
from lite_llm.data.tokenizer import render_chat
from lite_llm.generate import generate_ids, generate_text
from lite_llm.serve.engine import Job, SamplingParams

from .conftest import free_port, metric, serve_in_thread, wait_healthy

openai = pytest.importorskip("openai")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def reference(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt)
    return loaded.model.eval(), loaded.tokenizer


def _alone(reference, prompt, n, *, chat=False, **kwargs) -> str:
    model, tok = reference
    ids = tok.encode(render_chat(tok, [{"role": "user", "content": prompt}])) if chat else None
    return "".join(generate_text(model, tok, prompt, n, prompt_ids=ids, **kwargs))


def test_models_and_health(chat_server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["chat"]
    health = httpx.get(chat_server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "chat"


def test_greedy_completion_equals_lite_llm_generate(chat_ckpt, client):
    from lite_llm.cli import app

    result = CliRunner().invoke(app, ["generate", str(chat_ckpt), "--prompt", "def add", "--max-new-tokens", "24", "--temperature", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cli_text = result.stdout.split("def add", 1)[1].removesuffix("\n")
    got = client.completions.create(model="chat", prompt="def add", max_tokens=24, temperature=0)
    assert got.choices[0].text == cli_text
    assert got.usage.prompt_tokens == len(load_checkpoint(chat_ckpt).tokenizer.encode("def add"))


def test_completion_stream_equals_whole_and_generate(reference, client):
    kwargs = dict(model="chat", prompt="class Point", max_tokens=30, temperature=0.9, top_p=0.95, seed=11)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = _alone(reference, "class Point", 30, temperature=0.9, top_p=0.95, seed=11)
    assert whole.choices[0].text == text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]


def test_chat_whole_and_streamed_follow_the_template(reference, client):
    model, tok = reference
    kwargs = dict(model="chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=25, temperature=0.8, seed=4)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = _alone(reference, "Hello", 25, chat=True, temperature=0.8, seed=4)
    assert whole.choices[0].message.content == streamed == expected
    assert whole.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    prompt_ids = tok.encode(render_chat(tok, [{"role": "user", "content": "Hello"}]))
    new = list(generate_ids(model, prompt_ids, 25, temperature=0.8, seed=4, eos_ids=tok.eos_ids))
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == len(new)
    assert whole.choices[0].finish_reason == ("stop" if new[-1] in tok.eos_ids else "length")


def test_same_seed_same_text(client):
    def ask(seed):
        return client.completions.create(model="chat", prompt="The", max_tokens=30, temperature=1.0, seed=seed).choices[0].text

    a, b, c = ask(123), ask(123), ask(124)
    assert a == b and a != c


def test_stop_string_cuts_the_text(reference, client):
    base = _alone(reference, "def add", 30, temperature=0)
    stop = base[5:7]  # two characters that occur in the greedy text
    got = client.completions.create(model="chat", prompt="def add", max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == base[: base.index(stop)] and got.choices[0].finish_reason == "stop"


def test_tier_set_is_honoured_and_routes_only_to_its_tier(chat_server, reference, client):
    base = chat_server[0]
    for tier, other in (("tier_1b", "tier_10b"), ("tier_10b", "tier_1b")):
        before = metric(base, "lite_llm_expert_routes_total", f'{{tier="{other}"}}')
        mine = metric(base, "lite_llm_expert_routes_total", f'{{tier="{tier}"}}')
        got = client.completions.create(model="chat", prompt="Hello", max_tokens=20, temperature=0, extra_body={"tier_set": f"only:{tier}"})
        assert got.choices[0].text == _alone(reference, "Hello", 20, temperature=0, tierset=f"only:{tier}")
        assert metric(base, "lite_llm_expert_routes_total", f'{{tier="{other}"}}') == before
        assert metric(base, "lite_llm_expert_routes_total", f'{{tier="{tier}"}}') > mine
    listed = client.completions.create(model="chat", prompt="Hello", max_tokens=20, temperature=0, extra_body={"tier_set": ["tier_10b"]})
    assert listed.choices[0].text == _alone(reference, "Hello", 20, temperature=0, tierset="only:tier_10b")
    assert _alone(reference, "Hello", 20, temperature=0, tierset="only:tier_10b") != _alone(reference, "Hello", 20, temperature=0, tierset="only:tier_1b")


def test_eight_concurrent_streams_with_mixed_tiersets_each_get_what_they_get_alone(chat_server, reference, client):
    engine = chat_server[1]
    specs = [
        (f"prompt {i} " * (1 + i % 3), 20 + 3 * i, [0.0, 0.9][i % 2], 100 + i, ["all", "only:tier_1b", "only:tier_10b", "upto:tier_1b"][i % 4])
        for i in range(8)
    ]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def run(i: int) -> None:
        prompt, n, t, seed, ts = specs[i]
        try:
            start.wait(10)
            stream = client.completions.create(model="chat", prompt=prompt, max_tokens=n, temperature=t, seed=seed, stream=True, extra_body={"tier_set": ts})
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    widest_before = engine.stats.max_batch_seen
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for i, (prompt, n, t, seed, ts) in enumerate(specs):
        assert results[i] == _alone(reference, prompt, n, temperature=t, seed=seed, tierset=ts), f"client {i} ({ts})"
    assert max(engine.stats.max_batch_seen, widest_before) >= 4  # they really shared decode steps


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_are_400_and_the_server_keeps_serving(chat_server, client):
    url = chat_server[0] + "/v1/completions"
    assert _error(httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}))["message"] == "the request body is not valid JSON"
    assert _error(httpx.post(url, json={"prompt": "hi", "max_tokens": "many"}))["param"] == "max_tokens"
    assert _error(httpx.post(url, json={"prompt": "hi", "temperature": [1]}))["param"] == "temperature"
    assert _error(httpx.post(url, json={"max_tokens": 3}))["param"] == "prompt"
    assert "unknown tier" in _error(httpx.post(url, json={"prompt": "hi", "tier_set": "only:tier_99"}))["message"]
    too_long = _error(httpx.post(url, json={"prompt": "hi", "max_tokens": 1000}))
    assert too_long["param"] == "max_tokens" and too_long["code"] == "context_length_exceeded"
    assert _error(httpx.post(url, json={"prompt": "", "max_tokens": 3}))["param"] == "prompt"
    assert _error(httpx.post(url, json={"prompt": "hi", "n": 2}))["param"] == "n"
    both = _error(httpx.post(url, json={"prompt": "hi", "tier_set": "all", "latency_budget_ms": 50}))
    assert "not both" in both["message"]
    with pytest.raises(openai.BadRequestError, match="lite-llm tiers profile"):
        client.completions.create(model="chat", prompt="hi", max_tokens=3, extra_body={"latency_budget_ms": 50})
    chat = chat_server[0] + "/v1/chat/completions"
    assert _error(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}))["param"] == "messages"
    assert _error(httpx.post(chat, json={"messages": []}))["param"] == "messages"
    assert _error(httpx.post(url, json={"prompt": "hi", "repetition_penalty": 1e-300}))["param"] == "repetition_penalty"
    # A temperature of 1e-45 overflowed the logits and its NaN draw ended the engine for every
    # later request; below 1e-5 it is greedy now (vLLM's rule), as temperature 0.
    tiny = httpx.post(url, json={"prompt": "hi", "max_tokens": 3, "temperature": 1e-45}, timeout=30).json()
    greedy = httpx.post(url, json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=30).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    # still serving
    assert client.completions.create(model="chat", prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    assert metric(chat_server[0], "lite_llm_requests_total", '{endpoint="/v1/completions",status="400"}') >= 9


def test_chat_without_a_template_is_refused(byte_ckpt):
    with serve_in_thread(byte_ckpt) as (base, _):
        error = _error(httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}))
        assert error["code"] == "no_chat_template" and "chat template" in error["message"]
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 200


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory) -> Path:
    """The tiny two-tier model with a 4,096-token context: a request long enough (a second or
    more) that a client leaving early is certain to leave while it is generating."""
    from lite_llm import build_model
    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.data import ByteTokenizer

    from .conftest import tiny_two_tier

    model = build_model(tiny_two_tier(256, max_seq_len=4096), seed=7)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "long", model, tokenizer=ByteTokenizer())


LONG = 4000  # tokens asked of the long model: far more than are made before a leaving client is noticed


def test_a_client_that_leaves_stops_its_generation(long_ckpt):
    with serve_in_thread(long_ckpt, max_batch=8, max_queue=16) as (base, engine):
        generated = engine.stats.generated_tokens
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", base + "/v1/completions", json={"prompt": "The", "max_tokens": LONG, "temperature": 0.0, "stream": True}) as response:
                for i, _ in enumerate(response.iter_lines()):
                    if i >= 4:
                        break  # leave mid-stream: the connection closes
        deadline = time.monotonic() + 10
        while engine.stats.requests_cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.requests_cancelled == 1
        assert engine.stats.requests_finished == 0
        assert engine.stats.generated_tokens - generated < LONG // 4  # it stopped long before max_tokens
        # a whole (non-streamed) request whose client gives up is dropped too
        with pytest.raises(httpx.TimeoutException):
            httpx.post(base + "/v1/completions", json={"prompt": "The", "max_tokens": LONG, "temperature": 0.0}, timeout=0.05)
        deadline = time.monotonic() + 10
        while engine.stats.requests_cancelled == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.requests_cancelled == 2 and engine.stats.requests_finished == 0


def test_a_full_queue_answers_429_with_retry_after(long_ckpt):
    with serve_in_thread(long_ckpt, max_batch=1, max_queue=1) as (base, engine):
        # the one batch row and the one queue place, taken by long requests submitted directly
        jobs = [Job([1, 2, 3], SamplingParams(max_tokens=LONG, temperature=0.0), TierSet.all(), lambda event: None) for _ in range(2)]
        for job in jobs:
            engine.submit(job)
        deadline = time.monotonic() + 10
        while (engine.running, engine.queue_depth) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=10)
        error = _error(refused, 429)
        assert refused.headers["Retry-After"] == "1" and error["code"] == "rate_limit_exceeded"
        for job in jobs:
            job.cancel()
        served = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3  # room again: served
        assert engine.stats.requests_cancelled == 2


def test_sigterm_drains_the_stream_in_flight_then_exits_0(chat_ckpt, reference):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "LITE_LLM_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lite_llm.cli", "serve", str(chat_ckpt), "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout=60, proc=proc)
        pieces, lines = [], []
        body = {"prompt": "The", "max_tokens": 100, "temperature": 0.0, "stream": True, "tier_set": "only:tier_10b"}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 1:
                    proc.send_signal(signal.SIGTERM)
                if line != "data: [DONE]":
                    pieces.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
        assert lines[-1] == "data: [DONE]"
        assert "".join(pieces) == _alone(reference, "The", 100, temperature=0.0, tierset="only:tier_10b")
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_budgets_choose_the_tierset_from_the_checkpoints_profile(chat_ckpt, reference, tmp_path):
    """A hand-written profile makes the right choice obvious: each budget gets the best TierSet
    within it (named in the X-Lite-LLM-Tier-Set header, routed only there, text as served alone),
    and a budget nothing meets is a 400 naming the smallest budgets that would work."""
    import shutil

    from lite_llm.serve.selection import TierSetProfile, TierSetTable, save_profile

    ckpt = tmp_path / "profiled"
    shutil.copytree(chat_ckpt, ckpt)
    order = ("tier_1b", "tier_10b")
    save_profile(ckpt, TierSetTable(
        [TierSetProfile(("tier_1b",), 2.0, 1_000, -5.0), TierSetProfile(("tier_10b",), 3.0, 2_000, -4.8),
         TierSetProfile(order, 5.0, 2_500, -4.5)],
        "cpu", order, domains=("code",), tokens=8, dense_bytes=500, tier_bytes={"tier_1b": 500, "tier_10b": 1_500},
    ))
    with serve_in_thread(ckpt) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        for budget, want in (({"latency_budget_ms": 10}, "all"), ({"latency_budget_ms": 4}, "only:tier_10b"),
                             ({"latency_budget_ms": 2.5}, "upto:tier_1b"), ({"memory_budget": "2kB"}, "only:tier_10b"), ({"memory_budget": 2e3}, "only:tier_10b"),
                             ({"memory_budget": 1_999, "latency_budget_ms": 10}, "upto:tier_1b")):
            other = "tier_1b" if want == "only:tier_10b" else "tier_10b"
            before = metric(base, "lite_llm_expert_routes_total", f'{{tier="{other}"}}')
            raw = client.completions.with_raw_response.create(model="profiled", prompt="Hello", max_tokens=12, temperature=0, extra_body=budget)
            assert raw.headers["x-lite-llm-tier-set"] == want, budget
            assert raw.parse().choices[0].text == _alone(reference, "Hello", 12, temperature=0, tierset=want)
            if want != "all":
                assert metric(base, "lite_llm_expert_routes_total", f'{{tier="{other}"}}') == before, budget
        with client.chat.completions.with_streaming_response.create(
            model="profiled", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True, extra_body={"latency_budget_ms": 2.5}
        ) as streamed:
            assert streamed.headers["x-lite-llm-tier-set"] == "upto:tier_1b"
            assert "data: [DONE]" in "".join(streamed.iter_lines())
        unmet = _error(httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "latency_budget_ms": 1.0}))
        assert unmet["code"] == "budget_unmet" and "the nearest, upto:tier_1b, needs" in unmet["message"]
        assert unmet["param"] == "latency_budget_ms"
        small = _error(httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "memory_budget": 10}))
        assert small["code"] == "budget_unmet" and small["param"] == "memory_budget"  # the field the request gave
        bad = _error(httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "memory_budget": "lots"}))
        assert bad["param"] == "memory_budget" and "cannot read 'lots'" in bad["message"]
        assert client.completions.create(model="profiled", prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1


def test_a_checkpoint_url_is_served_through_the_expert_store(chat_ckpt, reference):
    """`serve file:///...` used to fold the URL into a path that does not exist; now it reads
    the experts through the archive level and answers as the local checkpoint does."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "LITE_LLM_DEVICE": "cpu"}
    url = chat_ckpt.resolve().as_uri()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lite_llm.cli", "serve", url, "--hot-budget", "10MB", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout=60, proc=proc)
        assert [m["id"] for m in httpx.get(base + "/v1/models", timeout=10).json()["data"]] == [chat_ckpt.name]
        body = {"prompt": "def add", "max_tokens": 20, "temperature": 0.0}
        got = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert got == _alone(reference, "def add", 20, temperature=0.0)
    finally:
        proc.terminate()
        proc.wait(30)
