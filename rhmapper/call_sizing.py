"""How many items one call carries, and how long it may run: from the plan and the run time per
item measured on the calls that answered.

Auto batches aim at `TARGET_CALL_SECONDS` of work per call and shrink toward the end of an input
of known length (guided self-scheduling); a window bounds the items pulled but not yet yielded;
under ``timeout=`` a batch gets a budget from its measured run time (`CallSizer.budget`). Before
a map's first answer, calls carry one item, or are sized from the plan's ``item_seconds_hint``
(what the previous map of the method measured) when it has one.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

from rhmapper.plan import MapPlan

if TYPE_CHECKING:
    from rhmapper.input_feed import InputFeed, ListFeed
    from rhmapper.slots import SlotIndex

TARGET_CALL_SECONDS = 0.25
"""Auto batches aim at about this much work per call: per-call overhead stays near 1%."""
MIN_CALL_SECONDS = 0.025
"""Near the end of an input, auto batches shrink, but not below about this much work per call."""
MAX_BATCH = 100_000
BATCH_BUDGET_SLACK = 4.0
"""Under ``timeout=``, a batch may run this many times its measured run time (plus one
``timeout``) before its items are sent again one by one."""
QUEUE_AHEAD_SECONDS = 0.005
"""With a fixed ``batch_size``, a call expected to take less than this may wait in the queue of
a replica whose slots are all busy (one such call per replica), so that the replica never idles
for the round trip to the driver. A replica asks whether the map still runs only for a call queued longer than this
(`rhmapper.signals`), so a queued short call costs no extra question."""
EWMA_WEIGHT = 0.3
"""The weight of the newest measurement in the scheduler's decaying means (of the run time per
item here, of the input items' size in `rhmapper.input_feed`)."""


class CallSizer:
    """The size and time budget of one map's calls.

    Examples:
        >>> from rhmapper.wire import CallSpec
        >>> sizer = CallSizer(MapPlan(CallSpec("fn"), total=100_000, window=None, timeout=2.0))
        >>> sizer.batch_size(slots=4, next_index=0, emitted=0)  # nothing measured: one item
        1
        >>> sizer.measure(items=10, seconds=0.01)  # 1 ms per item
        >>> sizer.batch_size(slots=4, next_index=0, emitted=0)  # about TARGET_CALL_SECONDS
        250
        >>> sizer.budget(1), sizer.budget(250)  # one timeout, or one plus 4 x the measured time
        (2.0, 3.0)
        >>> hinted = MapPlan(CallSpec("fn"), total=1000, window=None, item_seconds_hint=1e-3)
        >>> CallSizer(hinted).batch_size(slots=4, next_index=0, emitted=0)  # a guided share
        125
    """

    def __init__(self, plan: MapPlan) -> None:
        self._plan = plan
        self._hint = plan.item_seconds_hint if plan.timeout is None else None
        """Sizes the first calls; not under ``timeout=``, whose budgets need this map's own
        measurement."""
        self._measured_seconds = 0.0
        self._measured_items = 0.0
        """Decaying sums of the items' run time and count: the per-item time weighs each call
        by its items, so one-item probes do not outweigh the large calls that follow."""

    def measure(self, items: int, seconds: float) -> None:
        """Count a call that ran ``items`` items in ``seconds``."""
        keep = 1.0 - EWMA_WEIGHT
        self._measured_seconds = keep * self._measured_seconds + seconds
        self._measured_items = keep * self._measured_items + items

    @property
    def per_item_seconds(self) -> float | None:
        """The measured run time of one item (``None`` before any call answered)."""
        if not self._measured_items:
            return None
        return self._measured_seconds / self._measured_items

    def may_queue_ahead(self) -> bool:
        """Whether a short call (see `QUEUE_AHEAD_SECONDS`) may wait in a busy replica's queue:
        only with a fixed ``batch_size`` (auto batches are sized so that the round trip does not
        matter), not under ``timeout=`` (a call's budget starts when it is sent), and once the
        run time of an item is known. (The dispatch loop also stops it once a replica died during
        the map: a queued call shares its replica's fate, and would count a crash.)"""
        return (isinstance(self._plan.batch_size, int) and self._plan.timeout is None
                and self.per_item_seconds is not None)

    def short_enough_to_queue(self, size: int) -> bool:
        """Whether a call of ``size`` items is expected to take less than `QUEUE_AHEAD_SECONDS`."""
        return size * (self.per_item_seconds or 0.0) < QUEUE_AHEAD_SECONDS

    def batch_size(self, slots: int, next_index: int, emitted: int) -> int:
        """How many items the next call carries (0: none, the window is full), for a pool of
        ``slots`` slots, with ``next_index`` items taken and ``emitted`` yielded so far."""
        plan = self._plan
        room = MAX_BATCH
        if plan.window is not None:
            outstanding = next_index - emitted
            room = min(plan.window - outstanding, max(1, plan.window // (2 * slots)))
        if isinstance(plan.batch_size, int):
            return min(plan.batch_size, room)
        if plan.call.is_async and plan.timeout is None and plan.total is not None:
            # An async call's items await together: the call takes about as long as its slowest
            # item, so an equal share of the map per slot costs no more time than one item.
            size = math.ceil(plan.total / slots)
            return max(1, min(size, room)) if room > 0 else 0
        per_item_seconds = self.per_item_seconds or self._hint
        if per_item_seconds is None:
            return min(1, room)
        per_item = max(per_item_seconds, 1e-7)
        size = int(TARGET_CALL_SECONDS / per_item)
        if plan.total is not None:
            # Guided self-scheduling: shares shrink toward the end so slots finish together,
            # but never below a call's worth of work for the per-call overhead to stay small,
            # nor below an equal share (two calls per slot) of a map smaller than that.
            guided = math.ceil((plan.total - next_index) / (2 * slots))
            floor = min(int(MIN_CALL_SECONDS / per_item), math.ceil(plan.total / (2 * slots)))
            size = min(size, max(guided, floor))
        return max(1, min(size, room)) if room > 0 else 0

    def next_call(self, feed: InputFeed | ListFeed, slots: SlotIndex, emitted: int,
                  max_items: int | None, queued: bool, spare: int) -> tuple[int, list] | None:
        """The first index and the items of ``feed`` for the next call (``None``: none to send
        now). A call that would wait in its replica's queue (``queued``) is sent only if it is
        short. A feed short of items pulls the items of every call the free ``slots`` would
        take now (``spare`` more each may queue); ``emitted``: results the map yielded so far."""
        if feed.exhausted:
            return None
        size = self.batch_size(slots.total, feed.next_index, emitted)
        if max_items is not None:
            size = min(size, max_items)
        if size <= 0 or (queued and not self.short_enough_to_queue(size)):
            return None
        return feed.take(size, calls=max(1, slots.free(spare)))

    def budget(self, items: int) -> float:
        """How long a call of ``items`` may run under ``timeout=``: ``timeout`` for one item.
        A batch gets one ``timeout`` plus `BATCH_BUDGET_SLACK` times its measured run time (never
        more than ``timeout`` per item), so that a hung item is found about as fast as alone;
        a batch that outlives it runs again item by item, nothing failed."""
        timeout = self._plan.timeout
        assert timeout is not None
        per_item_seconds = self.per_item_seconds
        if items == 1 or per_item_seconds is None:
            return timeout * items
        return min(timeout * items, timeout + BATCH_BUDGET_SLACK * items * per_item_seconds)
