"""Torch work kept off the event loop: a sync generator advanced item by item on an executor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


class OffLoop:
    """A sync generator advanced one item at a time on an executor; close() is safe at any moment
    (while an item is being computed, the generator is closed as soon as that item is done)."""

    def __init__(self, gen: Generator[T, None, Any], submit: Callable[..., Future]):
        self.gen, self.submit = gen, submit
        self._pending: Future | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            self._pending = self.submit(next, self.gen, _END)
            item = await asyncio.wrap_future(self._pending)
            self._pending = None
            if item is _END:
                return
            yield item

    def close(self) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: self.gen.close())
        else:
            self.gen.close()
