"""The streaming path's parts on their own: the engine-to-loop channel and the SSE renderer."""

from __future__ import annotations

import asyncio
import json
import threading

from lite_llm.serve.channel import EventChannel
from lite_llm.serve.protocol import SSE_DONE, StreamRenderer, chat_chunk, completion_chunk, usage_chunk

AWKWARD = ['plain', '"quoted"', "back\\slash", "new\nline", "tab\t", "\u00e9\u4e2d\U0001f600", "\u0000", "</script>", ""]


def _events(sse: str) -> list[str]:
    assert sse.endswith("\n\n")
    return [part.removeprefix("data: ") for part in sse[:-2].split("\n\n")]


def test_text_chunks_equal_the_whole_dicts_json_for_awkward_text():
    for chat in (False, True):
        for with_usage in (False, True):
            r = StreamRenderer("cmpl-x", "m", chat=chat, with_usage=with_usage)
            for piece in AWKWARD:
                expected = (chat_chunk("cmpl-x", "m", {"content": piece}, None, with_usage, r.created) if chat
                            else completion_chunk("cmpl-x", "m", piece, None, with_usage, r.created))
                [event] = _events(r.text(piece))
                assert json.loads(event) == expected
                assert json.loads(event)["choices"][0].get("text", json.loads(event)["choices"][0].get("delta", {}).get("content")) == piece


def test_finish_sends_reason_then_usage_then_done():
    r = StreamRenderer("chatcmpl-y", "m", chat=True, with_usage=True)
    final, use, done = _events(r.finish("length", 7, 3))
    assert json.loads(final) == chat_chunk("chatcmpl-y", "m", {}, "length", True, r.created)
    assert json.loads(use) == usage_chunk("chatcmpl-y", "m", "chat.completion.chunk", 7, 3, r.created)
    assert json.loads(use)["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert "data: " + done + "\n\n" == SSE_DONE
    assert json.loads(_events(r.opening())[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert StreamRenderer("c", "m", chat=False, with_usage=False).opening() == ""
    assert len(_events(StreamRenderer("c", "m", chat=False, with_usage=False).finish("stop", 1, 1))) == 2  # no usage chunk


def test_channel_delivers_every_event_in_order_with_fewer_wakeups_than_events():
    n = 20_000

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        channel: EventChannel[int] = EventChannel(loop)
        wakeups = 0
        real_call = loop.call_soon_threadsafe

        def counting(*args):  # every wake-up the producer schedules
            nonlocal wakeups
            wakeups += 1
            return real_call(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        producer = threading.Thread(target=lambda: [channel.put(i) for i in range(n)])
        producer.start()
        got: list[int] = []
        while len(got) < n:
            got += await channel.take()
            await asyncio.sleep(0)  # let the producer run ahead, as a socket write would
        producer.join()
        return got, wakeups

    got, wakeups = asyncio.run(main())
    assert got == list(range(n))
    assert 1 <= wakeups < n


def test_channel_take_waits_then_wakes_for_a_later_put():
    async def main() -> list[str]:
        channel: EventChannel[str] = EventChannel(asyncio.get_running_loop())
        timer = threading.Timer(0.05, channel.put, args=("late",))
        timer.start()
        first = await asyncio.wait_for(channel.take(), 5)
        timer2 = threading.Timer(0.05, channel.put, args=("later",))
        timer2.start()
        return first + await asyncio.wait_for(channel.take(), 5)

    assert asyncio.run(main()) == ["late", "later"]
