"""Telling replicas that a map has ended, so that they start none of its items any more.

Ray runs an actor call that was queued before ``ray.cancel`` reached it (checked on Ray 2.60), so
cancelling is not enough to keep abandoned work from running. Each driver has a small async
actor, its end board; each map has a key on it, which the driver ends when the map ends. A call
carries only the board's name and the map's key (plain strings: no reference for Ray to track per
call). A replica asks the board once per map and process (`ended`): the answer comes back as an
``ObjectRef`` that becomes ready when the map ends, read through ``ObjectRef.future()`` from then
on, so later checks cost a flag read.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rhmapper import _ray_compat
from rhmapper.names import NAMESPACE, new_board_name
from rhmapper.pool_calls import ASK_AFTER_RUNNING_SECONDS

_ENDED_KEYS_KEPT = 100_000
"""A board remembers this many ended maps, so that a replica asking late still hears the end."""
_FIRST_CHECK_MAX_SECONDS = 0.1
_QUEUED_SECONDS = 0.005
"""A call that starts later than this after it was sent waited in the actor's queue: before it
starts anything, the replica waits for the board's answer."""
_FUTURES_KEPT = 64


class EndSignal(NamedTuple):
    """Where a replica learns that a map ended: the driver's board actor and the map's key.

    Examples:
        >>> EndSignal("rhmapper_end_board_1a2b", "9f8e").key
        '9f8e'
    """

    board: str
    key: str


class _EndBoard:
    """One per driver process: ``wait(key)`` returns once ``end(key)`` was called."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Event] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    async def wait(self, key: str) -> bool:
        if key not in self._ended:
            await self._waiting.setdefault(key, asyncio.Event()).wait()
        return True

    async def end(self, key: str) -> None:
        self._ended[key] = None
        while len(self._ended) > _ENDED_KEYS_KEPT:
            self._ended.popitem(last=False)
        event = self._waiting.pop(key, None)
        if event is not None:
            event.set()


_boards: dict[tuple[str, str], tuple[str, Any]] = {}
_lock = threading.Lock()


def start_board() -> tuple[str, Any]:
    """This driver's board, as (name, handle): one per Ray session and job, started on first
    use on the driver's node (so that it lives as long as the driver), gone with the job.
    A mapper starts it when it is created, beside its replicas, so that no map waits for it.

    Examples:
        >>> name, handle = start_board()
        >>> name.startswith("rhmapper_end_board_")
        True
    """
    context = ray.get_runtime_context()
    session = (context.get_session_name(), context.get_job_id())
    with _lock:
        if session not in _boards:
            name = new_board_name()
            handle = ray.remote(_EndBoard).options(
                name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=100_000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(context.get_node_id(),
                                                                   soft=True)).remote()
            _boards[session] = (name, handle)
        return _boards[session]


def open_end_signal(key: str | None = None) -> tuple[EndSignal, Callable[[], None]]:
    """A new map's end signal, and the function to call when the map ends. ``key`` names the
    map (default: a new one; a map on several clusters uses one key on each cluster's board).

    Examples:
        >>> signal, end = open_end_signal()
        >>> end()  # the map ended: its replicas start none of its items any more
    """
    name, board = start_board()
    key = key or uuid.uuid4().hex

    def end() -> None:
        board.end.remote(key)

    return EndSignal(name, key), end


_futures: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
"""Per map key: the board's answer (an ``ObjectRef``) and its future."""
_board_handles: dict[str, Any] = {}


def ended(signal: EndSignal, queued_seconds: float, running_seconds: float) -> bool:
    """Whether the map of ``signal`` has ended (in a replica), for a call that waited
    ``queued_seconds`` in its actor's queue and has run for ``running_seconds``.

    A replica asks the board once per map and process, and only when it matters: a call that
    waited in the queue (more than 5 ms) asks before it starts anything and waits for the answer
    up to as long as it waited (at most 0.1 s), so that a call queued while its map ended runs
    none of its items; a call that has run for 20 ms asks without waiting, and stops at the first
    check after the answer comes. Short calls that started at once never ask: most maps cost the
    board nothing. A board that cannot be reached signals nothing (the replica then goes on, as
    Ray alone would).

    Examples:
        >>> import time
        >>> signal, end = open_end_signal()
        >>> end(); time.sleep(0.5)
        >>> ended(signal, queued_seconds=0.1, running_seconds=0.0)  # waited 0.1 s in a queue
        True
    """
    with _lock:
        asked = _futures.get(signal.key)
    queued = queued_seconds >= _QUEUED_SECONDS
    if asked is None:
        if not queued and running_seconds < ASK_AFTER_RUNNING_SECONDS:
            return False  # started at once and runs briefly: its map was running a moment ago
        asked = _ask_once(signal)
        if asked is None:
            return False
        ref, future = asked
        if queued and not future.done():
            ready, _ = ray.wait([ref], timeout=min(queued_seconds, _FIRST_CHECK_MAX_SECONDS),
                                fetch_local=False)
            answer = _answer(lambda: ray.get(ref, timeout=1.0)) if ready else False
            return _resolve(signal, asked, answer)
    ref, future = asked
    if not future.done():
        return False
    return _resolve(signal, asked, _answer(lambda: future.result(timeout=1.0)))


def _ask_once(signal: EndSignal) -> tuple[Any, Any] | None:
    """Ask the board about ``signal``'s map, once per map and process: (ref, future)."""
    with _lock:
        asked = _futures.get(signal.key)
        if asked is None:
            ref = _ask(signal)
            if ref is None:
                return None
            asked = _futures[signal.key] = (ref, ref.future())  # the ref keeps the answer alive
            while len(_futures) > _FUTURES_KEPT:
                _futures.popitem(last=False)
        return asked


def _resolve(signal: EndSignal, asked: tuple[Any, Any], answer: bool | None) -> bool:
    if answer is None:
        # The question was asked from a call that ``ray.cancel`` reached (it cancels the tasks a
        # call started): ask again next time, and stop if it is this call that was cancelled
        # (an async actor's cancelled call gets CancelledError from Ray instead).
        with _lock:
            if _futures.get(signal.key) is asked:
                del _futures[signal.key]
        if _ray_compat.current_actor_is_async():
            return False  # Ray raises CancelledError in a cancelled call of an async actor
        return ray.get_runtime_context().is_canceled()
    return answer


def _ask(signal: EndSignal) -> Any:
    """Ask the board to answer when the map ends (``None``: the board is gone)."""
    if signal.board not in _board_handles:
        try:
            _board_handles[signal.board] = ray.get_actor(signal.board, namespace=NAMESPACE)
        except ValueError:  # the driver, and its board, are gone
            _board_handles[signal.board] = None
    board = _board_handles[signal.board]
    return None if board is None else board.wait.remote(signal.key)


def _answer(read: Callable[[], Any]) -> bool | None:
    """The board's answer: True (the map ended), False (the board is gone: no end was
    signalled), or None (the question was cancelled with the call that asked it)."""
    try:
        return read() is True
    except ray.exceptions.TaskCancelledError:
        return None
    except Exception:  # the board died with its node
        return False
