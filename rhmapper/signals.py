"""Telling replicas that a map has ended, so that they start none of its items any more.

Ray runs an actor call that was queued before ``ray.cancel`` reached it (checked on Ray 2.60), so
cancelling is not enough to keep abandoned work from running. Each map gets an end signal: an
``ObjectRef`` that becomes ready when the map ends (it is the reply of a call to a small async
actor that returns only then). Replicas read it through ``ObjectRef.future()``: one subscription
per map and process, then a flag check before each item (see `rhmapper.module.CallGuard`).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class _EndBoard:
    """One per driver: holds an event per open map; ``wait(key)`` returns when it ends."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    async def wait(self, key: str) -> bool:
        await self._events.setdefault(key, asyncio.Event()).wait()
        self._events.pop(key, None)
        return True

    async def end(self, key: str) -> None:
        self._events.setdefault(key, asyncio.Event()).set()


_boards: dict[tuple[str, str], Any] = {}
_boards_lock = threading.Lock()


def _board() -> Any:
    """This driver's board actor (one per Ray session and job; started on first use, gone with
    the job)."""
    context = ray.get_runtime_context()
    job = (context.get_session_name(), context.get_job_id())
    with _boards_lock:
        if job not in _boards:
            # On the driver's node when it has one: the board then lives as long as the driver.
            node = NodeAffinitySchedulingStrategy(context.get_node_id(), soft=True)
            _boards[job] = ray.remote(_EndBoard).options(
                num_cpus=0, max_concurrency=100_000, namespace="rhmapper",
                scheduling_strategy=node).remote()
        return _boards[job]


def open_end_signal() -> tuple[list, Callable[[], None]]:
    """A new map's end signal, as ``([ObjectRef], end)``: call ``end()`` when the map ends.

    The reference travels in a list so that Ray passes it to the replicas as a reference, not
    as its (never ready) value.

    Examples:
        >>> signal, end = open_end_signal()  # doctest: +SKIP
        >>> end(); ray.get(signal[0])  # doctest: +SKIP
        True
    """
    board = _board()
    key = uuid.uuid4().hex
    signal = board.wait.remote(key)
    return [signal], lambda: board.end.remote(key)
