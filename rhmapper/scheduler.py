"""The dispatch loop: per-replica slots, least-loaded choice, adaptive batches, ordering, retries,
timeouts and replica loss.

The scheduler knows nothing of Ray, envs or progress bars. It talks to a `Pool` that submits
calls to its `Replica` objects and reports their completion, so the same loop runs on Ray
actors, on replicas of several clusters, or on in-process fakes in the unit tests.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from rhmapper.errors import MapCancelledError, NoReplicasError, ReplicaLostError, RhmapperError
from rhmapper.wire import BatchReply, CallSpec, RemoteFailure, ReplicaDied
from rhmapper.retries import Retries
from rhmapper.sizing import mean_item_bytes
from rhmapper.slots import Inbox, SlotIndex

TARGET_CALL_SECONDS = 0.25
"""Auto batches aim at about this much work per call: per-call overhead stays near 1%."""
MIN_CALL_SECONDS = 0.025
"""Near the end of an input, auto batches shrink, but not below about this much work per call."""
MAX_BATCH = 100_000
DEFAULT_MAX_CALL_BYTES = 16 * 2**20
"""A call carries about this many bytes of input at most; a larger item goes alone."""
DEFAULT_WINDOW = 16_384
"""imap/imap_unordered keep at most this many items pulled from the input but not yet yielded."""
WAIT_TICK_SECONDS = 0.2
BATCH_BUDGET_SLACK = 4.0
"""Under ``timeout=``, a batch may run this many times its measured run time (plus one
``timeout``) before its items are sent again one by one."""
QUEUE_AHEAD_SECONDS = 0.005
"""With a fixed ``batch_size``, a call expected to take less than this may wait in the queue of
a replica whose slots are all busy (one such call per replica), so that the replica never idles
for the round trip to the driver. A replica asks whether the map still runs only for a call queued longer than this
(`rhmapper.signals`), so a queued short call costs no extra question."""
_EWMA_WEIGHT = 0.3
_EMPTY = object()
_RETRYING = object()
"""What `MapRun._failed` returns when the item will run again."""


class Replica(Protocol):
    """What the scheduler needs of a replica."""

    name: str
    capacity: int
    """How many calls it may have in flight."""
    in_flight: int
    """How many it has (counted by the pool: `Pool.submit` takes a slot, `Pool.fetch` and an
    abandoned call's answer give it back)."""
    queues_ahead: bool
    """Whether one more call may wait in its queue while its slots are full (an auto replica);
    your actors never get more calls than they run at once."""

    def max_items(self, call: "CallSpec") -> int | None:
        """The most items one call of ``call`` may carry on this replica (``None``: any)."""


class Pool(Protocol):
    """What the scheduler needs of the pool of replicas."""

    slots: SlotIndex
    """The ready replicas by load. The pool keeps it current: `submit` takes a slot, `fetch`
    (or the answer of an abandoned call) gives it back, and replicas join and leave it as they
    become ready, restart, are benched or die."""

    def wait(self, inbox: Inbox, timeout: float) -> list:
        """Wait up to ``timeout`` seconds until calls of ``inbox`` answered or the pool changed
        (a replica became ready, an abandoned call gave its slot back); return the answered calls.

        Raises `rhmapper.NoReplicasError` when no replica is alive or starting.
        """

    def submit(self, replica: Replica, call: "CallSpec", start: int, items: list,
               budget: float | None, inbox: Inbox) -> Any:
        """Start one call on ``replica`` with ``items`` (indices from ``start``), taking one of
        its slots; return a token that ``inbox`` receives when the call answers. ``budget`` is
        the call's time limit in seconds (``None``: none): the replica starts no item once it
        has passed."""

    def fetch(self, token: Any, replica: Replica) -> BatchReply:
        """The reply of an answered call, giving its slot back; raises `ReplicaDied` if its
        replica died."""

    def abandon(self, token: Any, replica: Replica, deadline: float | None) -> None:
        """Cancel a call whose result is no longer wanted. Its slot stays taken until the replica
        gives it back. A call still running a grace period past its ``deadline`` (a
        ``time.monotonic()`` value: now for a call that timed out, its map's deadline for a call
        of a map that ended early; ``None``: no time limit) takes its replica out of rotation:
        an auto replica is restarted, your actor benched until it answers."""

    def sent_at(self, token: Any, replica: Replica) -> float | None:
        """When the call ``token`` reached its replica's transport (``time.monotonic()``), or
        ``None`` while it waits in the driver (a compiled graph still compiling): a call's
        ``timeout=`` runs from then."""

    def lost(self, replica: Replica, reason: BaseException) -> None:
        """A replica died: drop it, and replace it if the pool owns it."""

    def unavailable(self, replica: Replica) -> None:
        """A replica failed its calls but may come back (restarting): take no calls to it until
        it answers again; drop it if it turns out dead."""


@dataclass(frozen=True)
class MapPlan:
    """The options of one map, as the scheduler needs them."""

    call: CallSpec
    ordered: bool = True
    collect: bool = False
    total: int | None = None
    retries: Retries = field(default_factory=Retries)
    return_exceptions: bool = False
    timeout: float | None = None
    batch_size: int | str = "auto"
    max_replica_crashes: int = 3
    window: int | None = DEFAULT_WINDOW
    max_call_bytes: int = DEFAULT_MAX_CALL_BYTES


@dataclass
class _Call:
    replica: Replica
    start: int
    items: list
    is_retry: bool
    deadline: float | None
    budget: float | None


@dataclass(order=True)
class _Retry:
    not_before: float
    index: int
    item: Any = field(compare=False)
    avoid: Any = field(compare=False)
    """The replica it failed on (replicas of several clusters may share a name)."""


@dataclass
class MapStats:
    """Counters of one map, for the progress bar and for callers.

    Examples:
        >>> MapStats().done
        0
    """

    done: int = 0
    retries: int = 0
    failures: int = 0
    replicas_lost: int = 0


def add_note(error: BaseException, note: str) -> None:
    """Attach a PEP 678 note to ``error`` (also on Python 3.10, which lacks ``add_note``).

    Examples:
        >>> error = ValueError("x"); add_note(error, "item 3"); error.__notes__
        ['item 3']
    """
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def user_error(failure: RemoteFailure, index: int, replica_name: str) -> BaseException:
    """The exception the caller sees for an item: the user's own type, noted with where it failed.

    Examples:
        >>> failure = RemoteFailure.capture(ValueError("bad"))
        >>> error = user_error(failure, 7, "double_replica_0")
        >>> type(error).__name__, error.__notes__[-1]
        ('ValueError', 'rhmapper: item 7 failed on replica double_replica_0')
    """
    error = remote_error(failure)
    add_note(error, f"rhmapper: item {index} failed on replica {replica_name}")
    return error


def remote_error(failure: RemoteFailure) -> BaseException:
    """The exception a replica raised, rebuilt here (else an `RhmapperError` naming it), with
    its remote traceback as a note.

    Examples:
        >>> error = remote_error(RemoteFailure.capture(KeyError("k")))
        >>> type(error).__name__, error.__notes__[0].splitlines()[0]
        ('KeyError', 'Remote traceback:')
    """
    error = failure.error
    if error is None:
        problem = failure.rebuild_problem
        error = RhmapperError(f"{failure.type_name}: {failure.message}"
                              + (f" (the exception could not be {problem})" if problem else ""))
    add_note(error, f"Remote traceback:\n{failure.remote_traceback.rstrip()}")
    return error


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


class _OrderedSink:
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


class _UnorderedSink:
    """Results of ``imap_unordered``: each value as soon as it is ready."""

    def __init__(self) -> None:
        self._ready: list = []
        self.emitted = 0

    def put(self, start: int, values: list, holes: set[int]) -> None:
        if holes:
            values = [value for position, value in enumerate(values) if start + position not in holes]
        self._ready.extend(values)

    def fill(self, index: int, value: Any) -> None:
        self._ready.append(value)

    def drain(self) -> list[list]:
        ready, self._ready = self._ready, []
        self.emitted += len(ready)
        return [ready] if ready else []


class MapRun:
    """One map's dispatch loop over a pool. Iterate `chunks` to drive it.

    Examples:
        >>> from tests.fakes import FakePool  # the in-process pool of the unit tests
        >>> plan = MapPlan(CallSpec("fn"), collect=True, total=3, window=None)
        >>> run = MapRun(FakePool(2, fn=lambda x: 10 * x), plan, iter([1, 2, 3]))
        >>> for _ in run.chunks():
        ...     pass
        >>> run.results
        [10, 20, 30]
    """

    def __init__(
        self,
        pool: Pool,
        plan: MapPlan,
        source: Iterator,
        on_progress: Callable[[int, MapStats], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        self._pool = pool
        self._plan = plan
        self._source = source
        self._on_progress = on_progress
        self._cancelled = cancelled or threading.Event()
        self._next_index = 0
        self._source_done = False
        self._wanted = 0
        """Items the last dispatch would have sent but had not pulled yet (see `_dispatch`)."""
        self._inbox = Inbox()
        self._in_flight: dict[Any, _Call] = {}
        self._in_flight_on: dict[Replica, int] = {}
        """This map's calls in flight per replica (abandoned calls are not counted)."""
        self._deadlines: list[tuple[float, int, Any]] = []
        """A heap of (deadline, sequence, token); entries of calls that answered are skipped."""
        self._sequence = itertools.count()
        self._due: collections.deque[_Retry] = collections.deque()
        self._delayed: list[_Retry] = []
        """A heap of retries waiting for their back-off delay."""
        self._attempts: dict[int, int] = {}
        self._crashes: dict[int, int] = {}
        self._measured_seconds = 0.0
        self._measured_items = 0.0
        """Decaying sums of the items' run time and count: the per-item time weighs each call
        by its items, so one-item probes do not outweigh the large calls that follow."""
        self._bytes_per_item: float | None = None
        """A decaying mean of the input items' size, which sizes the next pulls."""
        self._held_item_bytes = 0.0
        """The mean size of the items held (of the larger pull, when two are held), which
        bounds the call that sends them."""
        self._replica_deaths = 0
        self._held: collections.deque = collections.deque()
        """Items pulled from the source and not sent yet."""
        self._benched_since: float | None = None
        """Since when no replica could take work because all are benched (see `_wait`)."""
        self.stats = MapStats()
        if plan.collect:
            self._sink: _ListSink | _OrderedSink | _UnorderedSink = _ListSink(plan.total or 0)
        elif plan.ordered:
            self._sink = _OrderedSink()
        else:
            self._sink = _UnorderedSink()

    @property
    def results(self) -> list:
        """The collected results, in input order (``collect=True`` plans only)."""
        assert isinstance(self._sink, _ListSink)
        return self._sink.values

    def chunks(self) -> Iterator[list]:
        """Run the map; yield lists of results as the plan's ordering allows."""
        first = next(self._source, _EMPTY)
        if first is _EMPTY:
            return  # an empty input ends at once, whether or not any replica is ready yet
        self._source = itertools.chain([first], self._source)
        try:
            while True:
                if self._cancelled.is_set():
                    raise MapCancelledError("the map was cancelled with Mapper.cancel()")
                self._dispatch()
                if not self._in_flight and not self._due and not self._delayed and self._exhausted:
                    yield from self._sink.drain()
                    return
                self._inbox.owed = len(self._in_flight)
                for token in self._wait():
                    if token in self._in_flight:  # else it timed out while its answer came
                        self._complete(token)
                self._expire_deadlines()
                yield from self._sink.drain()
        finally:
            self._cancel_all()

    # -- dispatch ---------------------------------------------------------------------------

    @property
    def _exhausted(self) -> bool:
        return self._source_done and not self._held

    def _dispatch(self) -> None:
        """Send what the free slots take. The pool's lock is held from choosing a replica to
        taking its slot (other maps of the pool choose after this one), but inputs are pulled
        outside it: a slow or blocking input iterator holds up its own map only."""
        while True:
            self._wanted = 0
            with self._pool.slots.lock:
                self._dispatch_locked()
            if not self._wanted:
                return
            self._prefetch(self._wanted)

    def _dispatch_locked(self) -> None:
        slots = self._pool.slots
        spare = int(self._may_queue_ahead())
        while True:
            retry = self._next_retry()
            if retry is not None:
                # A retry starts at once (never queued ahead), away from the replica it failed
                # on while another one has a free slot or a call of this map that will free one.
                replica = slots.least_loaded(avoid=retry.avoid)
                if replica is not None and (retry.avoid is not replica
                                            or not self._others_busy(replica)):
                    self._due.popleft()
                    self._send(replica, retry.index, [retry.item], True)
                    continue
            replica = slots.least_loaded(spare)
            if replica is None:
                return
            max_items = replica.max_items(self._plan.call)
            queued = replica.in_flight >= replica.capacity
            if queued and not replica.queues_ahead:
                return
            work = self._take_fresh(slots.total, max_items, queued)
            if work is None:
                return
            self._send(replica, *work)

    def _send(self, replica: Replica, start: int, items: list, is_retry: bool) -> None:
        deadline = budget = None
        if self._plan.timeout is not None:
            budget = self._budget(len(items))
            deadline = time.monotonic() + budget
        token = self._pool.submit(replica, self._plan.call, start, items, budget, self._inbox)
        self._in_flight[token] = _Call(replica, start, items, is_retry, deadline, budget)
        self._in_flight_on[replica] = self._in_flight_on.get(replica, 0) + 1
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._sequence), token))

    def _may_queue_ahead(self) -> bool:
        """Whether a short call (see `QUEUE_AHEAD_SECONDS`) may wait in a busy replica's queue:
        only with a fixed ``batch_size`` (auto batches are sized so that the round trip does not
        matter), not under ``timeout=`` (a call's budget starts when it is sent), and not once a
        replica died during the map (a queued call shares its replica's fate, and would count a
        crash)."""
        return (isinstance(self._plan.batch_size, int) and self._plan.timeout is None
                and self._per_item_seconds is not None and not self._replica_deaths)

    def _others_busy(self, replica: Replica) -> bool:
        """Whether this map has calls in flight on replicas other than ``replica``."""
        return len(self._in_flight) > self._in_flight_on.get(replica, 0)

    def _next_retry(self) -> _Retry | None:
        """The first due retry (retries whose delay has passed join the due queue in order)."""
        if self._delayed:
            now = time.monotonic()
            while self._delayed and self._delayed[0].not_before <= now:
                self._due.append(heapq.heappop(self._delayed))
        return self._due[0] if self._due else None

    def _take_fresh(self, slots: int, max_items: int | None, queued: bool = False
                    ) -> tuple[int, list, bool] | None:
        """The next items from the input for one call (``None``: none to send now). A call
        that would wait in its replica's queue (``queued``) is sent only if it is short."""
        if self._exhausted:
            return None
        size = self._batch_size(slots)
        if max_items is not None:
            size = min(size, max_items)
        if size <= 0:
            return None
        if queued and size * (self._per_item_seconds or 0.0) >= QUEUE_AHEAD_SECONDS:
            return None
        if self._bytes_per_item:
            size = min(size, max(1, int(self._plan.max_call_bytes // self._bytes_per_item)))
        if len(self._held) < size and not self._source_done:
            self._wanted = size - len(self._held)  # pulled outside the lock, then sent
            return None
        fits = max(1, int(self._plan.max_call_bytes // max(self._held_item_bytes, 1.0)))
        count = min(size, fits, len(self._held))
        if count == len(self._held):  # the usual case (the pull was sized for this call): in C
            items = list(self._held)
            self._held.clear()
        else:
            items = [self._held.popleft() for _ in range(count)]
        start = self._next_index
        self._next_index += len(items)
        return start, items, False

    def _prefetch(self, count: int) -> None:
        """Pull up to ``count`` items from the source into `_held` (not under the pool's lock),
        and measure their size for the byte bound of the calls that carry them."""
        items = list(itertools.islice(self._source, count))
        if len(items) < count:
            self._source_done = True
        if not items:
            return
        per_item = mean_item_bytes(items)
        self._held_item_bytes = max(self._held_item_bytes, per_item) if self._held else per_item
        previous = self._bytes_per_item
        self._bytes_per_item = per_item if previous is None else (
            previous + _EWMA_WEIGHT * (per_item - previous))
        self._held.extend(items)

    def _batch_size(self, slots: int) -> int:
        plan = self._plan
        room = MAX_BATCH
        if plan.window is not None:
            outstanding = self._next_index - self._sink.emitted
            room = min(plan.window - outstanding, max(1, plan.window // (2 * slots)))
        if isinstance(plan.batch_size, int):
            return min(plan.batch_size, room)
        if plan.call.is_async and plan.timeout is None and plan.total is not None:
            # An async call's items await together: the call takes about as long as its slowest
            # item, so an equal share of the map per slot costs no more time than one item.
            size = math.ceil(plan.total / slots)
            return max(1, min(size, room)) if room > 0 else 0
        if self._per_item_seconds is None:
            return min(1, room)
        per_item = max(self._per_item_seconds, 1e-7)
        size = int(TARGET_CALL_SECONDS / per_item)
        if plan.total is not None:
            # Guided self-scheduling: shares shrink toward the end so slots finish together,
            # but never below a call's worth of work for the per-call overhead to stay small,
            # nor below an equal share (two calls per slot) of a map smaller than that.
            guided = math.ceil((plan.total - self._next_index) / (2 * slots))
            floor = min(int(MIN_CALL_SECONDS / per_item), math.ceil(plan.total / (2 * slots)))
            size = min(size, max(guided, floor))
        return max(1, min(size, room)) if room > 0 else 0

    # -- completion -------------------------------------------------------------------------

    def _complete(self, token: Any) -> None:
        call = self._forget(token)
        try:
            reply = self._pool.fetch(token, call.replica)
        except ReplicaDied as died:
            self._replica_died(call, died)
            return
        ran = reply.not_started[0] if reply.not_started else len(call.items)
        if ran and reply.seconds is not None:
            self._measure(ran, reply.seconds)
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

    def _not_started(self, index: int, call: _Call, reason: str) -> BaseException:
        if reason == "timeout":
            return TimeoutError(f"item {index} was not started on replica {call.replica.name}: its "
                                f"call was past its timeout={self._plan.timeout}s deadline")
        return RhmapperError(f"item {index} was not started on replica {call.replica.name}: the "
                             "replica was told its map had ended while the map still ran")

    def _measure(self, items: int, seconds: float) -> None:
        keep = 1.0 - _EWMA_WEIGHT
        self._measured_seconds = keep * self._measured_seconds + seconds
        self._measured_items = keep * self._measured_items + items

    @property
    def _per_item_seconds(self) -> float | None:
        if not self._measured_items:
            return None
        return self._measured_seconds / self._measured_items

    def _deliver(self, call: _Call, values: list, holes: set[int]) -> None:
        if call.is_retry:
            if not holes:
                self._sink.fill(call.start, values[0])
        else:
            self._sink.put(call.start, values, holes)
        done = len(values) - len(holes)
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
            self._retry(_Retry(time.monotonic() + self._plan.retries.delay(attempt), index, item,
                               replica))
            return _RETRYING
        self.stats.failures += 1
        exception = make_error()
        if self._plan.return_exceptions:
            return exception
        raise exception

    def _replica_died(self, call: _Call, died: ReplicaDied) -> None:
        self._replica_deaths += 1
        if died.permanent:
            self.stats.replicas_lost += 1
            self._pool.lost(call.replica, died)
        else:
            self._pool.unavailable(call.replica)
        holes = set(range(call.start, call.start + len(call.items)))
        resolved: dict[int, Any] = {}
        for position, item in enumerate(call.items):
            index = call.start + position
            if died.blames_items:
                self._crashes[index] = self._crashes.get(index, 0) + 1
            crashes = self._crashes.get(index, 0)
            if crashes < self._plan.max_replica_crashes:
                self._retry(_Retry(0.0, index, item, call.replica))
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
        self.stats.done += len(resolved)
        if resolved and self._on_progress is not None:
            self._on_progress(len(resolved), self.stats)

    # -- time -------------------------------------------------------------------------------

    def _wait(self) -> list:
        """The calls that answered (`Pool.wait`). When every replica is your actor benched by a
        call that outlived ``timeout=``, a map with ``return_exceptions=True`` waits up to one
        ``timeout`` for one to come back; then the items it could not start get ``TimeoutError``
        values (`_fail_unstarted`), as items that missed their deadline."""
        try:
            answered = self._pool.wait(self._inbox, self._wait_seconds())
        except NoReplicasError as error:
            timeout = self._plan.timeout
            if not (error.benched and timeout is not None and self._plan.return_exceptions):
                raise
            now = time.monotonic()
            self._benched_since = self._benched_since or now
            waited = now - self._benched_since
            if waited < timeout:
                time.sleep(min(WAIT_TICK_SECONDS, timeout - waited))
            else:
                self._fail_unstarted(str(error))
            return []
        self._benched_since = None
        return answered

    def _fail_unstarted(self, reason: str) -> None:
        """Give the due retries, and the next call's worth of fresh items, ``TimeoutError``
        values: they could not start within ``timeout`` (``reason`` says why)."""
        def error(index: int) -> TimeoutError:
            return TimeoutError(f"item {index} was not started within timeout="
                                f"{self._plan.timeout}s: {reason}")

        retries = [*self._due, *self._delayed]
        self._due.clear()
        self._delayed.clear()
        for retry in retries:
            self._sink.fill(retry.index, error(retry.index))
        size = self._batch_size(max(1, self._pool.slots.total))
        if len(self._held) < size and not self._source_done:
            self._prefetch(size - len(self._held))
        items = [self._held.popleft() for _ in range(min(size, len(self._held)))]
        start = self._next_index
        self._next_index += len(items)
        self._sink.put(start, [error(start + position) for position in range(len(items))], set())
        failed = len(retries) + len(items)
        self.stats.failures += failed
        self.stats.done += failed
        if failed and self._on_progress is not None:
            self._on_progress(failed, self.stats)

    def _retry(self, retry: _Retry) -> None:
        if retry.not_before <= time.monotonic():
            self._due.append(retry)
        else:
            heapq.heappush(self._delayed, retry)

    def _wait_seconds(self) -> float:
        """Until the next deadline or delayed retry, at most `WAIT_TICK_SECONDS`. A due retry
        still queued waits for a slot (a completion), not for a moment."""
        now = time.monotonic()
        soonest = now + WAIT_TICK_SECONDS
        while self._deadlines and self._deadlines[0][2] not in self._in_flight:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            soonest = min(soonest, self._deadlines[0][0])
        if self._delayed:
            soonest = min(soonest, self._delayed[0].not_before)
        return max(0.0, soonest - now)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, token = heapq.heappop(self._deadlines)
            call = self._in_flight.get(token)
            if call is None:
                continue
            if self._sent_late(token, call, now):
                continue
            self._forget(token)
            self._pool.abandon(token, call.replica, deadline=now)
            values = [None] * len(call.items)
            if len(call.items) > 1:
                holes = self._run_alone(call, 0)
            else:
                holes = self._fail_from(call, 0, values, lambda index: TimeoutError(
                    f"item {index} ran longer than timeout={self._plan.timeout}s "
                    f"on replica {call.replica.name}"))
            self._deliver(call, values, holes)

    def _sent_late(self, token: Any, call: _Call, now: float) -> bool:
        """Whether ``call`` reached its replica after it was submitted (or not yet: its compiled
        graph is compiling), so that its budget ends later than it seemed; its deadline then
        moves to when the budget really ends."""
        assert call.budget is not None
        sent_at = self._pool.sent_at(token, call.replica)
        deadline = (now if sent_at is None else sent_at) + call.budget
        if deadline <= now:
            return False
        call.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), token))
        return True

    def _budget(self, items: int) -> float:
        """How long a call of ``items`` may run under ``timeout=``: ``timeout`` for one item.
        A batch gets one ``timeout`` plus `BATCH_BUDGET_SLACK` times its measured run time (never
        more than ``timeout`` per item), so that a hung item is found about as fast as alone;
        a batch that outlives it runs again item by item (`_run_alone`), nothing failed."""
        timeout = self._plan.timeout
        assert timeout is not None
        if items == 1 or self._per_item_seconds is None:
            return timeout * items
        return min(timeout * items, timeout + BATCH_BUDGET_SLACK * items * self._per_item_seconds)

    def _run_alone(self, call: _Call, first: int) -> set[int]:
        """Send the call's items from position ``first`` on again, each in a call of its own,
        with no attempt counted: the batch outlived its budget (`_budget`), and which item was
        to blame is known only once each runs alone within ``timeout``."""
        holes = set()
        for position in range(first, len(call.items)):
            index = call.start + position
            self._retry(_Retry(0.0, index, call.items[position], call.replica))
            holes.add(index)
        return holes

    def _fail_from(self, call: _Call, first: int, values: list,
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

    def _cancel_all(self) -> None:
        for token, call in self._in_flight.items():
            self._pool.abandon(token, call.replica, deadline=call.deadline)
        self._in_flight.clear()
        self._in_flight_on.clear()

    def _forget(self, token: Any) -> _Call:
        call = self._in_flight.pop(token)
        self._in_flight_on[call.replica] -= 1
        return call

