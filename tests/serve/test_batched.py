"""Continuous batching without HTTP: the batched decode step and the engine give every request
bitwise the tokens ``generate_ids`` gives it alone — greedy and seeded sampling, mixed
TierSets, rows joining and leaving at token boundaries — and a cancelled row stops at once."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch
import torch.nn.functional as F

from lite_llm import ModelConfig, build_model
from lite_llm.config import TierSet
from lite_llm.data import ByteTokenizer
from lite_llm.generate import generate_ids, generate_text, sample_token
from lite_llm.model.rowwise import row_invariant, rowwise_linear
from lite_llm.serve import batched
from lite_llm.serve.batched import decode_step, new_row_cache, prefill
from lite_llm.serve.engine import Engine, Event, Job, QueueFullError, SamplingParams

from ..conftest import two_tier_config
from .conftest import tiny_two_tier


@pytest.mark.parametrize("d_in,d_out", [(48, 97), (64, 64), (64, 256), (128, 4096), (256, 1024), (576, 1536)])
def test_rowwise_linear_rounds_each_row_as_a_lone_row(d_in, d_out):
    gen = torch.Generator().manual_seed(d_in * d_out)
    w, b = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    for n in (1, 2, 3, 8, 33):
        x = torch.randn(n, d_in, generator=gen)
        alone = torch.cat([F.linear(x[i : i + 1], w) for i in range(n)])
        alone_b = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(n)])
        assert torch.equal(rowwise_linear(x, w), alone)
        assert torch.equal(rowwise_linear(x, w, b), alone_b)


def test_router_per_row_mask_routes_each_row_as_its_own_mask():
    cfg = two_tier_config()
    model = build_model(cfg, seed=2).eval()
    router = model.layers[0].ffn.router
    x = torch.randn(6, cfg.d_model, generator=torch.Generator().manual_seed(0))
    sets = [None, "only:tier_a", "only:tier_b", "tier_a", "all", "only:tier_b"]
    rows = model.allowed_rows(sets)
    with torch.no_grad(), row_invariant():  # the gate matmuls, as a server's decode step runs them
        together = router(x, rows)
        for i, ts in enumerate(sets):
            alone = router(x[i : i + 1], model.allowed_tiers(ts))
            assert torch.equal(together.expert_ids[i : i + 1], alone.expert_ids)
            assert torch.equal(together.weights[i : i + 1], alone.weights)
    # a row limited to tier_a never routes into tier_b's flat ids, and the other way round
    bound = router.tier_offsets[1]
    assert (together.expert_ids[1][together.valid[1]] < bound).all()
    assert (together.expert_ids[2][together.valid[2]] >= bound).all()


def _batched(model, requests):
    """Run requests (prompt, n, temperature, seed, tierset, join_step) through prefill and
    decode_step, rows joining at their step and leaving when done."""
    outs = [[] for _ in requests]
    active, step = [], 0
    pending = sorted(range(len(requests)), key=lambda i: requests[i][5])
    sizes = []
    while pending or active:
        while pending and requests[pending[0]][5] <= step:
            i = pending.pop(0)
            prompt, n, temp, seed, ts, _ = requests[i]
            cache = new_row_cache(model, len(prompt), len(prompt) + n)
            logits, _ = prefill(model, prompt, cache, ts)
            gen = torch.Generator().manual_seed(seed)
            token = sample_token(logits, temp, None, 0.9 if temp else None, gen)
            outs[i].append(token)
            active.append(dict(i=i, cache=cache, gen=gen, pos=len(prompt), tok=token, left=n - 1, ts=ts, t=temp))
        active = [a for a in active if a["left"] > 0]
        if active:
            sizes.append(len(active))
            allowed = model.allowed_rows([a["ts"] for a in active]) if model.config.is_moe else None
            logits, _ = decode_step(model, [a["tok"] for a in active], [a["pos"] for a in active], [a["cache"] for a in active], allowed)
            for row, a in enumerate(active):
                token = sample_token(logits[row], a["t"], None, 0.9 if a["t"] else None, a["gen"])
                outs[a["i"]].append(token)
                a["tok"], a["pos"], a["left"] = token, a["pos"] + 1, a["left"] - 1
        step += 1
    return outs, max(sizes)


@pytest.mark.parametrize(
    "cfg",
    [tiny_two_tier(300), two_tier_config(), ModelConfig.from_preset("tiny-dense"), ModelConfig.from_preset("quickstart", n_layers=2)],
    ids=["aligned-two-tier", "unaligned-two-tier", "dense", "quickstart-shape"],
)
def test_batched_decode_gives_each_row_what_it_gets_alone(cfg, monkeypatch):
    monkeypatch.setattr(batched, "KV_ROOM", 1)  # the rows' caches grow as they decode; generate_ids' are allocated whole
    model = build_model(cfg, seed=3).eval()
    tiers = [t.name for t in cfg.tiers]
    choices = [None, f"only:{tiers[0]}", f"only:{tiers[-1]}", f"upto:{tiers[0]}"] if tiers else [None]
    rng = random.Random(1)
    requests = [
        ([rng.randrange(cfg.vocab_size) for _ in range(rng.randrange(1, 24))], rng.randrange(4, 24), rng.choice([0.0, 0.9]),
         rng.randrange(1000), rng.choice(choices), rng.randrange(0, 8))
        for _ in range(8)
    ]
    got, widest = _batched(model, requests)
    alone = [
        list(generate_ids(model, p, n, temperature=t, seed=s, tierset=ts, top_p=0.9 if t else None)) for p, n, t, s, ts, _ in requests
    ]
    assert widest >= 4  # rows really were decoded together
    assert got == alone


def test_without_row_invariance_batched_logits_are_not_guaranteed():
    """Why rowwise exists: with a plain batched matmul the rows' rounding moves (checked here so a
    future torch that makes F.linear row-invariant shows up as a skip, not a silent pass)."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 128, generator=gen), torch.randn(8, 128, generator=gen)
    alone = torch.cat([F.linear(x[i : i + 1], w) for i in range(8)])
    if torch.equal(F.linear(x, w), alone):
        pytest.skip("this CPU's batched F.linear already rounds rows as lone rows")
    with row_invariant():
        from lite_llm.model.rowwise import linear

        assert torch.equal(linear(x, w), alone)


