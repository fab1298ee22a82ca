"""The calls in flight of one pool, without Ray: whose slot each holds, which ones nobody waits
for any more (draining) and which of those ran past their deadline (overtime), and which maps'
ends the replicas may want to hear.

Every method is O(1) per call (overtime is a heap), whatever the number of calls in flight: these
are on the path of every call of every map."""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any

from rhmapper.pool_records import CallRecord, ReplicaRecord
from rhmapper.slots import SlotIndex

STUCK_GRACE_SECONDS = 2.0
"""An abandoned call still running this long past its deadline takes its replica out of
rotation: an auto replica is restarted, your actor benched until the call answers."""
ASK_AFTER_RUNNING_SECONDS = 0.02
"""A call that started at once asks its map's end board only once it has run this long (so a
pool that saw each call of a map answer sooner knows that no replica asked about it)."""


class CallBook:
    """The calls in flight of a pool, by token, and the slots they hold in ``slots``.

    Examples:
        >>> slots = SlotIndex(); replica = ReplicaRecord("r", owned=True, requested=2)
        >>> slots.join(replica); book = CallBook(slots)
        >>> book.submitted("a", CallRecord(None, replica, 0.0, key="map-1"), asks_at_once=False)
        >>> replica.in_flight, book.fetched("a", now=0.001).replica.name, replica.in_flight
        (1, 'r', 0)
        >>> book.end_heard("map-1")  # answered within 20 ms: no replica asked about map-1
        False
    """

    def __init__(self, slots: SlotIndex) -> None:
        self.slots = slots
        self.records: dict[Any, CallRecord] = {}
        """Each call in flight (until fetched, or its abandoned answer came), by token."""
        self.draining: dict[Any, ReplicaRecord] = {}
        """Abandoned calls not answered yet, with their replica."""
        self.heard: set[str] = set()
        """Keys of maps whose replicas may have asked the end board about them (or may still
        start one of their calls): only these maps' ends need to be sent."""
        self._overtime: list[tuple[float, int, Any]] = []
        """A heap of abandoned calls with a deadline: (deadline + grace, sequence, token)."""
        self._sequence = itertools.count()

    def get(self, token: Any) -> CallRecord | None:
        """The record of the call ``token``, if it is still in flight."""
        return self.records.get(token)

    def submitted(self, token: Any, record: CallRecord, asks_at_once: bool) -> None:
        """A call was sent, taking a slot of its replica. ``asks_at_once``: whether its replica
        may ask the end board about its map before it ran `ASK_AFTER_RUNNING_SECONDS`."""
        self.slots.took(record.replica)
        self.records[token] = record
        if record.key is not None and asks_at_once:
            self.heard.add(record.key)

    def answered(self, token: Any) -> None:
        """A call answered: its slot is free (its map fetches the reply later)."""
        record = self.records.get(token)
        if record is not None:
            self._give_back(record)

    def fetched(self, token: Any, now: float) -> CallRecord:
        """Its map took the answer of ``token``: the call is done."""
        record = self.records.pop(token)
        self._give_back(record)
        if record.key is not None and now - record.submitted_at >= ASK_AFTER_RUNNING_SECONDS:
            self.heard.add(record.key)  # it may have run long enough to ask
        return record

    def abandoned(self, token: Any, replica: ReplicaRecord, deadline: float | None,
                  answered: bool) -> None:
        """Nobody waits for the call ``token`` any more. If it ``answered`` already, its slot
        is free now; else it drains until `drained`, and from its ``deadline`` plus the grace
        on `overdue` names it."""
        record = self.records.get(token)
        if record is not None and record.key is not None:
            self.heard.add(record.key)  # it may still start: its replica must hear the end
        if answered:
            record = self.records.pop(token, None)
            if record is not None:
                self._give_back(record)
            return
        self.draining[token] = replica
        replica.abandoned_running += 1
        if deadline is not None:
            self.look_again(token, deadline)

    def drained(self, token: Any) -> ReplicaRecord | None:
        """An abandoned call answered: its slot is free; returns its replica (``None`` if the
        call was already let go, see `release`)."""
        record = self.records.pop(token, None)
        replica = self.draining.pop(token, None)
        if replica is None or record is None:
            return None
        replica.abandoned_running -= 1
        self._give_back(record)
        return replica

    def overdue(self, now: float) -> list[tuple[Any, ReplicaRecord]]:
        """The abandoned calls still draining a grace past their deadline, taken off the heap
        (`look_again` puts one back)."""
        due = []
        while self._overtime and self._overtime[0][0] <= now:
            _, _, token = heapq.heappop(self._overtime)
            replica = self.draining.get(token)
            if replica is not None:
                due.append((token, replica))
        return due

    def look_again(self, token: Any, deadline: float) -> None:
        """Name the draining call ``token`` in `overdue` once ``deadline`` plus the grace passed."""
        heapq.heappush(self._overtime, (deadline + STUCK_GRACE_SECONDS, next(self._sequence),
                                        token))

    def release(self, token: Any) -> None:
        """Let go of the draining call ``token`` (its replica is restarted): its slot is free
        and its answer, if it ever comes, changes nothing."""
        replica = self.draining.pop(token)
        replica.abandoned_running -= 1
        record = self.records.pop(token, None)
        if record is not None:
            self._give_back(record)

    def forget_draining(self) -> None:
        """The pool's cluster is lost: no abandoned call there will answer."""
        self.draining.clear()
        self._overtime.clear()

    def _give_back(self, record: CallRecord) -> None:
        """The call of ``record`` answered (or was given up): its slot is free, once."""
        if record.holds_slot:
            record.holds_slot = False
            replica = record.replica
            self.slots.gave_back(replica)
            if not replica.in_flight:
                replica.idle_since = time.monotonic()

    def end_heard(self, key: str) -> bool:
        """Whether the end of map ``key`` must be sent (a replica may have asked about it, or
        may still start one of its calls); forgets the map."""
        if key not in self.heard:
            return False
        self.heard.discard(key)
        return True
