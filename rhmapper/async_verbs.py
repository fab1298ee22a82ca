"""The async verbs of `rhmapper.Mapper`: ``amap``, ``astarmap``, ``aimap``,
``aimap_unordered``, ``acall``, ``abroadcast``.

Each builds the same map as its blocking twin (the same plan, options, checks and generator
of chunks) and runs it on the process's one `rhmapper.async_driver.AsyncDriver` thread through
`rhmapper.async_run.AsyncRun`: the event loop only awaits results, and many maps cost no more
threads. Cancelling the awaiting task (or leaving an ``async for``, or an ``asyncio.timeout``)
closes the map as leaving a blocking ``imap`` does: its calls in flight are cancelled, calls not
yet started never run, and the pool is kept.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Iterable

from rhmapper.async_run import AsyncRun
from rhmapper.lanes import Lane
from rhmapper.map_inputs import (
    PulledFromLoop,
    check_inputs,
    is_async_iterable,
    items_of,
    listed,
    stream_source,
)
from rhmapper.options import MapOptions, MapSettings, StreamOptions

if TYPE_CHECKING:  # annotations only: not a run-time dependency
    from typing_extensions import Unpack

    from rhmapper.mapper import Mapper

AnyIterable = Iterable | AsyncIterable


class AsyncVerbs:
    """The async verbs, mixed into `rhmapper.Mapper` (they use its plan and run).

    Examples:
        >>> import asyncio
        >>> import rhmapper as rm
        >>> async def main():
        ...     with rm.mapper(abs, replicas=2) as m:
        ...         return await m.amap([-1, -2]), [r async for r in m.aimap([-3])]
        >>> asyncio.run(main())
        ([1, 2], [3])
    """

    async def amap(self: Mapper, *iterables: AnyIterable, **options: Unpack[MapOptions]) -> list:
        """`rhmapper.Mapper.map` for an event loop: ``await m.amap(xs)``. The iterables may be
        async iterables (read whole first, as ``map`` reads its iterables).

        Examples:
            >>> async def main():
            ...     with rm.mapper(pow, replicas=2) as m:
            ...         return await m.amap([2, 3], [2, 2])
            >>> asyncio.run(main())
            [4, 9]
        """
        items, star = items_of("amap", await listed(iterables))
        return await self._acollect(items, star, MapSettings.of(options, stream=False))

    async def astarmap(self: Mapper, iterable: AnyIterable, **options: Unpack[MapOptions]
                       ) -> list:
        """`rhmapper.Mapper.starmap` for an event loop.

        Examples:
            >>> async def main():
            ...     with rm.mapper(pow, replicas=2) as m:
            ...         return await m.astarmap([(2, 2), (3, 2)])
            >>> asyncio.run(main())
            [4, 9]
        """
        (iterable,) = await listed((iterable,))
        check_inputs("astarmap", (iterable,))
        return await self._acollect(list(iterable), True, MapSettings.of(options, stream=False))

    def aimap(self: Mapper, *iterables: AnyIterable, **options: Unpack[StreamOptions]
              ) -> AsyncIterator:
        """`rhmapper.Mapper.imap` for an event loop: ``async for r in m.aimap(xs)``, in input
        order. An async iterable input is pulled lazily (by a thread of the map's input, as a
        blocking iterator is: the loop never waits for the map).

        Examples:
            >>> async def main():
            ...     with rm.mapper(abs, replicas=2) as m:
            ...         return [r async for r in m.aimap(range(-2, 2), window=8)]
            >>> asyncio.run(main())
            [2, 1, 0, 1]
        """
        return self._astream(iterables, True, MapSettings.of(options))

    def aimap_unordered(self: Mapper, *iterables: AnyIterable,
                        **options: Unpack[StreamOptions]) -> AsyncIterator:
        """`rhmapper.Mapper.imap_unordered` for an event loop: each result as it is ready.

        Examples:
            >>> async def main():
            ...     with rm.mapper(abs, replicas=2) as m:
            ...         return sorted([r async for r in m.aimap_unordered(range(-2, 2))])
            >>> asyncio.run(main())
            [0, 1, 1, 2]
        """
        return self._astream(iterables, False, MapSettings.of(options))

    async def acall(self: Mapper, /, *args: Any, **kwargs: Any) -> Any:
        """`rhmapper.Mapper.call` for an event loop: one call on the least-loaded replica.

        Examples:
            >>> async def main():
            ...     with rm.mapper(pow, replicas=2) as m:
            ...         return await asyncio.gather(*(m.acall(2, n) for n in range(4)))
            >>> asyncio.run(main())
            [1, 2, 4, 8]
        """
        results = await self._acollect([args], True, self._call_settings(kwargs))
        return results[0]

    async def abroadcast(self: Mapper, method: str, /, *args: Any, **kwargs: Any) -> list:
        """`rhmapper.Mapper.broadcast` for an event loop: ``method`` once on every replica.

        Examples:
            >>> import collections
            >>> async def main():
            ...     with rm.mapper(rm.module(collections.Counter, "ab"), method="total",
            ...                    replicas=2) as m:
            ...         return await m.abroadcast("total")
            >>> asyncio.run(main())
            [2, 2]
        """
        self.spec.method_of(method)
        self._check_open()
        # In a thread: over compiled graphs, sending waits for starting replicas to be ready.
        sent = await asyncio.to_thread(self._backend.start_broadcast, method, args, kwargs)
        await asyncio.gather(*(asyncio.wrap_future(future) for future in sent.futures),
                             return_exceptions=True)  # read in order by answers()
        return sent.answers()

    # -- plumbing ---------------------------------------------------------------------------

    async def _acollect(self: Mapper, items: list, star: bool, settings: MapSettings) -> list:
        if not items:
            return []
        if self._shares(settings):
            return [value async for value in
                    self._lane(star, settings, items, ordered=True).avalues()]
        return await AsyncRun(lambda pacer: self._run(  # the plan is made in the driver thread
            self._plan(star, settings, collect=True, total=len(items), window=None), items,
            settings.progress, len(items), pacer)).collect()

    async def _astream(self: Mapper, iterables: tuple, ordered: bool, settings: MapSettings
                       ) -> AsyncIterator:
        loop = asyncio.get_running_loop()
        iterables = tuple(PulledFromLoop(iterable, loop) if is_async_iterable(iterable)
                          else iterable for iterable in iterables)
        check_inputs("aimap", iterables)
        try:
            source, star = stream_source(iterables)
            if self._shares(settings):
                lane: Lane = self._lane(star, settings, source, ordered, settings.window)
                async for value in lane.avalues():
                    yield value
                return
            run = AsyncRun(lambda pacer: self._stream_run(iterables, source, star, ordered,
                                                          settings, pacer), room=settings.window)
            async for value in run.values():
                yield value
        finally:
            for iterable in iterables:
                if isinstance(iterable, PulledFromLoop):
                    iterable.close()
