"""The engine's text at the end of a request, driven token by token with chosen logits."""

from __future__ import annotations

import torch

from lite_llm import build_model
from lite_llm.config import TierSet
from lite_llm.data import ByteTokenizer
from lite_llm.serve.engine import Engine, Job, SamplingParams

from .conftest import tiny_two_tier

EOS = 0


def test_text_held_back_as_a_stop_prefix_is_sent_when_the_model_ends_its_turn():
    """With ``stop=['.\\n\\n']`` a reply's final ``.`` is held back (it could start the stop
    string); when the next token is the end of the turn, the ``.`` is the reply's last
    character and must be sent, not dropped (SmolLM2's replies lost it)."""
    model = build_model(tiny_two_tier(256), seed=1).eval()
    engine = Engine(model, ByteTokenizer(eos_id=EOS))
    events = []
    params = SamplingParams(max_tokens=10, temperature=0.0, stop=(".\n\n",), logit_bias={ord("."): 1e4})  # the first token is "."
    job = Job(list(b"Hi"), params, TierSet.coerce(None), events.append)
    with torch.no_grad():
        engine._admit(job)
        assert job.generated == 1 and [e.kind for e in events] == []  # "." held back
        end_of_turn = torch.zeros(256)
        end_of_turn[EOS] = 1e5  # beats the bias on "."
        engine._take(job, end_of_turn)
    assert [(e.kind, e.text, e.finish_reason) for e in events] == [("text", ".", None), ("done", "", "stop")]
    assert events[-1].completion_tokens == 2
