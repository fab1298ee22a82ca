"""Calls to one auto replica over a Ray Compiled Graph (``rm.mapper(..., compiled_graphs=True)``).

An ordinary actor call costs the driver and the actor about 0.9 ms of CPU together; a compiled
graph (``replica._rhmapper_run_compiled.bind(InputNode()).experimental_compile()``) passes the
same call through channels set up once, several times cheaper (see docs/benchmarks.md). The call
carries the same `rhmapper.wire.CallRequest`, run by the same batch code and guard, so a compiled
call keeps every promise of an ordinary one (`rhmapper.module.run_call_compiled` adds one
refusal: results that hold Ray references, which a channel does not count).

A graph is not thread-safe and its results have no ``future()``. So one thread per replica owns
its graph: it sends the calls the pool hands it, reads the answers in order, and completes a
`concurrent.futures.Future` for each, which the pool treats like an ``ObjectRef.future()``. The
thread sends the waiting calls before it completes an answer, so a call queued ahead reaches the
replica as soon as the call before it has answered, without a round trip through the scheduler.

The method then runs on Ray's compiled-graph thread of the actor, not on its main thread (where
the constructor and ordinary calls run), and Ray's channels spin while they wait (an open graph
keeps its idle replica busy; the thread here spins while a call runs): that is why the
transport is chosen, not the default, and why an idle graph is closed (`IDLE_SECONDS`).
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any, Callable

import ray
from ray.dag import InputNode

from rhmapper.errors import RhmapperError
from rhmapper.wire import CallRequest

_logger = logging.getLogger(__name__)

CLOSE_WAIT_SECONDS = 30.0
"""How long `CompiledCalls.wait_closed` waits for a teardown (Ray's own gives up after 30 s)."""
IDLE_SECONDS = 5.0
"""A graph without calls for this long is torn down, and set up again for the next call: Ray's
channels wait by spinning, so an open graph keeps its replica, and the thread reading it while
a call runs, about half a core busy (measured)."""

_compile_lock = threading.Lock()
"""Graphs are compiled one at a time: Ray does not say that compiling is thread-safe."""

_open_graphs: "weakref.WeakSet[CompiledCalls]" = weakref.WeakSet()
_open_graphs_lock = threading.Lock()
"""Guards `_open_graphs` (graph threads leave it while the exit hook reads it) and the flag."""
_exit_hook_registered = False


class GraphClosed(RhmapperError):
    """A call was handed to a replica whose compiled graph is closed (the replica left the
    pool, or its graph failed); the pool takes it for the replica's death, so its items run
    elsewhere."""


class CompiledCalls:
    """The compiled graph of one auto replica, and the thread that drives it.

    ``handle`` is the replica's actor (it has ``_rhmapper_run_compiled``); at most
    ``max_in_flight`` calls are sent and unanswered at once (more wait in the driver). The graph
    is compiled for the first call, and again for the first call after `IDLE_SECONDS` without.

    Examples:
        >>> import ray
        >>> from rhmapper.module import function_replica_class
        >>> from rhmapper.wire import BatchReply
        >>> actor = ray.remote(function_replica_class(abs)).remote(ray.put(abs))
        >>> calls = CompiledCalls(actor, max_in_flight=2, name="abs_replica_0")
        >>> reply = calls.submit(CallRequest("fn", [-3]), on_unsendable=lambda error: error)
        >>> BatchReply.from_wire(reply.result(timeout=60)).unpacked().values
        [3]
        >>> calls.close(kill=True); calls.wait_closed()
    """

    def __init__(self, handle: Any, max_in_flight: int, name: str) -> None:
        self._graph: Any = None
        """The compiled graph while open (only the thread touches it)."""
        self._handle = handle
        self._name = name
        self._max_in_flight = max_in_flight
        self._to_send: collections.deque[tuple[CallRequest, Future, Callable]] = collections.deque()
        self._sent: collections.deque[tuple[Any, Future, CallRequest]] = collections.deque()
        """Each call sent and not yet read, with its request: an item sent by reference
        (``ray.put``) must outlive the call, and a channel does not count references as a
        task's arguments do."""
        self._sending = 0
        """Calls taken from `_to_send` and not yet in `_sent` (being sent)."""
        self._closing = False
        self._kill = False
        self._done = False
        """Whether the thread has ended (a kill asked for later is then done by `close`)."""
        self._exiting = False
        """Set at interpreter exit: the thread then makes no Ray call and completes no call."""
        self._wake = threading.Condition()
        """Guards the seven above."""
        self._thread = threading.Thread(target=self._drive, name=f"rhmapper-graph-{name}",
                                        daemon=True)
        self._thread.start()
        _watch_at_exit(self)

    def submit(self, request: CallRequest,
               on_unsendable: Callable[[TypeError], BaseException]) -> Future:
        """Hand one call's request to the graph; the
        future completes with the replica's reply (see `rhmapper.module.run_call`). A request the
        graph cannot serialise fails the future with ``on_unsendable(error)``.

        The future's ``sent_at`` is when the thread sent the call over the graph
        (``time.monotonic()``), ``None`` until then: a call waits in the driver while its graph
        compiles (for the first call, and after `IDLE_SECONDS` idle), and its ``timeout=``
        runs from ``sent_at``, as does its guard's deadline in the replica
        (`CallRequest.sent_now`)."""
        future: Future = Future()
        future.sent_at = None  # type: ignore[attr-defined]
        with self._wake:
            if self._closing:
                future.set_exception(self._left_the_pool())
                return future
            self._to_send.append((request, future, on_unsendable))
            self._wake.notify()
        return future

    def kill_if_busy(self) -> None:
        """Kill the replica if a call is on it (sent, or being sent, and not answered)."""
        with self._wake:
            busy = bool(self._sent) or self._sending > 0
        if busy:
            self._kill_actor()

    def kill_at_exit(self) -> None:
        """At interpreter exit, before Ray shuts down: kill the replica if a call is on it, and
        let the thread touch Ray no more nor complete any call. A map thread woken by the death
        would replace the replica while Ray shuts down, and a Ray call after Ray's shutdown ends
        the process with status 1."""
        with self._wake:
            self._exiting = True
        self.kill_if_busy()

    def close(self, kill: bool) -> None:
        """Close the graph without waiting (see `wait_closed`): calls not yet sent fail with
        `GraphClosed`; the thread tears the graph down once the calls sent have answered, then
        kills the actor if ``kill``. A replica running a call is killed at once, as a running
        call cannot be interrupted and teardown would wait for it."""
        with self._wake:
            self._closing = True
            self._kill = kill
            done = self._done
            self._wake.notify()
        if kill and done:
            self._kill_actor()
        elif kill:
            self.kill_if_busy()

    def wait_closed(self, timeout: float = CLOSE_WAIT_SECONDS) -> None:
        """Wait for the teardown that `close` started (warns if it takes over ``timeout`` s)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            warnings.warn(f"the compiled graph of replica {self._name} is still tearing down "
                          f"after {timeout:.0f}s (a call is still running on it)",
                          RuntimeWarning, stacklevel=2)

    def _drive(self) -> None:
        try:
            while self._send_and_read_one():
                pass
        except Exception as error:  # a bug here would leave every waiting call hanging
            _logger.exception("rhmapper: the compiled graph of replica %s failed", self._name)
            self._fail_all(error)
        with self._wake:
            if self._exiting:  # Ray's own exit hook tears the graph down
                return
        try:
            self._close_graph()
        finally:
            with _open_graphs_lock:
                _open_graphs.discard(self)
            with self._wake:
                self._done = True
                kill = self._kill
            if kill:
                self._kill_actor()

    def _kill_actor(self) -> None:
        if ray.is_initialized():  # after ray.shutdown() its actors are gone already
            ray.kill(self._handle, no_restart=True)

    def _left_the_pool(self) -> GraphClosed:
        return GraphClosed(f"replica {self._name} left the pool")

    def _send_and_read_one(self) -> bool:
        """Send the waiting calls, then read the oldest answer; False once closed and done. A
        graph idle for `IDLE_SECONDS` is torn down."""
        with self._wake:
            while not (self._to_send or self._sent or self._closing):
                if not self._wake.wait(None if self._graph is None else IDLE_SECONDS):
                    break
            if self._exiting:
                return False
            idle = not (self._to_send or self._sent or self._closing)
        if idle:
            self._close_graph()
            return True
        self._send_waiting()
        with self._wake:
            if not self._sent:  # calls handed over meanwhile are sent, or failed, next turn
                return not self._closing or bool(self._to_send)
            ref, future, _ = self._sent[0]
        try:
            outcome: tuple[Any, BaseException | None] = (ref.get(timeout=-1), None)
        except Exception as error:  # the call's own outcome: the pool sorts it out in fetch
            outcome = (None, error)
        with self._wake:
            self._sent.popleft()
            if self._exiting:
                return False
        self._send_waiting()  # before completing: the replica starts its next call sooner
        value, error = outcome
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
        return True

    def _send_waiting(self) -> None:
        with self._wake:
            if self._exiting:
                return
            closing = self._closing
            room = len(self._to_send) if closing else self._max_in_flight - len(self._sent)
            waiting = [self._to_send.popleft() for _ in range(min(room, len(self._to_send)))]
            self._sending = len(waiting)
        for request, future, on_unsendable in waiting:
            ref = None
            if closing:
                future.set_exception(self._left_the_pool())
            else:
                try:
                    graph = self._open_graph(request.method)  # counts against no call's timeout=
                    request = request.sent_now(time.time())
                    future.sent_at = time.monotonic()  # type: ignore[attr-defined]
                    ref = graph.execute(request.to_wire())
                except TypeError as error:
                    future.set_exception(_described(on_unsendable, error))
                except Exception as error:  # the graph is broken (its actor died); fetch sorts it out
                    future.set_exception(error)
            with self._wake:
                self._sending -= 1
                if ref is not None:
                    self._sent.append((ref, future, request))

    def _open_graph(self, method: str) -> Any:
        """The graph, compiled first if closed. A graph just compiled runs one empty call of
        ``method`` (no items) before it is used: the replica's side of a graph starts after
        ``experimental_compile`` returns, and the first call would wait for it (measured: up to
        0.1 s on a busy machine) on its own ``timeout=``."""
        if self._graph is None:
            with InputNode() as wire:
                node = self._handle._rhmapper_run_compiled.bind(wire)
            with _compile_lock:
                self._graph = node.experimental_compile(
                    _max_inflight_executions=self._max_in_flight)
            self._graph.execute(CallRequest(method, []).to_wire()).get(timeout=-1)
        return self._graph

    def _close_graph(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            graph.teardown()

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            self._closing = True
            futures = [future for _, future, _ in self._to_send + self._sent]
            self._to_send.clear()
            self._sent.clear()
        for future in futures:
            if not future.done():
                closed = GraphClosed(f"the compiled graph of replica {self._name} failed: {error}")
                closed.__cause__ = error
                future.set_exception(closed)


def _described(on_unsendable: Callable[[TypeError], BaseException], error: TypeError
               ) -> BaseException:
    try:
        return on_unsendable(error)
    except Exception:  # describing it failed (an item's repr raised): the plain error it is
        _logger.exception("rhmapper: could not describe an input that cannot be sent")
        return error


def _watch_at_exit(calls: CompiledCalls) -> None:
    """Remember ``calls`` until its graph is torn down; once per process, register the exit
    hook that kills the replicas still running a call over a graph, before Ray's own exit tears
    the graphs down (it would wait up to 30 s for each such call)."""
    global _exit_hook_registered
    with _open_graphs_lock:
        _open_graphs.add(calls)
        if not _exit_hook_registered:
            atexit.register(_kill_busy_replicas)  # Ray registers its hook at import: ours runs first
            _exit_hook_registered = True


def _kill_busy_replicas() -> None:
    with _open_graphs_lock:
        open_graphs = list(_open_graphs)
    for calls in open_graphs:
        try:
            calls.kill_at_exit()
        except Exception:  # at exit: the other replicas still get theirs
            _logger.exception("rhmapper: could not kill a replica running a call at exit")
