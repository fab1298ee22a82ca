"""The dispatch loop: per-replica slots, least-loaded choice, adaptive batches, ordering, retries,
timeouts and replica loss.

The scheduler knows nothing of Ray, envs or progress bars. It talks to a `Pool` that submits
calls to its `Replica` objects and reports their completion, so the same loop runs on Ray
actors, on replicas of several clusters, or on in-process fakes in the unit tests.

`MapRun` is the loop; each job it hands off has a room of its own, all Ray-free:

```text
caller's iterator ─► InputFeed ─┐ items, pulled by a thread of the feed    input_feed.py
                     CallSizer ─┤ items per call, time budget per call     call_sizing.py
                   due retries ─┤                                          results.py
                                ▼
       MapRun._dispatch: least-loaded replica (pool.slots) ─► Pool.submit ─► replica
                                                                              │
       MapRun.chunks ◄─ ResultBook.drain ◄─ ResultBook.record ◄─ Pool.fetch ◄─┘ (via Inbox)
                        values in order,     failures: retry, or the exception
                        counters             (remote_errors.py)
```

`MapPlan` and `MapStats` live in `rhmapper.plan`, `add_note` and `remote_error` in
`rhmapper.remote_errors`; they stay importable from here.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Iterator, Protocol

from rhmapper.call_sizing import CallSizer
from rhmapper.deadlines import Deadlines
from rhmapper.errors import MapCancelledError, NoReplicasError
from rhmapper.input_feed import SEQUENCES, InputFeed, ListFeed
from rhmapper.pacing import Pacer
from rhmapper.plan import MapPlan, MapStats
from rhmapper.results import OnValues, ResultBook, SentCall
from rhmapper.slots import Inbox, SlotIndex
from rhmapper.slow_calls import SlowCalls
from rhmapper.wire import BatchReply, CallSpec, ReplicaDied

WAIT_TICK_SECONDS = 0.2


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
    node_id: str | None
    """Where it runs, once known (for logs and `rhmapper.pool_stats`)."""
    pid: int | None

    def max_items(self, call: "CallSpec") -> int | None:
        """The most items one call of ``call`` may carry on this replica (``None``: any)."""


class Pool(Protocol):
    """What the scheduler needs of the pool of replicas."""

    slots: SlotIndex
    """The ready replicas by load. The pool keeps it current: `submit` takes a slot, `fetch`
    (or the answer of an abandoned call) gives it back, and replicas join and leave it as they
    become ready, restart, are benched or die."""

    def wait(self, inbox: Inbox, timeout: float) -> list:
        """Wait up to ``timeout`` seconds until calls of ``inbox`` answered, the pool changed
        (a replica became ready, an abandoned call gave its slot back) or `notify` was called
        for ``inbox``; return what ``inbox`` received (answered calls, and `rhmapper.slots.INPUT_NEWS`).

        Raises `rhmapper.NoReplicasError` when no replica is alive or starting.
        """

    def notify(self, inbox: Inbox) -> None:
        """Put `rhmapper.slots.INPUT_NEWS` in ``inbox`` and wake the map waiting on it (from any thread): its
        input feed has items, or ended."""

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


class RunView:
    """What observers read of a running map (`rhmapper.pool_stats.PoolBoard`, from any thread):
    its counters, its calls in flight and its items waiting, read from the map's own
    containers.

    Examples:
        >>> from rhmapper.plan import MapStats
        >>> from rhmapper.results import ResultBook, SentCall
        >>> plan = MapPlan(CallSpec("fn"), total=10)
        >>> in_flight = {"token": SentCall("r0", 4, ["e", "f"], False, None, None, 1.5)}
        >>> view = RunView(MapStats(), in_flight, plan, ListFeed(list("abcdefghij"), 1 << 20),
        ...                ResultBook(plan, on_progress=None))
        >>> view.in_flight_calls(), view.waiting_items(), view.calls_running()
        (1, 10, [(4, 2, 'r0', 1.5)])
    """

    def __init__(self, stats: MapStats, in_flight: dict[Any, SentCall], plan: MapPlan,
                 feed: InputFeed | ListFeed, book: ResultBook) -> None:
        self.stats = stats
        self._in_flight, self._plan, self._feed, self._book = in_flight, plan, feed, book

    def in_flight_calls(self) -> int:
        """The map's calls in flight."""
        return len(self._in_flight)

    def waiting_items(self) -> int | None:
        """Items not yet sent, retries included (``None``: an iterator of unknown length)."""
        if self._plan.total is None:
            return None
        return self._plan.total - self._feed.next_index + self._retries()

    def backlog_items(self) -> int:
        """What the autoscaler counts as waiting: items not yet sent (of an iterator of unknown
        length, those held), within the window, and retries."""
        plan = self._plan
        waiting = plan.total - self._feed.next_index if plan.total is not None else (
            self._feed.held())
        if plan.window is not None:
            waiting = min(waiting, plan.window)
        return waiting + self._retries()

    def _retries(self) -> int:
        return len(self._book.due) + len(self._book.delayed)

    def calls_running(self) -> list[tuple[int, int, Any, float]]:
        """Each call in flight: its first item, its number of items, its replica and when it
        was sent (a copy, safe to take from another thread)."""
        return [(call.start, len(call.items), call.replica, call.sent_at)
                for call in list(self._in_flight.values())]


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
        source: Iterator | list,
        on_progress: Callable[[int, MapStats], None] | None = None,
        cancelled: threading.Event | None = None,
        on_values: OnValues | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self._pool = pool
        self._plan = plan
        self._cancelled = cancelled or threading.Event()
        self._inbox = Inbox()
        self._pacer = pacer
        """Set when the map is stepped by `rhmapper.async_driver` (it pauses, never blocks)."""
        if pacer is not None:
            self._inbox.on_put, pacer.slots = pacer.wake, pool.slots
        self._starved = False
        """The last dispatch had items to send and no free slot for them."""
        self._feed: InputFeed | ListFeed = (
            ListFeed(source, plan.max_call_bytes) if isinstance(source, SEQUENCES)
            else InputFeed(source, plan.max_call_bytes, plan.max_wait_seconds,
                           on_news=lambda: pool.notify(self._inbox)))
        self._sizer = CallSizer(plan)
        self._book = ResultBook(plan, on_progress, on_values)
        self.stats: MapStats = self._book.stats
        self._in_flight: dict[Any, SentCall] = {}
        self._in_flight_on: dict[Replica, int] = {}
        """This map's calls in flight per replica (abandoned calls are not counted)."""
        self._token_of: dict[int, Any] = {}
        """Calls in flight by `SentCall.seq` (what the deadlines and slow calls hold)."""
        self._deadlines = Deadlines()
        self._sequence = itertools.count()
        self._replica_deaths = 0
        self._lost: set[Replica] = set()  # replicas that died under this map's calls
        self._benched_since: float | None = None
        """Since when no replica could take work because all are benched (see `_wait`)."""
        self._board = pool.slots.board
        self._view = RunView(self.stats, self._in_flight, plan, self._feed, self._book)
        self._slow = SlowCalls()  # without timeout=: calls running far past the map's p99

    @property
    def item_seconds(self) -> float | None:
        """The run time of one item measured so far (``None`` before any call answered)."""
        return self._sizer.per_item_seconds

    @property
    def results(self) -> list:
        """The collected results, in input order (``collect=True`` plans only)."""
        return self._book.results

    def chunks(self) -> Iterator[list]:
        """Run the map; yield lists of results as the plan's ordering allows."""
        feed, book = self._feed, self._book
        while (empty := feed.is_empty(wait=self._pacer is None)) is None:
            yield from self._pause(WAIT_TICK_SECONDS)  # its input's first item wakes it
        if empty:
            return  # an empty input ends at once, whether or not any replica is ready yet
        map_id = self._board.map_started(self._view)
        book.announce()
        try:
            while True:
                if self._cancelled.is_set():
                    raise MapCancelledError("the map was cancelled with Mapper.cancel()")
                self._dispatch()
                self._report_backlog()
                if not self._in_flight and not book.due and not book.delayed and feed.exhausted:
                    yield from book.drain()
                    return
                self._inbox.owed = len(self._in_flight)
                if self._pacer is not None and not self._inbox:
                    yield from self._pause(self._wait_seconds())
                for token in self._wait():
                    if token in self._in_flight:  # else it timed out while its answer came
                        self._complete(token)
                self._expire_deadlines()
                self._slow.warn(time.monotonic(),
                                lambda seq: self._in_flight.get(self._token_of.get(seq)),
                                self.stats)
                yield from book.drain()
        finally:
            self._board.map_ended(map_id)
            feed.close()
            self._pool.slots.backlog.report(self._inbox, 0, None)
            self._cancel_all()

    def _pause(self, seconds: float) -> Iterator[list]:
        """Yield `PAUSE` to the async driver, to be stepped again after ``seconds`` or news."""
        assert self._pacer is not None
        return self._pacer.pauses(seconds, self._pool.slots if self._starved else None)

    def _report_backlog(self) -> None:
        """Tell the pool's autoscaler how many items wait (still to send, or to retry; within
        the window) and how long one takes."""
        if self._pool.slots.backlog.watched:
            self._pool.slots.backlog.report(
                self._inbox, self._view.backlog_items(),
                self._sizer.per_item_seconds or self._plan.item_seconds_hint)

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send what the free slots take. The pool's lock is held from choosing a replica to
        taking its slot (other maps of the pool choose after this one); the input is pulled by
        its feed's thread, so a slow or blocking iterator holds up no other map, nor this map's
        results."""
        with self._pool.slots.lock:
            self._starved = False
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        slots = self._pool.slots
        book = self._book
        spare = int(self._sizer.may_queue_ahead() and not self._replica_deaths)
        while True:
            retry = book.next_retry()
            if retry is not None:
                # A retry starts at once (never queued ahead), away from the replica it failed
                # on while another one has a free slot or a call of this map that will free one.
                replica = slots.least_loaded(avoid=retry.avoid)
                if replica is not None and (retry.avoid is not replica
                                            or not self._others_busy(replica)):
                    book.due.popleft()
                    self._send(replica, retry.index, [retry.item], True)
                    continue
            replica = slots.least_loaded(spare)
            if replica is None:
                self._starved = bool(book.due) or not self._feed.exhausted
                return
            max_items = replica.max_items(self._plan.call)
            queued = replica.in_flight >= replica.capacity
            if queued and not replica.queues_ahead:
                return
            work = self._sizer.next_call(self._feed, slots, self._book.emitted, max_items,
                                         queued, spare)
            if work is None:
                return
            self._send(replica, *work, False)

    def _send(self, replica: Replica, start: int, items: list, is_retry: bool) -> None:
        deadline = budget = None
        now = time.monotonic()
        if self._plan.timeout is not None:
            budget = self._sizer.budget(len(items))
            deadline = now + budget
        token = self._pool.submit(replica, self._plan.call, start, items, budget, self._inbox)
        seq = next(self._sequence)
        self._in_flight[token] = SentCall(replica, start, items, is_retry, deadline, budget, now,
                                          seq)
        self._token_of[seq] = token
        self._in_flight_on[replica] = self._in_flight_on.get(replica, 0) + 1
        if deadline is not None:
            self._deadlines.add(deadline, seq)
        else:
            self._slow.sent(now, seq)

    def _others_busy(self, replica: Replica) -> bool:
        """Whether this map has calls in flight on replicas other than ``replica``."""
        return len(self._in_flight) > self._in_flight_on.get(replica, 0)

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
            self._sizer.measure(ran, reply.seconds)
        stats = self.stats
        retries_before = stats.retries
        latency = time.monotonic() - call.sent_at
        stats.calls += 1
        stats.call_seconds.add(latency)
        try:
            self._book.record(call, reply, ran)
        finally:
            self._board.call_answered(call.replica, ran, len(reply.failures or ()),
                                      stats.retries - retries_before, reply.seconds, latency)

    def _replica_died(self, call: SentCall, died: ReplicaDied) -> None:
        self._replica_deaths += 1
        if died.permanent:
            if call.replica not in self._lost:  # its other calls in flight die with it
                self._lost.add(call.replica)
                self.stats.replicas_lost += 1
            self._pool.lost(call.replica, died)
        else:
            self._pool.unavailable(call.replica)
        self._book.replica_died(call, died)

    # -- time -------------------------------------------------------------------------------

    def _wait(self) -> list:
        """The calls that answered (`Pool.wait`). When every replica is your actor benched by a
        call that outlived ``timeout=``, a map with ``return_exceptions=True`` waits up to one
        ``timeout`` for one to come back; then the items it could not start get ``TimeoutError``
        values (`_fail_unstarted`), as items that missed their deadline."""
        try:
            answered = self._pool.wait(self._inbox,
                                       0.0 if self._pacer is not None else self._wait_seconds())
        except NoReplicasError as error:
            timeout = self._plan.timeout
            if not (error.benched and timeout is not None and self._plan.return_exceptions):
                raise
            now = time.monotonic()
            self._benched_since = self._benched_since or now
            waited = now - self._benched_since
            if waited < timeout:
                if self._pacer is None:  # a paused map waits its next pause instead
                    time.sleep(min(WAIT_TICK_SECONDS, timeout - waited))
            else:
                self._fail_unstarted(str(error))
            return []
        self._benched_since = None
        return answered

    def _fail_unstarted(self, reason: str) -> None:
        """Give the due retries, and the next call's worth of fresh items, ``TimeoutError``
        values: they could not start within ``timeout`` (``reason`` says why)."""
        feed = self._feed
        size = self._sizer.batch_size(max(1, self._pool.slots.total), feed.next_index,
                                      self._book.emitted)
        start, items = feed.take_now(size)
        self._book.fail_unstarted(start, len(items), reason)

    def _wait_seconds(self) -> float:
        """Until the next deadline, delayed retry or held input items' `InputFeed.ready_at`,
        at most `WAIT_TICK_SECONDS`. A due retry still queued, or held items past their wait,
        wait for a slot (a completion), not for a moment."""
        now = time.monotonic()
        soonest = now + WAIT_TICK_SECONDS
        ready_at = self._feed.ready_at()
        if ready_at is not None and ready_at > now:
            soonest = ready_at
        deadline = self._deadlines.soonest(self._token_of.__contains__)
        if deadline is not None:
            soonest = min(soonest, deadline)
        delayed = self._book.delayed
        if delayed:
            soonest = min(soonest, delayed[0].not_before)
        return max(0.0, soonest - now)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for seq in self._deadlines.due(now):
            token = self._token_of.get(seq)
            if token is None:
                continue
            call = self._in_flight[token]
            if self._sent_late(token, call, now):
                continue
            self._forget(token)
            self._pool.abandon(token, call.replica, deadline=now)
            self._board.timed_out(call.replica, len(call.items))
            self._book.timed_out(call)

    def _sent_late(self, token: Any, call: SentCall, now: float) -> bool:
        """Whether ``call`` reached its replica after it was submitted (or not yet: its compiled
        graph is compiling), so that its budget ends later than it seemed; its deadline then
        moves to when the budget really ends."""
        assert call.budget is not None
        sent_at = self._pool.sent_at(token, call.replica)
        deadline = (now if sent_at is None else sent_at) + call.budget
        if deadline <= now:
            return False
        call.deadline = deadline
        self._deadlines.add(deadline, call.seq)
        return True

    def _cancel_all(self) -> None:
        for token, call in self._in_flight.items():
            self._pool.abandon(token, call.replica, deadline=call.deadline)
        self._in_flight.clear()
        self._in_flight_on.clear()
        self._token_of.clear()

    def _forget(self, token: Any) -> SentCall:
        call = self._in_flight.pop(token)
        del self._token_of[call.seq]
        self._in_flight_on[call.replica] -= 1
        return call
