"""One map's results and the bookkeeping of its failed items: values go to a sink in the order
the verb yields them, a failed item is retried (away from its replica, after its back-off) or
becomes its exception, and the counters move with them.

```text
reply of a call ─► ResultBook.record ─┬─ values ──────────────► sink ─► drain() ─► the verb
                                      └─ failures ─► retry? ─┬─ yes: due / delayed ─► dispatch
                                                             └─ no: exception value, or raise
```
"""

from __future__ import annotations

import collections
import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rhmapper.digests import digest_at
from rhmapper.errors import ReplicaLostError, RhmapperError
from rhmapper.plan import MapPlan, MapStats
from rhmapper.remote_errors import add_note, user_error
from rhmapper.wire import BatchReply, ReplicaDied

if TYPE_CHECKING:
    from rhmapper.scheduler import Replica

OnValues = Callable[[Sequence[int], list, list, "bytes | None", "bytes | None"], None]
"""``on_values(indexes, items, values, digests, values_pickle)``: the map's ``items`` at
``indexes`` (ascending) succeeded with ``values``; ``digests`` are the items' digests if the
replica made them, ``values_pickle`` the one pickle of ``values`` if they travelled as one (a
checkpoint saves both as they are)."""

_RETRYING = object()
"""What `ResultBook._failed` returns when the item will run again."""


@dataclass
class SentCall:
    """A call of the map in flight: where it runs, its items (from input index ``start``)."""

    replica: Replica
    start: int
    items: list
    is_retry: bool
    """A retry carries one item, whose value fills its hole in the sink."""
    deadline: float | None
    budget: float | None
    sent_at: float = 0.0
    """When it was sent (``time.monotonic()``)."""
    seq: int = 0
    """Its number in its map (see `rhmapper.scheduler.MapRun`)."""


@dataclass(order=True)
class Retry:
    """An item to run again, not before ``not_before`` (``time.monotonic()``)."""

    not_before: float
    index: int
    item: Any = field(compare=False)
    avoid: Any = field(compare=False)
    """The replica it failed on (replicas of several clusters may share a name)."""


class _ListSink:
    """Results of ``map``: a list in input order, filled in place."""

    def __init__(self, total: int) -> None:
        self.values: list = [None] * total
        self.emitted = 0

    def put(self, start: int, values: list, holes: set[int]) -> None:
        self.values[start:start + len(values)] = values

    def fill(self, index: int, value: Any) -> None:
        self.values[index] = value

    def drain(self) -> list[list]:
        return []


class OrderedSink:
    """Results of ``imap``: chunks wait until every item before them is ready."""

    def __init__(self) -> None:
        self._chunks: dict[int, list] = {}
        self._missing: dict[int, int] = {}
        self._owner: dict[int, int] = {}
        self._next = 0
        self.emitted = 0

    def put(self, start: int, values: list, holes: set[int]) -> None:
        self._chunks[start] = values
        self._missing[start] = len(holes)
        for index in holes:
            self._owner[index] = start

    def fill(self, index: int, value: Any) -> None:
        start = self._owner.pop(index)
        self._chunks[start][index - start] = value
        self._missing[start] -= 1

    def drain(self) -> list[list]:
        ready = []
        while self._missing.get(self._next) == 0:
            del self._missing[self._next]
            chunk = self._chunks.pop(self._next)
            ready.append(chunk)
            self._next += len(chunk)
        self.emitted = self._next
        return ready

    def ready(self) -> bool:
        """Whether `drain` would hand out results."""
        return self._missing.get(self._next) == 0


class UnorderedSink:
    """Results of ``imap_unordered``: each value as soon as it is ready; ``indexed``: as
    ``(index, value)`` pairs."""

    def __init__(self, indexed: bool = False) -> None:
        self._ready: list = []
        self._indexed = indexed
        self.emitted = 0

    def put(self, start: int, values: list, holes: set[int]) -> None:
        if self._indexed:
            values = list(zip(range(start, start + len(values)), values))
        if holes:
            values = [value for position, value in enumerate(values) if start + position not in holes]
        self._ready.extend(values)

    def fill(self, index: int, value: Any) -> None:
        self._ready.append((index, value) if self._indexed else value)

    def drain(self) -> list[list]:
        ready, self._ready = self._ready, []
        self.emitted += len(ready)
        return [ready] if ready else []

    def ready(self) -> bool:
        """Whether `drain` would hand out results."""
        return bool(self._ready)