class _Collect:
    def __init__(self, on_text=None) -> None:
        self.pieces: list[str] = []
        self.done: Event | None = None
        self.finished = threading.Event()
        self.on_text = on_text

    def __call__(self, event: Event) -> None:
        if event.kind == "text":
            self.pieces.append(event.text)
            if self.on_text:
                self.on_text(self)
        else:
            self.done = event
            self.finished.set()


def _run_on_a_loop(engine: Engine, jobs: list[Job], sinks: list[_Collect]) -> None:
    """Drive ``engine`` with :meth:`Engine.run` on an event loop: half the jobs submitted from
    the loop, half from another thread (the cross-thread wake-up), then drain with ``stop``."""

    async def main() -> None:
        driver = asyncio.create_task(engine.run())
        for job in jobs[::2]:
            engine.submit(job)
        await asyncio.sleep(0.01)
        submitter = threading.Thread(target=lambda: [engine.submit(job) for job in jobs[1::2]])
        submitter.start()
        while not all(sink.finished.is_set() for sink in sinks):
            await asyncio.sleep(0.005)
        submitter.join()
        engine.stop()
        await asyncio.wait_for(driver, 30)  # stop ends the driver once the batch is empty

    asyncio.run(main())


@pytest.mark.parametrize("driver", ["thread", "loop"])
def test_engine_joins_and_leaves_at_token_boundaries_and_matches_generate_text(driver):
    cfg = tiny_two_tier(256)
    model = build_model(cfg, seed=8).eval()
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch=3, max_queue=16)
    specs = [
        ("def f(", 30, 0.0, 0, "all", ()), ("class A", 12, 0.8, 5, "only:tier_1b", ()), ("x = 1", 25, 1.0, 9, "only:tier_10b", ()),
        ("import os", 7, 0.0, 0, "upto:tier_1b", ()), ("The", 40, 0.7, 3, "all", ("e",)), ("ab", 18, 0.0, 0, ["tier_10b"], ()),
    ]
    sinks = [_Collect() for _ in specs]
    jobs = [Job(tok.encode(prompt), SamplingParams(max_tokens=n, temperature=t, seed=seed, stop=stop), TierSet.coerce(ts), sink)
            for (prompt, n, t, seed, ts, stop), sink in zip(specs, sinks)]
    if driver == "loop":
        _run_on_a_loop(engine, jobs, sinks)
    else:
        for job in jobs:
            engine.submit(job)
        engine.start()
        try:
            for sink in sinks:
                assert sink.finished.wait(60)
        finally:
            engine.stop(10)
    for (prompt, n, t, seed, ts, stop), sink in zip(specs, sinks):
        expected = "".join(generate_text(model, tok, prompt, n, temperature=t, seed=seed, tierset=ts, stop=stop))
        assert "".join(sink.pieces) == expected
        ids = list(generate_ids(model, tok.encode(prompt), n, temperature=t, seed=seed, tierset=ts))
        if not stop:
            assert sink.done.completion_tokens == len(ids) and sink.done.finish_reason == "length"
        assert sink.done.prompt_tokens == len(prompt)
    assert engine.stats.max_batch_seen == 3 and engine.stats.requests_finished == len(specs)


