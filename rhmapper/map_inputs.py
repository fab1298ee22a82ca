"""A map's inputs as the verbs take them: checked, listed for the verbs that collect, and async
iterables (``async for`` sources of the async verbs) turned into what the blocking code takes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, AsyncIterable, Iterator

from rhmapper.input_feed import SEQUENCES

def items_of(verb: str, iterables: tuple) -> tuple[list, bool]:
    """The items of a map over ``iterables`` (tuples of arguments if more than one), and whether
    they are tuples (a single list is used as it is, not copied).

    Examples:
        >>> items_of("map", ([1, 2], "ab"))
        ([(1, 'a'), (2, 'b')], True)
    """
    check_inputs(verb, iterables)
    if len(iterables) == 1 and type(iterables[0]) is list:
        return iterables[0], False
    columns = [list(iterable) for iterable in iterables]
    lengths = [len(column) for column in columns]
    if len(set(lengths)) > 1:
        raise ValueError(f"{verb}() inputs have unequal lengths {lengths}; pass equally long "
                         "iterables")
    return (columns[0] if len(columns) == 1 else list(zip(*columns))), len(columns) > 1


def check_inputs(verb: str, iterables: tuple) -> None:
    """Raise ``TypeError`` if ``iterables`` are not what a map verb takes.

    Examples:
        >>> check_inputs("map", (abs,))
        Traceback (most recent call last):
        ...
        TypeError: map() takes only the inputs, got the callable <built-in function abs>: the function is given to rm.mapper(fn, ...) once; then call m.map(inputs)
    """
    if not iterables:
        raise TypeError(f"{verb}() needs at least one iterable of inputs")
    for iterable in iterables:
        if callable(iterable) and not hasattr(iterable, "__iter__"):
            raise TypeError(
                f"{verb}() takes only the inputs, got the callable {iterable!r}: the function is "
                f"given to rm.mapper(fn, ...) once; then call m.{verb}(inputs)")
        if is_async_iterable(iterable):
            raise TypeError(
                f"{verb}() got the async iterable {iterable!r}: iterate it with an async verb "
                f"(await m.amap(...), async for r in m.aimap(...))")




def stream_source(iterables: tuple) -> tuple[Iterator | list | tuple | range, bool]:
    """What a streaming map (``imap``) pulls its items from, and whether they are tuples of
    arguments: a sequence as it is (sliced, never copied), else an iterator (of tuples, over
    several iterables of equal length).

    Examples:
        >>> stream_source((range(3),))
        (range(0, 3), False)
        >>> source, star = stream_source(([1, 2], "ab")); list(source), star
        ([(1, 'a'), (2, 'b')], True)
    """
    if len(iterables) > 1:
        return zip(*iterables, strict=True), True
    first = iterables[0]
    return (first if isinstance(first, SEQUENCES) else iter(first)), False


def is_async_iterable(source: Any) -> bool:
    """Whether ``source`` is iterated with ``async for`` only.

    Examples:
        >>> async def numbers():
        ...     yield 1
        >>> is_async_iterable(numbers()), is_async_iterable([1])
        (True, False)
    """
    return hasattr(source, "__aiter__") and not hasattr(source, "__iter__")


async def listed(iterables: tuple) -> tuple:
    """``iterables`` with each async iterable read into a list (on the running loop).

    Examples:
        >>> async def letters():
        ...     yield "a"
        >>> asyncio.run(listed((letters(), [1])))
        (['a'], [1])
    """
    read = []
    for iterable in iterables:
        read.append([item async for item in iterable] if is_async_iterable(iterable)
                    else iterable)
    return tuple(read)


class PulledFromLoop:
    """An iterator over an async iterable, for a thread other than the loop's: each ``next``
    awaits the source's next item on ``loop`` (an `rhmapper.input_feed.InputFeed`'s thread
    pulls it, so the loop never waits for the map). `close` cancels a pull in progress.

    Examples:
        >>> import threading
        >>> async def letters():
        ...     for letter in "ab":
        ...         yield letter
        >>> async def main():
        ...     pulled = PulledFromLoop(letters(), asyncio.get_running_loop())
        ...     return await asyncio.to_thread(list, pulled)
        >>> asyncio.run(main())
        ['a', 'b']
    """

    def __init__(self, source: AsyncIterable, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source.__aiter__()
        self._loop = loop
        self._pulling: concurrent.futures.Future | None = None
        self._closed = False

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        self._pulling = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        try:
            return self._pulling.result()
        except StopAsyncIteration:
            raise StopIteration from None
        except concurrent.futures.CancelledError:
            raise StopIteration from None  # closed while it waited: the map has ended

    async def _next(self) -> Any:
        return await self._source.__anext__()

    def close(self) -> None:
        """The map ended: pull no more (a pull in progress is cancelled)."""
        self._closed = True
        pulling = self._pulling
        if pulling is not None:
            pulling.cancel()
