"""The slow-call warning of a map without ``timeout=``: a call running far past the map's p99
call time is logged once, with where it runs, and left running. No Ray here."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from rhmapper.plan import MapStats
    from rhmapper.results import SentCall

SLOW_CALL_FACTOR = 10
SLOW_CALL_SECONDS = 10.0
"""A call of a map without ``timeout=`` running longer than `SLOW_CALL_FACTOR` times the map's
p99 call time and this many seconds is logged (once), not stopped..."""
SLOW_CALL_MIN_ANSWERED = 5
"""... once this many calls of the map answered (before, it has no p99 to compare with)."""

_log = logging.getLogger(__name__)


class SlowCalls:
    """The calls of one map in the order sent (so by time sent), each looked at once it is the
    oldest: O(1) per call, amortised.

    Examples:
        >>> from rhmapper.plan import MapStats
        >>> slow = SlowCalls()
        >>> slow.sent(0.0, seq=1)
        >>> slow.warn(5.0, lambda seq: None, MapStats())  # call 1 answered: nothing to say
        >>> slow.pending
        0
    """

    def __init__(self) -> None:
        self._sent: collections.deque[tuple[float, int]] = collections.deque()
        """(sent at, seq) of each call; entries of calls that answered are dropped lazily."""

    @property
    def pending(self) -> int:
        """Calls not looked at yet."""
        return len(self._sent)

    def sent(self, at: float, seq: int) -> None:
        """The call ``seq`` was sent at ``at`` (``time.monotonic()``)."""
        self._sent.append((at, seq))

    def warn(self, now: float, call_of: Callable[[int], SentCall | None],
             stats: MapStats) -> None:
        """Log one warning for each call in flight (``call_of(seq)``; ``None`` once it
        answered) that has run longer than `SLOW_CALL_FACTOR` times the map's p99 call time and
        `SLOW_CALL_SECONDS`, once `SLOW_CALL_MIN_ANSWERED` calls answered: which items, on
        which replica, node and process (`Mapper.diagnose` shows its stack)."""
        sent = self._sent
        while sent and call_of(sent[0][1]) is None:
            sent.popleft()
        if (not sent or now - sent[0][0] <= SLOW_CALL_SECONDS
                or stats.calls < SLOW_CALL_MIN_ANSWERED):
            return
        p99 = stats.call_seconds.quantile(0.99) or 0.0
        limit = max(SLOW_CALL_SECONDS, SLOW_CALL_FACTOR * p99)
        while sent and (call_of(sent[0][1]) is None or now - sent[0][0] > limit):
            sent_at, seq = sent.popleft()
            call = call_of(seq)
            if call is None:
                continue
            replica = call.replica
            last = call.start + len(call.items) - 1
            items = f"item {call.start}" if last == call.start else f"items {call.start}-{last}"
            _log.warning(
                "rhmapper: a call of %s has run %.0f s on replica %s (node %s, pid %s), over "
                "%d x this map's p99 call time (%.3f s) and %.0f s; it is left running. "
                "m.diagnose() shows its stack; timeout= would stop it.", items, now - sent_at,
                replica.name, replica.node_id, replica.pid, SLOW_CALL_FACTOR, p99,
                SLOW_CALL_SECONDS)