def test_engine_penalties_logit_bias_and_logprobs_match_generate_ids():
    """Rows decoded together, each with its own presence/frequency penalties, logit bias and
    repetition penalty, greedy and seeded: each row's tokens (read from its logprob entries, one
    per generated token) are bitwise those generate_ids gives it alone, and each entry's logprob
    is the log-softmax of its raw logits there."""
    from lite_llm.serve.engine import token_logprob

    cfg = tiny_two_tier(256)
    model = build_model(cfg, seed=8).eval()
    engine = Engine(model, ByteTokenizer(), max_batch=4, max_queue=16)
    specs = [
        ("def f(", 24, 0.0, 0, dict(presence_penalty=1.2)),
        ("class A", 20, 0.9, 5, dict(frequency_penalty=0.8, logit_bias={ord("e"): 3.0, ord(" "): -100.0})),
        ("x = 1", 22, 0.0, 0, dict(presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=1.3)),
        ("import", 18, 1.0, 9, dict(logit_bias={ord("a"): 100.0}, frequency_penalty=0.5)),
        ("The", 16, 0.7, 3, dict()),
    ]
    events: list[list[Event]] = [[] for _ in specs]
    done = [threading.Event() for _ in specs]

    def sink(i):
        def put(event: Event) -> None:
            events[i].append(event)
            if event.kind != "text":
                done[i].set()
        return put

    for i, (prompt, n, t, seed, extra) in enumerate(specs):
        params = SamplingParams(max_tokens=n, temperature=t, seed=seed, logprobs=2, **extra)
        engine.submit(Job(list(prompt.encode()), params, TierSet.all(), sink(i)))
    engine.start()
    try:
        for flag in done:
            assert flag.wait(60)
    finally:
        engine.stop(10)
    for (prompt, n, t, seed, extra), got in zip(specs, events):
        want = list(generate_ids(model, list(prompt.encode()), n, temperature=t, seed=seed, **extra))
        entries = [e for event in got for e in event.logprobs]
        assert [e.token for e in entries] == want
        assert got[-1].kind == "done" and got[-1].completion_tokens == len(want)
        with torch.no_grad():  # the entries' values: a cache-free forward of prompt + tokens
            logits = model(torch.tensor([list(prompt.encode()) + want])).logits[0, len(prompt) - 1 : -1]
        for entry, row in zip(entries, logits):
            alone = token_logprob(row, entry.token, 2)
            assert entry.logprob == pytest.approx(alone.logprob, abs=1e-5)
            assert [i for i, _ in entry.top] == [i for i, _ in alone.top]
    assert engine.stats.max_batch_seen >= 3
    assert list(generate_ids(model, list(b"def f("), 24, presence_penalty=1.2)) != list(generate_ids(model, list(b"def f("), 24))


