"""The real server (uvicorn on 127.0.0.1, a subprocess) against the real `openai` client."""

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

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lite_llm.checkpoint import save_checkpoint  # noqa: E402
from lite_llm.data import BPETokenizer, load_tokenizer  # noqa: E402
from lite_llm.generate import generate_text  # noqa: E402
from lite_llm.model import build_model  # noqa: E402
from tests.conftest import two_tier_config  # noqa: E402
from tests.dist.launcher import free_port  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LITE_LLM_DEVICE="cpu")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    bpe = BPETokenizer.train(texts=["def main(): return 1\n" * 30, "hello world, the cat sat on the mat. " * 30, "<|im_start|>user<|im_end|>"],
                             vocab_size=300, min_frequency=1)
    bpe.save(root / "tok")
    meta_path = root / "tok" / "lite_tokenizer.json"
    meta = json.loads(meta_path.read_text())
    meta["chat_template"] = TEMPLATE
    meta_path.write_text(json.dumps(meta))
    tok = load_tokenizer(root / "tok")
    model = build_model(two_tier_config(vocab_size=tok.vocab_size, max_seq_len=128), seed=2)
    return save_checkpoint(root / "ckpt", model, tokenizer=tok)


class Server:
    def __init__(self, checkpoint: Path, *extra: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "lite_llm.cli", "serve", str(checkpoint), "--port", str(self.port), "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            self.stop()
            raise AssertionError(f"server did not start: {self.proc.stderr.read()[-2000:]}")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.stop()


def _local(checkpoint: Path, prompt: str, n: int, **kw) -> str:
    from lite_llm.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    return "".join(generate_text(loaded.model, loaded.tokenizer, prompt, n, **kw))


def test_completions_greedy_equals_lite_llm_generate(server, checkpoint):
    got = server.client.completions.create(model="m", prompt="def main", max_tokens=24, temperature=0)
    cli = subprocess.run([sys.executable, "-m", "lite_llm.cli", "generate", str(checkpoint), "--prompt", "def main", "--max-new-tokens", "24",
                          "--temperature", "0"], capture_output=True, env=_env(), timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert ("def main" + got.choices[0].text + "\n").encode() == cli.stdout  # bytes: text mode would turn a generated \r into \n
    assert got.usage.completion_tokens >= 1 and got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in server.client.models.list().data] == ["ckpt"]


def test_streaming_equals_whole_and_ends_with_done(server):
    whole = server.client.completions.create(model="m", prompt="hello", max_tokens=20, temperature=0).choices[0].text
    pieces = [c.choices[0].text for c in server.client.completions.create(model="m", prompt="hello", max_tokens=20, temperature=0, stream=True)]
    assert "".join(pieces) == whole
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 5, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_chat_streamed_with_usage(server, checkpoint):
    msgs = [{"role": "user", "content": "hello"}]
    whole = server.client.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(server.client.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.data.tokenizer import render_chat

    tok = load_checkpoint(checkpoint).tokenizer
    assert whole.usage.prompt_tokens == len(tok.encode(render_chat(tok, msgs)))


def test_tier_set_and_seed_are_honoured(server, checkpoint):
    for ts in ("only:tier_a", ["tier_b"]):
        got = server.client.completions.create(model="m", prompt="the cat", max_tokens=20, temperature=0, extra_body={"tier_set": ts})
        assert got.choices[0].text == _local(checkpoint, "the cat", 20, temperature=0.0, tierset=ts)
    a = server.client.completions.create(model="m", prompt="the", max_tokens=20, temperature=1.0, seed=7).choices[0].text
    b = server.client.completions.create(model="m", prompt="the", max_tokens=20, temperature=1.0, seed=7).choices[0].text
    assert a == b == _local(checkpoint, "the", 20, temperature=1.0, seed=7)


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "tier_set": "only:tier_zzz"}, "tier_set"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "latency_budget_ms": 5}, "latency_budget_ms"),
])
def test_bad_requests_are_400_and_the_server_keeps_serving(server, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert server.client.completions.create(model="m", prompt="x", max_tokens=2).choices[0].text is not None


def test_a_client_that_leaves_stops_its_generation(server):
    before = server.metrics()
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 100, "stream": True, "stop": ["never"]}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break
    deadline = time.monotonic() + 20
    while server.metrics()["lite_llm_requests_cancelled_total"] == before["lite_llm_requests_cancelled_total"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = server.metrics()
    assert after["lite_llm_requests_cancelled_total"] == before["lite_llm_requests_cancelled_total"] + 1
    assert after["lite_llm_generated_tokens_total"] - before["lite_llm_generated_tokens_total"] < 100


def test_a_full_queue_answers_429_with_retry_after(checkpoint):
    s = Server(checkpoint, "--max-queue", "1")
    try:
        codes: list[int] = []
        headers: list[str | None] = []

        def ask() -> None:
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 100, "stop": ["never"]}, timeout=60)
            codes.append(r.status_code)
            headers.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes
        assert all(h == "1" for c, h in zip(codes, headers) if c == 429)
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests(checkpoint):
    s = Server(checkpoint)
    with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 60, "stream": True, "stop": ["never"]}, timeout=60) as r:
        lines = iter(r.iter_lines())
        next(lines)
        s.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    # uvicorn re-raises the signal once it has shut down gracefully, so the exit status says SIGTERM
    assert s.proc.wait(timeout=30) in (0, -signal.SIGTERM)
