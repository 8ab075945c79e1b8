"""Events from the engine to one request's handler on the event loop, one wake-up per burst.

The engine produces a request's events (a text piece per token, then the end); the handler
runs on the asyncio loop.  When the engine runs on the loop too (the server's case,
``Engine.run``) a put just sets the handler's event.  When it runs on a thread of its own,
handing each event over with its own ``loop.call_soon_threadsafe`` would cost a self-pipe write
and a loop wake-up per token; here the producer appends to a deque and schedules a wake-up only
when none is pending.  Either way the handler takes everything that has arrived at once and
writes it in one send.  Nothing is merged or reordered: the handler sees every event, in order.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class EventChannel(Generic[T]):
    """A single-producer (any thread), single-consumer (the loop) queue with coalesced wake-ups."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: deque[T] = deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._ready = asyncio.Event()  # set and cleared on the loop's thread only
        self._loop_thread = threading.get_ident()  # made by a handler, on the loop's thread

    def put(self, item: T) -> None:
        """Called on the producing thread: queue ``item`` and wake the consumer unless a wake-up
        is already on its way."""
        with self._lock:
            self._pending.append(item)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        if threading.get_ident() == self._loop_thread:  # the engine runs on the loop (Engine.run)
            self._ready.set()
        else:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[T]:
        """Everything queued since the last call, oldest first; waits until there is something."""
        while True:
            with self._lock:
                if self._pending:
                    items = list(self._pending)
                    self._pending.clear()
                    self._wake_scheduled = False
                    return items
            # A put after the check schedules a set() on this loop, which cannot run before the
            # wait below starts, so clearing here never loses a wake-up.
            self._ready.clear()
            await self._ready.wait()
