"""How a map waits when it has no thread of its own: it pauses instead of blocking.

A map run by a blocking verb (``m.map``, ``m.imap``) waits in its caller's thread for its
calls to answer. A map run by an async verb (``await m.amap``) is stepped by the one thread of
`rhmapper.async_driver.AsyncDriver`, shared by every async map of the process: where the
blocking map would wait, the stepped one records until when it would wait (`Pacer.pause`) and
yields `PAUSE` up through every layer of its generators, so the driver can step other maps. The
map's news (an answer in its inbox, its input's items) calls `Pacer.wake`; news of its pool (a
slot freed) wakes it through the pool's `rhmapper.slots.SlotIndex.news_listener` when it is
starved of slots.

Pure Python, no Ray.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

PAUSE: list = []
"""What a paused map yields (every layer passes it up as an empty chunk). Never mutated: the
driver tells a pause from data by `Pacer.paused`, not by this object."""


class Pacer:
    """What a map stepped by `rhmapper.async_driver.AsyncDriver` tells it, and how it is woken.

    Examples:
        >>> woken = []
        >>> pacer = Pacer(wake=lambda: woken.append(True))
        >>> pacer.pause(wake_at=12.5, starved_on=None)
        >>> pacer.paused, pacer.wake_at
        (True, 12.5)
        >>> pacer.wake(); woken
        [True]
        >>> list(pacer.pauses(0.5)) == [PAUSE] and pacer.paused
        True
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        """Step the map again soon (thread-safe; its news calls it)."""
        self.paused = False
        """Set by `pause`; cleared by the driver before each step."""
        self.wake_at = 0.0
        """Until when the map would wait (``time.monotonic()``) if nothing woke it."""
        self.starved_on: Any = None
        """The `rhmapper.slots.SlotIndex` whose free slots the map waits for (``None``: it
        waits for no slot)."""
        self.slots: Any = None
        """The `rhmapper.slots.SlotIndex` of the map's pool (``None``: it has none here, as a
        map run by the mapper's host on the cluster)."""

    def pause(self, wake_at: float, starved_on: Any) -> None:
        """The map would wait until ``wake_at`` (or news); ``starved_on``: the slots it has
        work for, and none of which is free."""
        self.paused, self.wake_at, self.starved_on = True, wake_at, starved_on

    def pauses(self, seconds: float, starved_on: Any = None) -> Iterator[list]:
        """`pause` for ``seconds`` (or news) and yield `PAUSE`: ``yield from`` it where a
        blocking map would wait."""
        self.pause(time.monotonic() + seconds, starved_on)
        yield PAUSE
