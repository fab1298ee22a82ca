"""Shared runs of a batched mapper: the maps, ``imap``s and calls of several threads fed into one
long-lived map each, so that their items share batches. Pure Python: the map itself is started
by a function given to `SharedRuns` (`rhmapper.Mapper` runs it on its backend).

```text
caller A's input ─► Lane A (its feed) ─┐                     ┌─► Lane A's results, in its order
caller B's input ─► Lane B (its feed) ─┼─► _SharedRun ─► map ─┼─► Lane B's results
m.call(x)        ─► Lane C (one item) ─┘   (an iterator,      └─► Lane C's value
                                           taking from lanes
                                           in turn)
```

Each caller is a `Lane`: its own input feed (a blocking input holds up no other lane), its own
order, window, errors and end. Lanes of equal options (and equal constant ``kwargs``) join the
same `_SharedRun`, whose map is unordered, returns exceptions as values, and yields each result
with its index (`rhmapper.plan.MapPlan.indexed`): the index says which lane's item it was. A run
that has no lane for its max wait ends; the next lane starts a new one. A run that fails as a
whole (the mapper was cancelled, no replica can start) fails every lane in it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from typing import Any, AsyncIterator, Callable, Iterator

from rhmapper.input_feed import SEQUENCES, InputFeed, ListFeed
from rhmapper.remote_errors import add_note
from rhmapper.results import OrderedSink, UnorderedSink

StartRun = Callable[[Any, dict | None, Iterator], Iterator[list]]
"""Start the map of a shared run: ``(options, kwargs, source)`` to chunks of ``(index, value)``
pairs, a failed item's exception as its value. It is called under the runs' lock and must not
iterate ``source`` before it returns (a generator, iterated by the run's thread)."""


class SharedRuns:
    """The shared runs of one mapper, by options.

    Examples:
        >>> def start(options, kwargs, source):  # a map that doubles, one item per chunk
        ...     for index, item in enumerate(source):
        ...         yield [(index, 2 * item)]
        >>> runs = SharedRuns(start, max_call_bytes=2**20, max_wait_seconds=0.01, chunk=4)
        >>> list(runs.lane("opts", None, iter(range(5))).values())
        [0, 2, 4, 6, 8]
        >>> runs.lane("opts", None, [7], ordered=False).collect()
        [14]
    """

    def __init__(self, start: StartRun, max_call_bytes: int, max_wait_seconds: float,
                 chunk: int) -> None:
        self._start = start
        self._max_call_bytes = max_call_bytes
        self._max_wait_seconds = max_wait_seconds
        self._chunk = chunk
        self._lock = threading.Lock()
        self._open: list[_SharedRun] = []
        """Runs still taking lanes."""

    def lane(self, options: Any, kwargs: dict | None, source: Iterator | list, *,
             ordered: bool = True, window: int | None = None,
             return_exceptions: bool = False) -> "Lane":
        """A new lane for ``source`` in the run of ``options`` and ``kwargs`` (started if there
        is none). ``window``: at most this many of its items pulled and not yet yielded."""
        with self._lock:
            run = next((run for run in self._open
                        if run.options == options and equal_kwargs(run.kwargs, kwargs)), None)
            if run is None:
                run = _SharedRun(self, options, kwargs)
                run.start(self._start(options, kwargs, run))  # may raise: then no run is open
                self._open.append(run)
            feed = (ListFeed(source, self._max_call_bytes) if isinstance(source, SEQUENCES)
                    else InputFeed(source, self._max_call_bytes, on_news=run.wake))
            lane = Lane(feed, ordered, window, return_exceptions, on_room=run.wake)
            run.join(lane)
        return lane

    def _closed(self, run: "_SharedRun") -> None:
        """``run`` takes no more lanes (under the lock)."""
        if run in self._open:
            self._open.remove(run)


class Lane:
    """One caller's items in a shared run: fed in turn with other lanes' items, and its results
    back in its own order. Iterate `values` (or `collect`) in the caller's thread.

    Examples:
        >>> def start(options, kwargs, source):  # a map of one chunk, once its input ends
        ...     yield list(enumerate(source))
        >>> runs = SharedRuns(start, max_call_bytes=2**20, max_wait_seconds=0.01, chunk=8)
        >>> runs.lane(None, None, ["a", "b"]).collect()
        ['a', 'b']
    """

    def __init__(self, feed: InputFeed | ListFeed, ordered: bool, window: int | None,
                 return_exceptions: bool, on_room: Callable[[], None]) -> None:
        self.feed = feed
        self.window = window
        self.return_exceptions = return_exceptions
        self._on_room = on_room
        """Called when yielded results make room under the window."""
        self.changed = threading.Condition()
        self.sink = OrderedSink() if ordered else UnorderedSink()
        self.fed = 0
        """Items handed to the shared run."""
        self.received = 0
        """Their results received (yielded or not)."""
        self.yielded = 0
        self.input_done = False
        """Every item of the input was fed (or it raised: `input_error`)."""
        self.input_error: BaseException | None = None
        """What the input raised: raised after the results of the items it gave."""
        self.error: BaseException | None = None
        """The first failure to raise (an item's, or the shared run's)."""
        self.closed = False
        self.listener: Callable[[], None] | None = None
        """Called when the lane has news (an async reader's wake-up; see `avalues`)."""

    def room(self) -> int | None:
        """How many more items may be fed under the window (``None``: no bound)."""
        return None if self.window is None else self.window - (self.fed - self.yielded)

    def receive(self, values: list[tuple[int, int, Any]]) -> None:
        """Results of this lane's items, as ``(index in the run, lane index, value)`` (from the
        run's thread). A failure's messages name its index in the run: a note names its own."""
        with self.changed:
            for run_index, index, value in values:
                if isinstance(value, BaseException):
                    if run_index != index:
                        add_note(value, f"rhmapper: it was item {index} of this map (item "
                                        f"{run_index} of a run shared with other callers)")
                    if not self.return_exceptions:
                        self.error = self.error or value
                self.sink.put(index, [value], ())
            self.received += len(values)
            self.notify_reader()

    def fail(self, error: BaseException) -> None:
        """The shared run failed as a whole: end with ``error``."""
        with self.changed:
            self.error = self.error or error
            self.notify_reader()

    def values(self) -> Iterator:
        """The lane's results one by one, raising its first failure; ends the lane when left."""
        try:
            while True:
                with self.changed:
                    while not self._has_news():
                        self.changed.wait()
                    news = self._take_news()
                yield from self._values_of(news)
                if self._ended_by(news):
                    return
        finally:
            self.close()

    async def avalues(self) -> AsyncIterator:
        """`values` for an event loop: awaits the run's news instead of waiting for it."""
        loop = asyncio.get_running_loop()
        news_came = asyncio.Event()
        self.listener = lambda: loop.call_soon_threadsafe(news_came.set)
        try:
            while True:
                news_came.clear()
                with self.changed:
                    news = self._take_news() if self._has_news() else None
                if news is None:
                    await news_came.wait()
                    continue
                for value in self._values_of(news):
                    yield value
                if self._ended_by(news):
                    return
        finally:
            self.close()

    def _take_news(self) -> tuple[list[list], BaseException | None, bool]:
        """The results ready, the failure to raise and whether the lane ended (under the
        lock)."""
        return self.sink.drain(), self.error, self._ended()

    def _values_of(self, news: tuple[list[list], BaseException | None, bool]) -> Iterator:
        for chunk in news[0]:
            self.yielded += len(chunk)
            if self.window is not None:
                self._on_room()
            yield from chunk

    def _ended_by(self, news: tuple[list[list], BaseException | None, bool]) -> bool:
        """Whether the lane ended with ``news``; raises the lane's failure, or its input's
        once it ended."""
        _, error, ended = news
        if error is not None:
            raise error
        if ended and self.input_error is not None:
            raise self.input_error
        return ended

    def notify_reader(self) -> None:
        """Wake the lane's reader (under the lock)."""
        self.changed.notify_all()
        if self.listener is not None:
            self.listener()

    def collect(self) -> list:
        """All the lane's results, in input order for an ordered lane."""
        return list(self.values())

    def close(self) -> None:
        """The caller left: feed no more of its items, drop their results."""
        self.closed = True
        self.feed.close()

    def _ended(self) -> bool:
        return self.input_done and self.received == self.fed

    def _has_news(self) -> bool:
        return self.sink.ready() or self.error is not None or self._ended()


class _SharedRun:
    """The map of the lanes of equal options: an iterator over their items (pulled by the map's
    input feed, in the map's thread-of-input) and the thread that routes its results back."""

    def __init__(self, runs: SharedRuns, options: Any, kwargs: dict | None) -> None:
        self.options = options
        self.kwargs = kwargs
        self._runs = runs
        self._changed = threading.Condition(runs._lock)
        self._lanes: collections.deque[Lane] = collections.deque()
        """Lanes with items still to feed, the next to take from first."""
        self._buffer: collections.deque = collections.deque()
        """(lane, lane index, item) taken from a lane, not yet pulled by the map."""
        self._routes: dict[int, tuple[Lane, int]] = {}
        """The lane and lane index of each item fed and not yet answered, by the map's index."""
        self._next_index = 0
        self._ended = False
        """The map ended: its input gives no more items."""

    def start(self, chunks: Iterator[list]) -> None:
        """Route the results of the map ``chunks`` (whose input is this run) in a thread."""
        threading.Thread(target=self._route, args=(chunks,), name="rhmapper-shared-run",
                         daemon=True).start()

    def join(self, lane: Lane) -> None:
        """Take items of ``lane`` from now on (under the runs' lock)."""
        self._lanes.append(lane)
        self._changed.notify_all()

    # -- the map's input --------------------------------------------------------------------

    def __iter__(self) -> "_SharedRun":
        return self

    def __next__(self) -> Any:
        """The next item of any lane (the map's index of an item is its place in this
        sequence); waits while no lane has one; ends once no lane has come for the max wait."""
        while True:
            if self._buffer:
                lane, index, item = self._buffer.popleft()
                if lane.closed:
                    continue
                self._routes[self._next_index] = (lane, index)
                self._next_index += 1
                return item
            with self._changed:
                if self._ended:
                    raise StopIteration
                if not self._take_from_lanes():
                    if not self._lanes:
                        self._changed.wait(self._runs._max_wait_seconds)
                        if not self._lanes:
                            self._runs._closed(self)
                            raise StopIteration
                    else:
                        self._changed.wait()

    def _take_from_lanes(self) -> bool:
        """Move a chunk of the next lane with items held into the buffer (under the lock);
        whether one was moved. Lanes whose input is all fed, or raised, or that were left,
        leave the turn."""
        for _ in range(len(self._lanes)):
            lane = self._lanes[0]
            self._lanes.rotate(-1)
            if lane.closed:
                self._lanes.remove(lane)
                continue
            room = lane.room()
            size = self._runs._chunk if room is None else min(room, self._runs._chunk)
            if size <= 0:
                continue
            try:
                start, items = lane.feed.take_now(size)
            except BaseException as error:  # noqa: B036 - the lane's input raised: its caller's
                with lane.changed:
                    lane.input_done, lane.input_error = True, error
                    lane.notify_reader()
                self._lanes.remove(lane)
                continue
            with lane.changed:
                lane.fed += len(items)
                if lane.feed.exhausted:
                    lane.input_done = True
                    self._lanes.remove(lane)
                    lane.notify_reader()
            if items:
                self._buffer.extend(zip(itertools.repeat(lane), itertools.count(start), items))
                return True
        return False

    def wake(self) -> None:
        """A lane has news: items held, its input ended, or room under its window."""
        with self._changed:
            self._changed.notify_all()

    # -- the map's results ------------------------------------------------------------------

    def _route(self, chunks: Iterator[list]) -> None:
        """Run the map and hand each result to its lane; fail every lane left if it fails."""
        error: BaseException | None = None
        try:
            for chunk in chunks:
                self._deliver(chunk)
        except BaseException as failure:  # noqa: B036 - every lane raises it as its own
            error = failure
        with self._changed:
            self._ended = True
            self._changed.notify_all()
            self._runs._closed(self)
            waiting = {lane for lane, _ in self._routes.values()} | set(self._lanes)
            waiting.update(lane for lane, _, _ in self._buffer)
        for lane in waiting:
            lane.fail(error or RuntimeError(
                "a shared run of the batched mapper ended with items of this map unanswered; "
                "please report this as a bug of rhmapper"))

    def _deliver(self, chunk: list[tuple[int, Any]]) -> None:
        by_lane: dict[Lane, list] = {}
        routes = self._routes
        for index, value in chunk:
            lane, lane_index = routes.pop(index)
            by_lane.setdefault(lane, []).append((index, lane_index, value))
        for lane, values in by_lane.items():
            if not lane.closed:
                lane.receive(values)


def equal_kwargs(first: dict | None, second: dict | None) -> bool:
    """Whether two maps' constant keyword arguments are equal (values whose ``==`` is not a
    plain ``True``, such as arrays, count as different unless they are the same object).

    Examples:
        >>> equal_kwargs({"scale": 2}, {"scale": 2}), equal_kwargs(None, {"scale": 2})
        (True, False)
    """
    try:
        return bool(first == second) if first is None or second is None else (
            first.keys() == second.keys()
            and all((first[key] is second[key]) or (first[key] == second[key]) is True
                    for key in first))
    except Exception:  # an == that raises: not known equal, so not shared
        return False
