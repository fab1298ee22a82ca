"""The one thread that runs every async map of the process.

An async verb (``await m.amap(...)``) builds the same generator of chunks as its blocking twin,
with a `rhmapper.pacing.Pacer`: where the blocking map would wait, this one pauses. `AsyncDriver`
steps the generators of all async maps in one thread, so a thousand concurrent ``acall`` s cost
one thread, and the event loop only receives results:

```text
event loop: m.amap(...) ─► Stepper(generator, on_chunk, on_end) ─► AsyncDriver.start
                                                                        │
driver thread:  ready steppers ─► next(generator) ─► chunk ─► on_chunk ─┼─► the loop
                    ▲                  │ paused                         │   (call_soon_threadsafe)
                    │                  ▼                                │
   woken by: its news (Pacer.wake), its pause's end (a timer), a slot freed in the pool it is
   starved on (SlotIndex.news_listener), room under its window, a close
```

A starved map (items to send, no free slot) sleeps in its pool's queue of starved maps; each
piece of the pool's news wakes one of them, in turn, and a woken map that sent work while the
pool still has free slots wakes the next, so the work per answered call does not grow with the
number of waiting maps. Every pause also ends at its ``wake_at`` (at most
`rhmapper.scheduler.WAIT_TICK_SECONDS` away), as the blocking map's wait does.

Pure Python, no Ray.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator

from rhmapper.pacing import Pacer

_log = logging.getLogger(__name__)

OnChunk = Callable[[list, bool], None]
"""Called in the driver thread with each chunk and whether the map paused after it."""
OnEnd = Callable[[BaseException | None], None]
"""Called in the driver thread once the map ended: ``None``, or what it raised."""

_READY, _RUNNING, _SLEEPING, _HELD, _DONE = "ready", "running", "sleeping", "held", "done"


class Stepper:
    """One async map as the driver steps it: its generator, where its chunks go, and its pacer.

    ``room``: at most this many items delivered and not yet `consumed` (``None``: no bound);
    the driver holds the map while it has none, as a blocking ``imap`` waits for its caller.

    Examples:
        >>> chunks, ends = [], []
        >>> def numbers(pacer):
        ...     yield [1, 2]
        ...     yield [3]
        >>> stepper = Stepper(numbers, lambda chunk, paused: chunks.append(chunk), ends.append)
        >>> AsyncDriver.shared().start(stepper)
        >>> stepper.ended.wait(10), chunks, ends
        (True, [[1, 2], [3]], [None])
    """

    def __init__(self, make: Callable[[Pacer], Iterator[list]], on_chunk: OnChunk,
                 on_end: OnEnd, room: int | None = None) -> None:
        self._driver: AsyncDriver | None = None
        self.pacer = Pacer(self._wake)
        self._make = make
        self._chunks: Iterator[list] | None = None
        self._on_chunk, self._on_end = on_chunk, on_end
        self._room = room
        self.delivered = 0
        """Items delivered and not yet consumed (under the driver's lock)."""
        self.state = _READY
        self.woken = False
        """News came while it ran: step it again."""
        self.closing = False
        self.timer = 0
        """The number of its current pause's timer (an older timer of it is stale)."""
        self.ended = threading.Event()
        """Set once its generator ended (finished, failed or closed) and ``on_end`` ran."""

    def _wake(self) -> None:
        if self._driver is not None:
            self._driver.wake(self)

    def consumed(self, items: int) -> None:
        """The consumer took ``items`` of the delivered ones (from any thread)."""
        assert self._driver is not None
        self._driver.consumed(self, items)

    def close(self) -> None:
        """End the map early (from any thread): its generator is closed in the driver thread,
        as a blocking verb's is when its caller leaves it; `ended` is set once it is."""
        assert self._driver is not None
        self._driver.close(self)

    def held(self) -> bool:
        """Whether it has no room for more results (under the driver's lock)."""
        return self._room is not None and self.delivered >= self._room and not self.closing

    def step(self) -> bool:
        """Run it to its next chunk (in the driver thread); whether it goes on."""
        try:
            if self.closing:
                if self._chunks is not None:
                    self._chunks.close()
                self._end(None)
                return False
            if self._chunks is None:
                self._chunks = self._make(self.pacer)
            self.pacer.paused, self.pacer.starved_on = False, None
            chunk = next(self._chunks)
        except StopIteration:
            self._end(None)
            return False
        except BaseException as error:  # noqa: B036 - the map's failure: its awaiter raises it
            self._end(error)
            return False
        self._deliver(chunk)
        return True

    def _deliver(self, chunk: list) -> None:
        if chunk:
            assert self._driver is not None
            with self._driver.lock:
                self.delivered += len(chunk)
        try:
            if chunk or not self.pacer.paused:
                self._on_chunk(chunk, self.pacer.paused)
        except Exception as error:  # its loop is gone (closed): nobody awaits the map
            _log.warning("an async map's event loop took no more results (%s); the map ends",
                         error)
            self.closing = True

    def _end(self, error: BaseException | None) -> None:
        try:
            self._on_end(error)
        except Exception as failed:  # its loop is gone: nobody awaits the map
            _log.warning("an async map ended (%r) after its event loop closed (%s)", error,
                         failed)
        finally:
            self.ended.set()


class AsyncDriver:
    """Steps the generators of the process's async maps in one thread (see the module
    docstring). `shared` is the process's driver; its thread starts with the first map.

    Examples:
        >>> def countdown(pacer):
        ...     for n in (3, 2, 1):
        ...         pacer.pause(time.monotonic() + 0.01, None)  # as a map that waits
        ...         yield [n]
        >>> got = []
        >>> stepper = Stepper(countdown, lambda chunk, paused: got.extend(chunk), print)
        >>> AsyncDriver.shared().start(stepper)
        >>> stepper.ended.wait(10)
        None
        True
        >>> got
        [3, 2, 1]
    """

    _shared: AsyncDriver | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._ready: collections.deque[Stepper] = collections.deque()
        self._timers: list[tuple[float, int, int, Stepper]] = []
        """Heap of (wake at, timer number, tie-break, stepper) of sleeping steppers."""
        self._tie = itertools.count()
        self._starved: dict[Any, dict[Stepper, None]] = {}
        """Per pool's slots, its sleeping starved steppers, in the order they slept. A stepper
        that ends its step not starved while the pool has free slots wakes the first of them:
        a chain of maps that each sent work (or needed none), never a loop of maps that cannot
        use the free slots."""
        self._news: collections.Counter = collections.Counter()
        """Per pool's slots, pieces of news not yet handed to starved steppers."""
        self._thread: threading.Thread | None = None

    @classmethod
    def _forget_shared(cls) -> None:
        """In a forked child: the parent's driver and its thread are not there."""
        cls._shared, cls._shared_lock = None, threading.Lock()

    @classmethod
    def shared(cls) -> AsyncDriver:
        """The process's driver."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def start(self, stepper: Stepper) -> None:
        """Step ``stepper`` from now on, until its generator ends."""
        with self.lock:
            stepper._driver = self
            self._ready.append(stepper)
            if self._thread is None or not self._thread.is_alive():  # (a forked child)
                self._thread = threading.Thread(target=self._loop, name="rhmapper-async",
                                                daemon=True)
                self._thread.start()
            self.lock.notify()

    def wake(self, stepper: Stepper) -> None:
        """Step ``stepper`` soon (from any thread)."""
        with self.lock:
            self._wake(stepper)

    def consumed(self, stepper: Stepper, items: int) -> None:
        with self.lock:
            stepper.delivered -= items
            if stepper.state == _HELD and not stepper.held():
                self._make_ready(stepper)

    def close(self, stepper: Stepper) -> None:
        with self.lock:
            stepper.closing = True
            self._wake(stepper)

    def pool_news(self, slots: Any) -> None:
        """Slots of the pool of ``slots`` may have freed (its `news_listener`)."""
        with self.lock:
            if self._starved.get(slots):
                self._news[slots] += 1
                self.lock.notify()

    # -- the driver thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            for stepper in batch:
                self._step(stepper)

    def _next_batch(self) -> list[Stepper]:
        """Wait until steppers are ready; take them all (marked running)."""
        with self.lock:
            while True:
                now = time.monotonic()
                timers = self._timers
                while timers and timers[0][0] <= now:
                    _, timer, _, stepper = heapq.heappop(timers)
                    if stepper.state == _SLEEPING and stepper.timer == timer:
                        self._make_ready(stepper)
                for slots in list(self._news):
                    self._hand_news(slots, self._news.pop(slots))
                if self._ready:
                    batch = list(self._ready)
                    self._ready.clear()
                    for stepper in batch:
                        stepper.state = _RUNNING
                    return batch
                self.lock.wait(timers[0][0] - now if timers else None)

    def _step(self, stepper: Stepper) -> None:
        goes_on = stepper.step()
        pacer = stepper.pacer
        with self.lock:
            if not goes_on:
                stepper.state = _DONE
            elif stepper.woken or stepper.closing or not pacer.paused:
                stepper.woken = False
                self._make_ready(stepper)
            elif stepper.held():
                stepper.state = _HELD
            else:
                self._sleep(stepper)
            slots = pacer.slots
            if pacer.starved_on is None and slots is not None and slots.free() > 0:
                self._hand_news(slots, 1)  # slots are left that it did not want: the next

    def _sleep(self, stepper: Stepper) -> None:
        pacer = stepper.pacer
        stepper.state = _SLEEPING
        stepper.timer += 1
        heapq.heappush(self._timers, (pacer.wake_at, stepper.timer, next(self._tie), stepper))
        slots = pacer.starved_on
        if slots is not None:
            if slots.news_listener is None:
                slots.news_listener = lambda: self.pool_news(slots)
            self._starved.setdefault(slots, {})[stepper] = None

    def _hand_news(self, slots: Any, pieces: int) -> None:
        """Wake up to ``pieces`` of the maps starved on ``slots``, longest waiting first."""
        starved = self._starved.get(slots)
        while starved and pieces > 0:
            stepper = next(iter(starved))
            del starved[stepper]
            if stepper.state == _SLEEPING:
                self._make_ready(stepper)
                pieces -= 1

    def _wake(self, stepper: Stepper) -> None:
        if stepper.state == _RUNNING:
            stepper.woken = True
        elif stepper.state == _SLEEPING or (stepper.state == _HELD and stepper.closing):
            self._make_ready(stepper)

    def _make_ready(self, stepper: Stepper) -> None:
        if stepper.state == _READY:
            return  # queued already
        stepper.state = _READY
        self._ready.append(stepper)
        starved = self._starved.get(stepper.pacer.starved_on)
        if starved is not None:
            starved.pop(stepper, None)
        self.lock.notify()


os.register_at_fork(after_in_child=AsyncDriver._forget_shared)
