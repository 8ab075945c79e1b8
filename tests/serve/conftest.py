"""Tiny checkpoints and a real uvicorn server on 127.0.0.1 for the serving tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lite_llm import ModelConfig, RoutingConfig, TierConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.data import ByteTokenizer
from lite_llm.data.tokenizer import BPETokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Hello, how are you today? I am fine, thank you very much.",
] * 10


def tiny_two_tier(vocab_size: int, **overrides) -> ModelConfig:
    """Two tiers (tier_1b, tier_10b) of 2 groups x 4 experts, widths multiples of 16."""
    fields = dict(
        vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=128,
        tiers=[TierConfig("tier_1b", num_groups=2, experts_per_group=4, expert_hidden=64),
               TierConfig("tier_10b", num_groups=2, experts_per_group=4, expert_hidden=64)],
        routing=RoutingConfig(k_tier=1, k_group=2, k_expert=1),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def chat_tokenizer() -> BPETokenizer:
    bpe = BPETokenizer.train(texts=CORPUS, vocab_size=300, min_frequency=1)
    bpe.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    bpe.eos_ids = [bpe.backend.token_to_id("<|im_end|>")]
    bpe.chat_template = CHATML
    return bpe


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    """A two-tier checkpoint whose BPE tokenizer has a ChatML template and <|im_end|> as EOS."""
    bpe = chat_tokenizer()
    model = build_model(tiny_two_tier(bpe.vocab_size), seed=5)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "chat", model, tokenizer=bpe)


@pytest.fixture(scope="session")
def byte_ckpt(tmp_path_factory) -> Path:
    """A two-tier byte-level checkpoint: no chat template."""
    model = build_model(tiny_two_tier(256), seed=6)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "byte", model, tokenizer=ByteTokenizer())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float = 30.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {base} did not come up in {timeout} s")


@contextlib.contextmanager
def serve_in_thread(ckpt: Path, *, model_name: str | None = None, **engine_options) -> Iterator[tuple[str, object]]:
    """The real app under a real uvicorn on a free port, in a thread of this process (so tests
    can read the engine's counters), serving the model as ``model_name`` (by default the
    checkpoint folder's name, as `lite-llm serve` does).  Yields (base URL, engine)."""
    import uvicorn

    from lite_llm.serve.app import create_app
    from lite_llm.serve.engine import Engine

    loaded = load_checkpoint(ckpt)
    engine = Engine(loaded.model, loaded.tokenizer, **engine_options)
    app = create_app(engine, model_name=model_name or ckpt.name, checkpoint=ckpt)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base, engine
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def chat_server(chat_ckpt) -> Iterator[tuple[str, object]]:
    with serve_in_thread(chat_ckpt, max_batch=8, max_queue=16) as served:
        yield served


@pytest.fixture
def client(chat_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=chat_server[0] + "/v1", api_key="x", max_retries=0, timeout=60)


def metric(base: str, name: str, labels: str = "") -> float:
    """One sample of /metrics, by name and exact label text (e.g. '{tier="tier_1b"}')."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise KeyError(name + labels)
