"""Two duplications a code review found, each now one function, held here so they stay one.

1. The sampling pipeline (logit bias, repetition penalty, presence/frequency penalties, then
   ``sample_token``) was written in ``generate_ids`` and again in the server's engine; both now
   call :func:`lite_llm.generate.next_token`, and a request with every control set draws the
   tokens ``generate_ids`` draws.
2. ``progressive.json`` had three readers with three behaviours (refused, silently ignored,
   raised with other words) plus bare ``json.loads`` in the CLI; a malformed one is now refused
   with one sentence by the loader, the lazy reader, ``lite-llm expand`` and ``lite-llm inspect``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.checkpoint.lazy import open_checkpoint
from lite_llm.config import TierSet
from lite_llm.data import ByteTokenizer
from lite_llm.errors import CheckpointError
from lite_llm.generate import generate_ids
from lite_llm.serve.engine import Engine, Event, Job, SamplingParams

from .serve.conftest import tiny_two_tier
from .test_issue16_safety import _hashes, _run

def _squeezed(text: str) -> str:
    """``text`` without whitespace: rich wraps a long line at a space, and _run drops the newline."""
    return "".join(text.split())


# ------------------------------------------------------------------------------- 1. sampling
def test_engine_with_every_sampling_control_draws_the_tokens_of_generate_ids():
    """Rows decoded together, each sampled (seeded) with top-k, top-p, repetition, presence and
    frequency penalties and a logit bias all at once: each row's tokens are those
    ``generate_ids`` gives it alone (one sampling function, :func:`~lite_llm.generate.next_token`)."""
    model = build_model(tiny_two_tier(256), seed=3).eval()
    engine = Engine(model, ByteTokenizer(), max_batch=4, max_queue=8)
    every = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=-0.7)
    specs = [
        ("def f(", 20, dict(temperature=0.9, top_k=40, top_p=0.9, seed=11, logit_bias={ord("e"): 4.0, ord(" "): -100.0}, **every)),
        ("class A", 18, dict(temperature=1.3, top_k=7, top_p=0.6, seed=2, logit_bias={ord("a"): 2.5, ord("("): -3.0}, **every)),
        ("x = 1", 16, dict(temperature=0.0, top_k=5, top_p=0.5, seed=0, logit_bias={ord("1"): 1.5}, **every)),
    ]
    events: list[list[Event]] = [[] for _ in specs]
    done = [threading.Event() for _ in specs]

    def sink(i: int):
        def put(event: Event) -> None:
            events[i].append(event)
            if event.kind != "text":
                done[i].set()
        return put

    for i, (prompt, n, controls) in enumerate(specs):
        engine.submit(Job(list(prompt.encode()), SamplingParams(max_tokens=n, logprobs=0, **controls), TierSet.all(), sink(i)))
    engine.start()
    try:
        for flag in done:
            assert flag.wait(60)
    finally:
        engine.stop(10)
    for (prompt, n, controls), got in zip(specs, events):
        want = list(generate_ids(model, list(prompt.encode()), n, **controls))
        assert got[-1].kind == "done", got[-1]
        assert [e.token for event in got for e in event.logprobs] == want
        assert got[-1].completion_tokens == len(want)


# ------------------------------------------------------------------------------- 2. progressive.json
@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("sound") / "ckpt", build_model(ModelConfig.from_preset("tiny"), seed=0))


def _damage(src: Path, dst: Path, text: str, listed: bool) -> Path:
    """A copy of ``src`` whose progressive.json holds ``text``: with the manifest recording its
    size and sha256 (so the hash check passes and the content itself is what is refused), or,
    ``listed`` False, not listing it at all (as an older writer's may)."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    data = text.encode()
    (dst / "progressive.json").write_bytes(data)
    manifest = json.loads((dst / "manifest.json").read_text())
    entries = [f for f in manifest["files"] if f["path"] == "progressive.json"]
    assert len(entries) == 1
    if listed:
        entries[0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    else:
        manifest["files"].remove(entries[0])
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
@pytest.mark.parametrize(
    "text,said",
    [("{not json", "is not valid JSON"), ('[{"method": "llama_pro"}]', "must hold a JSON object, not a list")],
    ids=["not-json", "a-list"],
)
def test_a_malformed_progressive_json_gets_one_sentence_from_every_reader(sound, tmp_path, text, said, listed):
    ckpt = _damage(sound, tmp_path / "ckpt", text, listed)
    before = _hashes(ckpt)

    with pytest.raises(CheckpointError) as loaded:
        load_checkpoint(ckpt)
    message = str(loaded.value)
    assert said in message and str(ckpt / "progressive.json") in message, message
    assert "\n" not in message and ". " not in message and not message.endswith("."), message
    assert message.endswith("restore it from a backup or re-save the checkpoint"), message

    for verify in (False, True):  # verify: the same sentence from verify_checkpoint's pass
        with pytest.raises(CheckpointError) as lazy:
            open_checkpoint(ckpt, verify=verify)
        assert str(lazy.value) == message

    grown = tmp_path / "grown"
    commands = {
        "expand": ["expand", str(ckpt), "--method", "llama_pro", "--target-layers", "4", "-o", str(grown)],
        "inspect": ["inspect", str(ckpt)],
    }
    for name, args in commands.items():
        code, out = _run(args)
        assert code == 1 and "Traceback" not in out, (name, out)
        assert _squeezed(message) in _squeezed(out), (name, out)
    assert not grown.exists()
    assert _hashes(ckpt) == before


def test_a_sound_progressive_json_reads_alike_everywhere(sound):
    """The one reader gives the loader and the lazy reader the same filled-in record, and
    ``inspect`` still passes a sound checkpoint."""
    assert load_checkpoint(sound).progressive == open_checkpoint(sound).progressive
    code, out = _run(["inspect", str(sound)])
    assert code == 0 and "verified" in out, out
