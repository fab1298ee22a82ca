"""The event loop's side of one async map: it starts the map's generator on the process's
`rhmapper.async_driver.AsyncDriver` and awaits its chunks, and when the awaiting task is
cancelled (or an ``async for`` over it is left) it closes the map and waits until the map's
calls are cancelled, as a blocking verb does before its caller goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import AsyncIterator, Callable, Iterator

from rhmapper.async_driver import AsyncDriver, Stepper
from rhmapper.pacing import Pacer

_log = logging.getLogger(__name__)

MakeChunks = Callable[[Pacer], Iterator[list]]
"""Builds a map's generator of chunks with the pacer it pauses through."""


class AsyncRun:
    """One async map, awaited on the running loop: `collect` for a verb that returns its list
    (the generator's last chunk), `values` for one that streams.

    Examples:
        >>> def squares(pacer):  # a map's chunks, then a collected list as its last chunk
        ...     yield [1]
        ...     yield [1, 4, 9]
        >>> async def collected():
        ...     return await AsyncRun(squares).collect()
        >>> asyncio.run(collected())
        [1, 4, 9]
        >>> async def streamed():
        ...     return [value async for value in AsyncRun(squares).values()]
        >>> asyncio.run(streamed())
        [1, 1, 4, 9]
    """

    def __init__(self, make: MakeChunks, room: int | None = None) -> None:
        """Made on the running loop; ``room``: see `rhmapper.async_driver.Stepper`."""
        self._loop = asyncio.get_running_loop()
        self._chunks: collections.deque[list] = collections.deque()
        self._last: list | None = None
        self._error: BaseException | None = None
        self._ended = asyncio.Event()
        self._news = asyncio.Event()
        self._stepper = Stepper(make, self._on_chunk, self._on_end, room)
        self._streams = False
        self._started = False

    async def collect(self) -> list:
        """Run the map; its last chunk (a ``collect`` plan's results)."""
        await self._until(self._ended.wait)
        if self._error is not None:
            raise self._error
        assert self._last is not None, "a collecting map ended without its results"
        return self._last

    async def values(self) -> AsyncIterator:
        """Run the map; its results one by one."""
        self._streams = True
        finished = False
        try:
            while True:
                while not self._chunks:
                    if self._ended.is_set():
                        finished = True
                        if self._error is not None:
                            raise self._error
                        return
                    self._news.clear()
                    await self._until(self._news.wait)
                chunk = self._chunks.popleft()
                self._stepper.consumed(len(chunk))
                for value in chunk:
                    yield value
        finally:
            if not finished:
                await self._close()

    async def _until(self, wait: Callable) -> None:
        """Await ``wait()``, starting the map first; if cancelled meanwhile, close the map."""
        if not self._started:
            self._started = True
            AsyncDriver.shared().start(self._stepper)
        try:
            await wait()
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        """End the map early and wait until it ended (its calls are cancelled)."""
        if not self._started or self._ended.is_set():
            return
        self._stepper.close()
        await asyncio.shield(self._ended.wait())

    # -- from the driver thread -------------------------------------------------------------

    def _on_chunk(self, chunk: list, paused: bool) -> None:
        if not self._streams:
            if not paused:
                self._last = chunk  # read on the loop once the map ended
            return
        self._loop.call_soon_threadsafe(self._received, chunk)

    def _on_end(self, error: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(self._finished, error)

    # -- on the loop ------------------------------------------------------------------------

    def _received(self, chunk: list) -> None:
        self._chunks.append(chunk)
        self._news.set()

    def _finished(self, error: BaseException | None) -> None:
        self._error = error
        self._ended.set()
        self._news.set()
