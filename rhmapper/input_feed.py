"""One map's input: items pulled from the caller's iterator outside the pool's lock, held until a
call takes them, numbered in input order, and measured in bytes so that a call stays under the
plan's ``max_call_bytes``. A map over a list (`ListFeed`) takes slices of it instead.

The dispatch loop (`rhmapper.scheduler.MapRun`) asks `InputFeed.take` for a call's items while it
holds the pool's lock. When fewer are held than the call wants, `take` only notes how many
(`InputFeed.wanted`); the loop lets go of the lock, `pull` s them (a slow or blocking iterator
holds up its own map only), and dispatches again.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

from rhmapper.call_sizing import EWMA_WEIGHT
from rhmapper.sizing import mean_item_bytes

_EMPTY = object()


class InputFeed:
    """The items of one map's input, from the caller's iterator to the calls that carry them.

    Examples:
        >>> feed = InputFeed(iter("abcde"), max_call_bytes=2**20)
        >>> feed.is_empty()
        False
        >>> feed.take(2), feed.wanted  # nothing held yet: pull 2 outside the lock, then take
        (None, 2)
        >>> feed.pull(feed.wanted); feed.take(2)
        (0, ['a', 'b'])
        >>> feed.take_now(5), feed.exhausted  # the rest, pulling what is missing
        ((2, ['c', 'd', 'e']), True)
    """

    def __init__(self, source: Iterator, max_call_bytes: int) -> None:
        self._source = source
        self._max_call_bytes = max_call_bytes
        self.next_index = 0
        """The input index of the next item a call takes."""
        self.source_done = False
        self.wanted = 0
        """Items the last `take` would have sent but had not pulled yet (see `pull`)."""
        self.held: collections.deque = collections.deque()
        """Items pulled from the source and not sent yet."""
        self._bytes_per_item: float | None = None
        """A decaying mean of the input items' size, which sizes the next pulls."""
        self._held_item_bytes = 0.0
        """The mean size of the items held (of the larger pull, when two are held), which
        bounds the call that sends them."""

    def is_empty(self) -> bool:
        """Whether the input has no item at all (it is asked for its first one to tell)."""
        first = next(self._source, _EMPTY)
        if first is _EMPTY:
            self.source_done = True
            return True
        self._source = itertools.chain([first], self._source)
        return False

    @property
    def exhausted(self) -> bool:
        """Whether every item of the input has been taken by a call."""
        return self.source_done and not self.held

    def take(self, size: int) -> tuple[int, list] | None:
        """The first index and the items of a call of at most ``size`` items, fewer if they would
        carry more than ``max_call_bytes`` (one item at least). ``None`` when fewer than that are
        held and the input has more: `wanted` then says how many to `pull` first."""
        if self._bytes_per_item:
            size = min(size, max(1, int(self._max_call_bytes // self._bytes_per_item)))
        held = self.held
        if len(held) < size and not self.source_done:
            self.wanted = size - len(held)  # pulled outside the lock, then sent
            return None
        fits = max(1, int(self._max_call_bytes // max(self._held_item_bytes, 1.0)))
        count = min(size, fits, len(held))
        if count == len(held):  # the usual case (the pull was sized for this call): in C
            items = list(held)
            held.clear()
        else:
            items = [held.popleft() for _ in range(count)]
        start = self.next_index
        self.next_index += len(items)
        return start, items

    def take_now(self, size: int) -> tuple[int, list]:
        """The first index and the next ``size`` items (fewer at the input's end), pulled now if
        not held, whatever their bytes: for items that will not be sent."""
        if len(self.held) < size and not self.source_done:
            self.pull(size - len(self.held))
        items = [self.held.popleft() for _ in range(min(size, len(self.held)))]
        start = self.next_index
        self.next_index += len(items)
        return start, items

    def pull(self, count: int) -> None:
        """Pull up to ``count`` items from the source into `held` (not under the pool's lock),
        and measure their size for the byte bound of the calls that carry them."""
        items = list(itertools.islice(self._source, count))
        if len(items) < count:
            self.source_done = True
        if not items:
            return
        per_item = mean_item_bytes(items)
        self._held_item_bytes = max(self._held_item_bytes, per_item) if self.held else per_item
        previous = self._bytes_per_item
        self._bytes_per_item = per_item if previous is None else (
            previous + EWMA_WEIGHT * (per_item - previous))
        self.held.extend(items)


class ListFeed:
    """The items of a map over a list (`rhmapper.Mapper.map`, ``starmap``): each call takes a
    slice of it, with none of `InputFeed`'s pulling and holding. Same interface; nothing is
    ever `wanted`.

    Examples:
        >>> feed = ListFeed(list("abcde"), max_call_bytes=2**20)
        >>> feed.take(2), feed.take_now(5), feed.exhausted
        ((0, ['a', 'b']), (2, ['c', 'd', 'e']), True)
        >>> _, items = ListFeed([b"x" * 600] * 3, max_call_bytes=1000).take(3)
        >>> len(items)  # the call stays within max_call_bytes
        1
    """

    wanted = 0

    def __init__(self, items: list, max_call_bytes: int) -> None:
        self._items = items
        self._max_call_bytes = max_call_bytes
        self.next_index = 0
        """The input index of the next item a call takes."""

    def is_empty(self) -> bool:
        """Whether the list is empty."""
        return not self._items

    @property
    def exhausted(self) -> bool:
        """Whether every item has been taken by a call."""
        return self.next_index >= len(self._items)

    def take(self, size: int) -> tuple[int, list]:
        """The first index and the items of a call of at most ``size`` items, fewer if they
        would carry more than ``max_call_bytes`` (one item at least)."""
        start = self.next_index
        items = self._items[start:start + size]
        if len(items) > 1:
            fits = max(1, int(self._max_call_bytes // max(mean_item_bytes(items), 1.0)))
            del items[fits:]
        self.next_index += len(items)
        return start, items

    def take_now(self, size: int) -> tuple[int, list]:
        """The first index and the next ``size`` items (fewer at the end), whatever their bytes:
        for items that will not be sent."""
        start = self.next_index
        items = self._items[start:start + size]
        self.next_index += len(items)
        return start, items

    def pull(self, count: int) -> None:
        """Nothing to pull: the items are all here (`wanted` is always 0)."""
