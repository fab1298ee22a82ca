"""The deadlines of a map's calls under ``timeout=``: a heap by deadline, of call numbers (not
of Ray tokens, which would keep the answers of calls that answered in memory). No Ray here."""

from __future__ import annotations

import heapq
from typing import Callable, Iterator


class Deadlines:
    """Calls by deadline; calls that answered are dropped as they come to the top.

    Examples:
        >>> deadlines = Deadlines()
        >>> deadlines.add(5.0, seq=1); deadlines.add(2.0, seq=2)
        >>> deadlines.soonest(in_flight=lambda seq: seq == 1)  # call 2 answered
        5.0
        >>> list(deadlines.due(now=6.0))
        [1]
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []

    def add(self, deadline: float, seq: int) -> None:
        """Call ``seq`` is due at ``deadline`` (``time.monotonic()``)."""
        heapq.heappush(self._heap, (deadline, seq))

    def soonest(self, in_flight: Callable[[int], bool]) -> float | None:
        """The soonest deadline of a call still ``in_flight`` (``None``: none)."""
        heap = self._heap
        while heap and not in_flight(heap[0][1]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> Iterator[int]:
        """The calls whose deadline is ``now`` or earlier, taken off (a call may be added again
        meanwhile, with a later deadline)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[1]
