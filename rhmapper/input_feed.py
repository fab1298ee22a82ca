"""One map's input: items pulled from the caller's iterator by a thread of the feed's own, held
until a call takes them, numbered in input order, and measured in bytes so that a call stays
under the plan's ``max_call_bytes``. A map over a list (`ListFeed`) takes slices of it instead.

The dispatch loop (`rhmapper.scheduler.MapRun`) asks `InputFeed.take` for a call's items while it
holds the pool's lock. When fewer are held than the call wants, `take` asks the feed's thread to
pull the rest and returns nothing, unless the oldest held item has waited ``max_wait_seconds``:
then the call goes with what is held. So an iterator that blocks (a queue, a socket, a stream
that pauses) holds up no item it already gave, nor the results of calls already sent, and never
the pool's other maps. The thread tells the map through ``on_news`` when what it asked for is
held, when a first item arrives, and when the input ends or raises (the map raises the
input's exception as its own). As ``multiprocessing.Pool.imap`` does, the input is iterated in
that thread, not in the caller's.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Callable, Iterator

from rhmapper.call_sizing import EWMA_WEIGHT
from rhmapper.plan import DEFAULT_MAX_WAIT_SECONDS
from rhmapper.sizing import mean_item_bytes

_EMPTY = object()

SEQUENCES = (list, tuple, range)
"""Inputs that iterating never blocks: a map over one takes slices of it (`ListFeed`), with no
thread to pull it."""


class InputFeed:
    """The items of one map's input, from the caller's iterator to the calls that carry them.

    Examples:
        >>> import time
        >>> feed = InputFeed(iter("abc"), max_call_bytes=2**20)
        >>> feed.is_empty()  # waits for the first item
        False
        >>> calls = []
        >>> while not feed.exhausted:  # the map's loop waits for news instead
        ...     calls.append(feed.take(2) or time.sleep(0.001))
        >>> [call for call in calls if call]
        [(0, ['a', 'b']), (2, ['c'])]
    """

    def __init__(self, source: Iterator, max_call_bytes: int,
                 max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
                 on_news: Callable[[], None] | None = None) -> None:
        self._source = source
        self._max_call_bytes = max_call_bytes
        self._max_wait_seconds = max_wait_seconds
        self._on_news = on_news or (lambda: None)
        self.next_index = 0
        """The input index of the next item a call takes."""
        self._changed = threading.Condition()
        self._held: collections.deque = collections.deque()
        """Items pulled and not taken yet, oldest first. The pulling thread appends without the
        lock (a deque's append and popleft are atomic); the map takes under it."""
        self._oldest_since: float | None = None
        """When the oldest held item was pulled, or earlier (``time.monotonic()``)."""
        self._wanted_since: float | None = None
        """Since when a call has wanted more items than are held (``None``: since the last call
        took items, none has asked)."""
        self._pull_until = 0
        """Pull until this many items were pulled (written by the map only)."""
        self._source_done = False
        self._error: BaseException | None = None
        self._closed = False
        self._puller: threading.Thread | None = None
        self._bytes_per_item: float | None = None
        """A decaying mean of the input items' size, which bounds the next calls."""

    def is_empty(self, wait: bool = True) -> bool | None:
        """Whether the input has no item at all (waits for its first item, or its end, to tell;
        ``wait=False``: ``None`` until it can tell, and ``on_news`` is called when it can);
        raises what the input raised."""
        with self._changed:
            self._want(1)
            while not self._held and not self._source_done:
                if not wait:
                    return None
                self._changed.wait()
            self._raise_error()
            return not self._held

    @property
    def exhausted(self) -> bool:
        """Whether every item of the input has been taken by a call (not while the input's
        exception is still to raise)."""
        return self._source_done and not self._held and self._error is None

    def held(self) -> int:
        """How many items are pulled and not taken by a call yet."""
        return len(self._held)

    def ready_at(self) -> float | None:
        """When the held items go in a call even if it is not full (``time.monotonic()``):
        once the oldest has waited ``max_wait_seconds``, counted from when a call wanted them
        (``None``: nothing is held, or no call wants items)."""
        since, wanted_since = self._oldest_since, self._wanted_since
        if since is None or wanted_since is None or not self._held:
            return None
        return max(since, wanted_since) + self._max_wait_seconds

    def take(self, size: int, calls: int = 1) -> tuple[int, list] | None:
        """The first index and the items of a call of at most ``size`` items, fewer if they would
        carry more than ``max_call_bytes`` (one item at least), or if the oldest has waited
        ``max_wait_seconds`` for the rest. ``None`` when none are to go now. When fewer are held,
        the pulling thread is asked for the items of ``calls`` such calls. Raises what the
        input raised."""
        if self._bytes_per_item:
            size = min(size, max(1, int(self._max_call_bytes // self._bytes_per_item)))
        with self._changed:
            self._raise_error()
            held = self._held
            if len(held) < size and not self._source_done:
                self._want(size * calls - len(held))
                if self._wanted_since is None:
                    self._wanted_since = time.monotonic()
                ready_at = self.ready_at()
                if ready_at is None or time.monotonic() < ready_at:
                    return None
            since = self._oldest_since
            items = self._pop(min(size, len(held)))
            if not items:
                return None
            fits = self._fits(items)
            if fits < len(items):  # too many bytes for one call: the rest goes in the next
                held.extendleft(reversed(items[fits:]))
                del items[fits:]
                self._oldest_since = since
        start = self.next_index
        self.next_index += len(items)
        return start, items

    def take_now(self, size: int) -> tuple[int, list]:
        """The first index and up to ``size`` held items, whatever their bytes: for items that
        will not be sent (the rest is asked of the pulling thread)."""
        with self._changed:
            self._raise_error()
            if len(self._held) < size and not self._source_done:
                self._want(size - len(self._held))
            items = self._pop(min(size, len(self._held)))
        start = self.next_index
        self.next_index += len(items)
        return start, items

    def close(self) -> None:
        """The map ended: the pulling thread pulls no more (it ends once the item it may be
        waiting for arrives, and drops it)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _pop(self, count: int) -> list:
        """The ``count`` oldest held items (one by one, in C: the pulling thread may append
        meanwhile; under the lock)."""
        items = list(itertools.starmap(self._held.popleft, itertools.repeat((), count)))
        self._wanted_since = None
        if not self._held:
            self._oldest_since = None  # the next item pulled sets it again
        return items

    def _fits(self, items: list) -> int:
        per_item = mean_item_bytes(items)
        previous = self._bytes_per_item
        self._bytes_per_item = per_item if previous is None else (
            previous + EWMA_WEIGHT * (per_item - previous))
        return items_within(self._max_call_bytes, per_item)

    def _want(self, count: int) -> None:
        """Ask the pulling thread for ``count`` more items than are held (under the lock)."""
        until = self.next_index + len(self._held) + count
        if until <= self._pull_until or self._closed:
            return
        self._pull_until = until
        if self._puller is None:
            self._puller = threading.Thread(target=self._pull, name="rhmapper-input", daemon=True)
            self._puller.start()
        self._changed.notify_all()

    def _raise_error(self) -> None:
        """Raise what the input raised, once the items it gave before are taken."""
        if self._error is not None and not self._held:
            error, self._error = self._error, None
            raise error

    def _pull(self) -> None:
        """The pulling thread: as many items as asked, until the input ends or raises, or the
        map ends. Each item is held as soon as the input gives it (``islice`` waits for none
        but the next). The lock is taken only to wait, and to tell news: a first held item (it
        starts the wait of `ready_at`), or all that was asked for."""
        source, held, changed = self._source, self._held, self._changed
        append = held.append
        pulled = 0
        while True:
            with changed:
                while self._pull_until <= pulled and not self._closed:
                    changed.wait()
                if self._closed:
                    return
                wanted = self._pull_until - pulled
            got = 0
            try:
                for item in itertools.islice(source, wanted):
                    if self._closed:
                        return
                    append(item)
                    got += 1
                    if len(held) == 1:
                        self._news()
            except BaseException as error:  # noqa: B036 - the map raises it, as its own
                self._ended(error)
                return
            pulled += got
            if got < wanted:
                self._ended(None)
                return
            self._news()

    def _news(self) -> None:
        """Tell the map: items are held (the first one starts the wait of `ready_at`)."""
        with self._changed:
            if self._oldest_since is None:
                self._oldest_since = time.monotonic()
            self._changed.notify_all()
        self._on_news()

    def _ended(self, error: BaseException | None) -> None:
        with self._changed:
            self._source_done = True
            self._error = error
            self._changed.notify_all()
        self._on_news()


def items_within(max_call_bytes: int, bytes_per_item: float) -> int:
    """How many items of ``bytes_per_item`` a call of ``max_call_bytes`` carries (one at least).

    Examples:
        >>> items_within(1000, 300.0), items_within(1000, 5000.0)
        (3, 1)
    """
    return max(1, int(max_call_bytes // max(bytes_per_item, 1.0)))


class ListFeed:
    """The items of a map over a list (`rhmapper.Mapper.map`, ``starmap``), or an ``imap`` over a
    list, tuple or range (`SEQUENCES`): each call takes a slice of it, with none of
    `InputFeed`'s pulling and holding. Same interface.

    Examples:
        >>> feed = ListFeed(list("abcde"), max_call_bytes=2**20)
        >>> feed.take(2), feed.take_now(5), feed.exhausted
        ((0, ['a', 'b']), (2, ['c', 'd', 'e']), True)
        >>> ListFeed(range(10**12), max_call_bytes=2**20).take(3)
        (0, [0, 1, 2])
        >>> _, items = ListFeed([b"x" * 600] * 3, max_call_bytes=1000).take(3)
        >>> len(items)  # the call stays within max_call_bytes
        1
    """

    def __init__(self, items: list | tuple | range, max_call_bytes: int) -> None:
        self._items = items
        self._max_call_bytes = max_call_bytes
        self.next_index = 0
        """The input index of the next item a call takes."""

    def is_empty(self, wait: bool = True) -> bool:
        """Whether the list is empty (known without waiting)."""
        return not self._items

    @property
    def exhausted(self) -> bool:
        """Whether every item has been taken by a call."""
        return self.next_index >= len(self._items)

    def take(self, size: int, calls: int = 1) -> tuple[int, list]:
        """The first index and the items of a call of at most ``size`` items, fewer if they
        would carry more than ``max_call_bytes`` (one item at least)."""
        start = self.next_index
        items = self._slice(start, size)
        if len(items) > 1:
            del items[items_within(self._max_call_bytes, mean_item_bytes(items)):]
        self.next_index += len(items)
        return start, items

    def held(self) -> int:
        """How many items no call took yet."""
        return len(self._items) - self.next_index

    def take_now(self, size: int) -> tuple[int, list]:
        """The first index and the next ``size`` items (fewer at the end), whatever their bytes:
        for items that will not be sent."""
        start = self.next_index
        items = self._slice(start, size)
        self.next_index += len(items)
        return start, items

    def _slice(self, start: int, size: int) -> list:
        items = self._items[start:start + size]
        return items if type(items) is list else list(items)

    def ready_at(self) -> None:
        """Nothing waits to fill a call: every item is here."""

    def close(self) -> None:
        """Nothing to stop."""