def test_engine_counts_routes_only_in_the_requested_tier():
    model = build_model(tiny_two_tier(256), seed=8).eval()
    engine = Engine(model, ByteTokenizer(), max_batch=4).start()
    try:
        sink = _Collect()
        engine.submit(Job(list(b"hello"), SamplingParams(max_tokens=10, temperature=0.0), TierSet.only("tier_1b"), sink))
        assert sink.finished.wait(30)
    finally:
        engine.stop(10)
    assert engine.stats.tier_routes["tier_10b"] == 0
    # 2 MoE layers x (5 prompt + 9 decoded tokens) x k_group=2 routes each, all in tier_1b
    assert engine.stats.tier_routes["tier_1b"] == 2 * (5 + 9) * 2


def test_a_cancelled_row_stops_before_the_next_decode_step():
    model = build_model(tiny_two_tier(256), seed=8).eval()
    engine = Engine(model, ByteTokenizer(), max_batch=4)
    job_box: list[Job] = []
    counted: list[int] = []

    def cancel_after_three(sink: _Collect) -> None:
        if len(sink.pieces) == 3:
            counted.append(job_box[0].generated)
            job_box[0].cancel()

    sink = _Collect(cancel_after_three)
    other = _Collect()
    job = Job(list(b"abc"), SamplingParams(max_tokens=100, temperature=0.0), TierSet.all(), sink)
    job_box.append(job)
    engine.submit(job)
    engine.submit(Job(list(b"xyz"), SamplingParams(max_tokens=20, temperature=0.0), TierSet.all(), other))
    engine.start()
    try:
        assert sink.finished.wait(30) and other.finished.wait(30)
    finally:
        engine.stop(10)
    assert sink.done.finish_reason == "cancelled"
    assert sink.done.completion_tokens == counted[0]  # not one token more after the cancel
    assert engine.stats.requests_cancelled == 1
    assert other.done.finish_reason == "length" and other.done.completion_tokens == 20  # the other row carried on


def test_a_full_queue_refuses_at_once():
    engine = Engine(build_model(tiny_two_tier(256), seed=8), ByteTokenizer(), max_batch=1, max_queue=1)  # not started: nothing drains
    for _ in range(2):
        engine.submit(Job([1, 2], SamplingParams(max_tokens=2), TierSet.all(), _Collect()))
    with pytest.raises(QueueFullError, match="at capacity"):
        engine.submit(Job([1, 2], SamplingParams(max_tokens=2), TierSet.all(), _Collect()))


def test_engine_over_an_expert_store_matches_the_resident_model(byte_ckpt):
    """Experts served from disk within a small hot budget: the same tokens, and hits counted."""
    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.serve.metrics import RequestCounter, render_metrics
    from lite_llm.store import load_with_store

    resident = load_checkpoint(byte_ckpt).model.eval()
    stored = load_with_store(byte_ckpt, hot_budget="400kB", warm_budget=0, policy="lru", device="cpu")
    engine = Engine(stored.model, ByteTokenizer(), max_batch=4)
    specs = [("def ", 12, "all"), ("class", 10, "only:tier_1b"), ("x", 14, "only:tier_10b")]
    sinks = [_Collect() for _ in specs]
    for (prompt, n, ts), sink in zip(specs, sinks):
        engine.submit(Job(list(prompt.encode()), SamplingParams(max_tokens=n, temperature=0.0), TierSet.coerce(ts), sink))
    engine.start()
    try:
        for sink in sinks:
            assert sink.finished.wait(60)
    finally:
        engine.stop(10)
    for (prompt, n, ts), sink in zip(specs, sinks):
        assert "".join(sink.pieces) == "".join(generate_text(resident, ByteTokenizer(), prompt, n, temperature=0.0, tierset=ts))
    text = render_metrics(engine, RequestCounter(), stored.store)
    rate = float(next(line for line in text.splitlines() if line.startswith('lite_llm_expert_store_hit_rate{level="hot"}')).split()[-1])
    assert rate == stored.store.stats().hot.hit_rate and 0 < rate < 1