class ResultBook:
    """The results of one map, its items waiting to run again, and its counters.

    Examples:
        >>> from rhmapper.wire import CallSpec
        >>> book = ResultBook(MapPlan(CallSpec("fn"), ordered=True), on_progress=None)
        >>> late = SentCall("r0", 2, ["c"], False, None, None)  # items 2.. on replica "r0"
        >>> book.record(late, BatchReply(["C"], None, 0.01), ran=1)
        >>> book.drain(), book.stats.done  # item 2 waits for items 0 and 1
        ([], 1)
        >>> first = SentCall("r1", 0, ["a", "b"], False, None, None)
        >>> book.record(first, BatchReply(["A", "B"], None, 0.02), ran=2)
        >>> book.drain(), book.emitted
        ([['A', 'B'], ['C']], 3)
    """

    def __init__(self, plan: MapPlan, on_progress: Callable[[int, MapStats], None] | None,
                 on_values: OnValues | None = None) -> None:
        self._plan = plan
        self._on_progress = on_progress
        self._on_values = on_values
        """Called with the items of each reply that succeeded (a durable map saves them:
        `rhmapper.durable`)."""
        self.stats = MapStats()
        if plan.collect:
            self._sink: _ListSink | OrderedSink | UnorderedSink = _ListSink(plan.total or 0)
        elif plan.ordered:
            self._sink = OrderedSink()
        else:
            self._sink = UnorderedSink(indexed=plan.indexed)
        self.drain: Callable[[], list[list]] = self._sink.drain
        """The lists of results ready to yield, as the plan's ordering allows."""
        self.due: collections.deque[Retry] = collections.deque()
        """Retries whose back-off has passed, in order."""
        self.delayed: list[Retry] = []
        """A heap of retries waiting for their back-off delay."""
        self._attempts: dict[int, int] = {}
        self._crashes: dict[int, int] = {}

    @property
    def results(self) -> list:
        """The collected results, in input order (``collect=True`` plans only)."""
        assert isinstance(self._sink, _ListSink)
        return self._sink.values

    @property
    def emitted(self) -> int:
        """How many results the sink has handed out (all of them are counted as held until then)."""
        return self._sink.emitted

    # -- retries ----------------------------------------------------------------------------

    def retry(self, retry: Retry) -> None:
        """Queue ``retry``: due at once, or in the delayed heap until its ``not_before``."""
        if retry.not_before <= time.monotonic():
            self.due.append(retry)
        else:
            heapq.heappush(self.delayed, retry)

    def next_retry(self) -> Retry | None:
        """The first due retry (retries whose delay has passed join the due queue in order)."""
        if self.delayed:
            now = time.monotonic()
            while self.delayed and self.delayed[0].not_before <= now:
                self.due.append(heapq.heappop(self.delayed))
        return self.due[0] if self.due else None

    # -- outcomes ---------------------------------------------------------------------------

    def record(self, call: SentCall, reply: BatchReply, ran: int) -> None:
        """Take the reply of ``call``, whose first ``ran`` items ran: their values and failures,
        and the items it did not start (`BatchReply.not_started`)."""
        if self._on_values is not None:
            self._succeeded(call, reply, ran)
        holes: set[int] = set()
        if reply.not_started and reply.not_started[1] == "timeout" and len(call.items) > 1:
            holes = self._run_alone(call, ran)
        elif reply.not_started:
            holes = self._fail_from(call, ran, reply.values,
                                    lambda index: self._not_started(index, call, reply.not_started[1]))
        for position, failure in (reply.failures or {}).items():
            if position >= ran:
                continue
            index = call.start + position
            outcome = self._failed(index, call.items[position], failure.error, call.replica,
                                   lambda: user_error(failure, index, call.replica.name))
            if outcome is _RETRYING:
                holes.add(index)
            else:
                reply.values[position] = outcome
        self._deliver(call, reply.values, holes)

    def _succeeded(self, call: SentCall, reply: BatchReply, ran: int) -> None:
        """Hand the items of ``call`` that succeeded to ``on_values``: a whole call as it came."""
        count = len(reply.values)
        if not reply.failures and not reply.not_started and ran >= count == len(call.items):
            self._on_values(range(call.start, call.start + count), call.items, reply.values,
                            reply.digests, reply.values_pickle)
            return
        failed = reply.failures or {}
        ok = [position for position in range(min(ran, count)) if position not in failed]
        if ok:
            digests = reply.digests
            self._on_values(
                [call.start + position for position in ok],
                [call.items[position] for position in ok],
                [reply.values[position] for position in ok],
                None if digests is None else b"".join(
                    digest_at(digests, position) for position in ok),
                None)

    def timed_out(self, call: SentCall) -> None:
        """``call`` outlived its budget: a batch runs again item by item (`_run_alone`), a single
        item fails with `TimeoutError` (retried as the plan says)."""
        self.stats.timed_out += len(call.items)
        values = [None] * len(call.items)
        if len(call.items) > 1:
            holes = self._run_alone(call, 0)
        else:
            holes = self._fail_from(call, 0, values, lambda index: TimeoutError(
                f"item {index} ran longer than timeout={self._plan.timeout}s "
                f"on replica {call.replica.name}"))
        self._deliver(call, values, holes)

    def replica_died(self, call: SentCall, died: ReplicaDied) -> None:
        """``call``'s replica died under it: its items run again elsewhere, but an item running
        each time a replica died (``max_replica_crashes`` times) fails with `ReplicaLostError`."""
        holes = set(range(call.start, call.start + len(call.items)))
        resolved: dict[int, Any] = {}
        for position, item in enumerate(call.items):
            index = call.start + position
            if died.blames_items:
                self._crashes[index] = self._crashes.get(index, 0) + 1
            crashes = self._crashes.get(index, 0)
            if crashes < self._plan.max_replica_crashes:
                self.retry(Retry(0.0, index, item, call.replica))
                continue
            self.stats.failures += 1
            error = ReplicaLostError(
                f"item {index} was running each time a replica died ({crashes} times, last on "
                f"{call.replica.name}); it is taken to kill its replica and is not run again. "
                "Raise max_replica_crashes to allow more attempts."
            )
            add_note(error, str(died))
            if not self._plan.return_exceptions:
                raise error
            resolved[index] = error
            holes.discard(index)
        if call.is_retry:
            if resolved:
                self._sink.fill(call.start, resolved[call.start])
        else:
            values = [resolved.get(call.start + position) for position in range(len(call.items))]
            self._sink.put(call.start, values, holes)
        self._count_done(len(resolved))

    def fail_unstarted(self, start: int, count: int, reason: str) -> None:
        """Give the queued retries, and the ``count`` fresh items from ``start``, `TimeoutError`
        values: they could not start within ``timeout`` (``reason`` says why)."""
        def error(index: int) -> TimeoutError:
            return TimeoutError(f"item {index} was not started within timeout="
                                f"{self._plan.timeout}s: {reason}")

        retries = [*self.due, *self.delayed]
        self.due.clear()
        self.delayed.clear()
        for retry in retries:
            self._sink.fill(retry.index, error(retry.index))
        self._sink.put(start, [error(start + position) for position in range(count)], set())
        self.stats.failures += len(retries) + count
        self._count_done(len(retries) + count)

    def _not_started(self, index: int, call: SentCall, reason: str) -> BaseException:
        if reason == "timeout":
            return TimeoutError(f"item {index} was not started on replica {call.replica.name}: its "
                                f"call was past its timeout={self._plan.timeout}s deadline")
        return RhmapperError(f"item {index} was not started on replica {call.replica.name}: the "
                             "replica was told its map had ended while the map still ran")

    def _deliver(self, call: SentCall, values: list, holes: set[int]) -> None:
        if call.is_retry:
            if not holes:
                self._sink.fill(call.start, values[0])
        else:
            self._sink.put(call.start, values, holes)
        self._count_done(len(values) - len(holes))

    def announce(self) -> None:
        """Hand the map's counters to ``on_progress`` before any item is done (a spawned map's
        host reads them from its status: `rhmapper.host`)."""
        if self._on_progress is not None:
            self._on_progress(0, self.stats)

    def _count_done(self, done: int) -> None:
        self.stats.done += done
        if self._on_progress is not None and done:
            self._on_progress(done, self.stats)

    def _failed(self, index: int, item: Any, error: BaseException | None, replica: Replica,
                make_error: Callable[[], BaseException]) -> Any:
        """Schedule a retry (returns ``_RETRYING``, away from ``replica``) or return the exception
        object as the value."""
        attempt = self._attempts.get(index, 0) + 1
        self._attempts[index] = attempt
        if self._plan.retries.should_retry(error, attempt):
            self.stats.retries += 1
            self.retry(Retry(time.monotonic() + self._plan.retries.delay(attempt), index, item,
                             replica))
            return _RETRYING
        self.stats.failures += 1
        exception = make_error()
        if self._plan.return_exceptions:
            return exception
        raise exception

    def _run_alone(self, call: SentCall, first: int) -> set[int]:
        """Send the call's items from position ``first`` on again, each in a call of its own,
        with no attempt counted: the batch outlived its budget (`CallSizer.budget`), and which
        item was to blame is known only once each runs alone within ``timeout``."""
        holes = set()
        for position in range(first, len(call.items)):
            index = call.start + position
            self.retry(Retry(0.0, index, call.items[position], call.replica))
            holes.add(index)
        return holes

    def _fail_from(self, call: SentCall, first: int, values: list,
                   make_error: Callable[[int], BaseException]) -> set[int]:
        """Fail the call's items from position ``first`` on, each with ``make_error(index)``
        (retried as the plan says); return the indices that will run again."""
        holes: set[int] = set()
        for position in range(first, len(call.items)):
            index = call.start + position
            error = make_error(index)
            outcome = self._failed(index, call.items[position], error, call.replica,
                                   lambda error=error: error)
            if outcome is _RETRYING:
                holes.add(index)
            else:
                values[position] = outcome
        return holes
