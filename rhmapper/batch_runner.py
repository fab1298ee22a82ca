"""What a replica does with one call: read its `CallRequest`, fetch its ``ObjectRef``
arguments and the map's constant keyword arguments, run its items under its `CallGuard`, and
pack the reply (a `BatchReply`).

`run_batch` runs the items in the calling thread (awaiting them, on one event loop for the call,
if they are coroutines); `run_batch_async` runs them concurrently on an async actor's event loop.
The replica actor classes that call them are in ``rhmapper.module``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.actor import ActorHandle

from rhmapper import _ray_compat
from rhmapper.batching import BatchedCall
from rhmapper.digests import input_digests
from rhmapper.signals import EndSignal, ended
from rhmapper.wire import (
    BatchReply,
    CallRequest,
    Guard,
    RemoteFailure,
    pack_values,
    types_of,
    use_by_value_pickler,
)

use_by_value_pickler(_ray_compat.RAY_CLOUDPICKLE)  # replicas' values and errors keep their class

_CACHE_ENTRIES = 8
_shared_objects: OrderedDict[tuple, Any] = OrderedDict()
"""The constant keyword arguments of recent maps, by their references (see `shared_kwargs`)."""
_shared_objects_lock = threading.Lock()


def _kwargs_key(kwargs: dict[str, Any]) -> tuple:
    return tuple((name, ref.binary()) for name, ref in kwargs.items())


def _cached_kwargs(key: tuple) -> dict[str, Any] | None:
    with _shared_objects_lock:
        if key in _shared_objects:
            _shared_objects.move_to_end(key)
            return _shared_objects[key]
    return None


def _cache_kwargs(key: tuple, value: dict[str, Any]) -> dict[str, Any]:
    with _shared_objects_lock:
        _shared_objects[key] = value
        while len(_shared_objects) > _CACHE_ENTRIES:
            _shared_objects.popitem(last=False)
    return value


def shared_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The map's constant keyword arguments, fetched from the object store once per map and
    cached in this process.

    ``kwargs`` maps each name to an ``ObjectRef``: the driver puts each value once per map, and
    the references travel inside the `CallRequest`, where Ray does not fetch them on every call.

    Examples:
        >>> shared_kwargs({"scale": ray.put(3)})
        {'scale': 3}
    """
    key = _kwargs_key(kwargs)
    cached = _cached_kwargs(key)
    if cached is not None:
        return cached
    return _cache_kwargs(key, dict(zip(kwargs, ray.get(list(kwargs.values())))))


async def shared_kwargs_async(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`shared_kwargs` without blocking the replica's event loop.

    Examples:
        >>> asyncio.run(shared_kwargs_async({"scale": ray.put(4)}))
        {'scale': 4}
    """
    key = _kwargs_key(kwargs)
    cached = _cached_kwargs(key)
    if cached is not None:
        return cached
    return _cache_kwargs(key, dict(zip(kwargs, await asyncio.gather(*kwargs.values()))))


@dataclass(frozen=True)
class _FetchFailed:
    """An argument whose ``ObjectRef`` could not be fetched."""

    error: Exception


async def _fetch(ref: Any) -> Any:
    try:
        return await ref
    except Exception as error:  # that item's failure, as the direct call would fail
        return _FetchFailed(error)


def _ref_positions(items: list, star: bool) -> list[tuple[int, int | None]]:
    """Where the items hold ``ObjectRef`` arguments: (item, argument or None for the item)."""
    kinds = set(map(type, itertools.chain.from_iterable(items))) if star else types_of(items)
    if not any(issubclass(kind, ray.ObjectRef) for kind in kinds):
        return []
    if star:
        return [(position, argument) for position, item in enumerate(items)
                for argument, value in enumerate(item) if isinstance(value, ray.ObjectRef)]
    return [(position, None) for position, item in enumerate(items)
            if isinstance(item, ray.ObjectRef)]


def _refs_at(items: list, positions: list[tuple[int, int | None]]) -> list:
    return [items[position] if argument is None else items[position][argument]
            for position, argument in positions]


def resolve_refs(items: list, star: bool) -> tuple[list, dict[int, RemoteFailure]]:
    """The items with every top-level ``ObjectRef`` argument replaced by its value, as Ray
    resolves the arguments of ``actor.method.remote(ref)``; fetched here, in the replica.

    Returns the items and, by position, the failures of items whose reference could not be
    fetched (the task that made it failed, or the object was lost).

    Examples:
        >>> resolve_refs([1, (2, 3)], star=False)
        ([1, (2, 3)], {})
    """
    positions = _ref_positions(items, star)
    if not positions:
        return items, {}
    refs = _refs_at(items, positions)
    try:
        values = ray.get(refs)
    except Exception:  # one reference failed: fetch them one by one to name the items it hit
        values = []
        for ref in refs:
            try:
                values.append(ray.get(ref))
            except Exception as error:  # that item's failure, as the direct call would fail
                values.append(_FetchFailed(error))
    return _substitute(items, positions, values)


async def resolve_refs_async(items: list, star: bool) -> tuple[list, dict[int, RemoteFailure]]:
    """`resolve_refs` without blocking the replica's event loop.

    Examples:
        >>> import asyncio
        >>> asyncio.run(resolve_refs_async([(1, 2)], star=True))
        ([(1, 2)], {})
    """
    positions = _ref_positions(items, star)
    if not positions:
        return items, {}
    values = await asyncio.gather(*map(_fetch, _refs_at(items, positions)))
    return _substitute(items, positions, values)


def _substitute(items: list, positions: list, values: list) -> tuple[list, dict[int, RemoteFailure]]:
    """Put fetched values in place; a reference that could not be fetched fails its item."""
    items = list(items)
    failures: dict[int, RemoteFailure] = {}
    for (position, argument), value in zip(positions, values):
        if isinstance(value, _FetchFailed):
            failures[position] = RemoteFailure.capture(value.error)
        elif argument is None:
            items[position] = value
        else:
            arguments = list(items[position])
            arguments[argument] = value
            items[position] = tuple(arguments)
    return items, failures


_SIGNAL_CHECK_SECONDS = 0.002
"""Replicas check a call's guard about this often between items."""


class CallGuard:
    """Tells a replica to start no more items of a call: when its map has ended (cancelled,
    failed, or abandoned by the driver) or the call is past its deadline.

    ``guard`` is the call's `rhmapper.wire.Guard` (its end signal, deadline, and when the
    driver sent it), ``None`` for none: then the replica runs every item.

    Examples:
        >>> CallGuard(Guard(None, None, deadline=0.0, sent_at=0.0)).stop_reason()
        'timeout'
        >>> CallGuard(Guard(None, None, deadline=None, sent_at=0.0)).stop_reason() is None
        True
    """

    def __init__(self, guard: Guard | None) -> None:
        if guard is None:
            self.deadline = self.sent_at = self.signal = None
        else:
            self.deadline, self.sent_at = guard.deadline, guard.sent_at
            self.signal = EndSignal(guard.board, guard.key) if guard.board is not None else None
        self.next_check = 0
        """The position of the next item before which to check (about every 2 ms of items)."""
        self._checked_at = 0.0
        self._checked_position = 0
        self._started_at = time.time()

    def stop_reason(self, position: int = 0) -> str | None:
        """``"timeout"``, ``"cancelled"``, or ``None`` to go on (before item ``position``)."""
        now = time.time()
        if self._checked_position < position:
            per_item = (now - self._checked_at) / (position - self._checked_position)
            self.next_check = position + max(1, min(4096, int(_SIGNAL_CHECK_SECONDS
                                                                / max(per_item, 1e-9))))
        else:
            self.next_check = position + 1
        self._checked_at, self._checked_position = now, position
        if self.deadline is not None and now > self.deadline:
            return "timeout"
        if self.signal is not None and ended(self.signal, self._queued_seconds(),
                                             now - self._started_at):
            return "cancelled"
        return None

    def _queued_seconds(self) -> float:
        return 0.0 if self.sent_at is None else self._started_at - self.sent_at


def _call_items(target: Callable, items: list, star: bool, kwargs: dict | None,
                failures: dict[int, RemoteFailure], guard: CallGuard
                ) -> tuple[list, tuple[int, str] | None]:
    """Call ``target`` on each item not already failed; a failing item does not stop the others,
    and no item starts once the guard says stop. Returns the values and where it stopped."""
    call = _caller(target, star, kwargs)
    skipped = deque(sorted(failures))  # arguments not fetched: never called
    values: list = []  # values[i] is item i's: len(values) is the next item's index
    position, count = 0, len(items)
    while position < count:
        reason = guard.stop_reason(position)
        if reason is not None:
            values.extend([None] * (count - position))
            return values, (position, reason)
        end = min(count, guard.next_check)
        while position < end:
            if skipped and skipped[0] == position:
                skipped.popleft()
                values.append(None)
                position += 1
                continue
            stop = min(end, skipped[0]) if skipped else end
            _call_span(call, items, position, stop, values, failures)
            position = stop
    return values, None


def _call_span(call: Callable[[Any], Any], items: list, start: int, stop: int, values: list,
               failures: dict[int, RemoteFailure]) -> None:
    """Append ``call(item)`` of ``items[start:stop]`` to ``values`` (in C, until an item
    raises: that item's failure is noted, and the items after it go on)."""
    while start < stop:
        try:
            values.extend(map(call, items[start:stop]))
            return
        except BaseException as error:  # noqa: B036 - even SystemExit costs only its own item
            failures[len(values)] = RemoteFailure.capture(error)
            values.append(None)
            start = len(values)


def _caller(target: Callable, star: bool, kwargs: dict | None) -> Callable[[Any], Any]:
    if star:
        return (lambda item: target(*item, **kwargs)) if kwargs else (lambda item: target(*item))
    return (lambda item: target(item, **kwargs)) if kwargs else target


def _reply(values: list, failures: dict[int, RemoteFailure], seconds: float,
           not_started: tuple[int, str] | None, digests: bytes | None = None) -> BatchReply:
    values, failures, packed = pack_values(values, failures, _is_ray_reference)
    return BatchReply(values, failures or None, seconds, packed, not_started, digests)


def _digests(request: CallRequest, items: list) -> bytes | None:
    """The digests of the call's items if it asks for them (a checkpointed map's: made here,
    before its items run, so an item its target changes in place is digested as it came)."""
    return input_digests(items, request.plain) if request.digests else None


_RAY_REFERENCES = (ray.ObjectRef, ActorHandle, ray.ObjectRefGenerator)


def _is_ray_reference(obj: Any) -> bool:
    """Whether ``obj`` is a Ray reference, which only Ray's serializer keeps alive across
    processes (a value holding one travels as a `RawValue`; see `pack_values`)."""
    return isinstance(obj, _RAY_REFERENCES)


def run_batch(instance: Any, request: CallRequest) -> BatchReply:
    """Run one call's items on a replica; a failing item does not stop its neighbours.

    ``request`` names the replica's method (``"fn"`` for a function replica), the items, their
    shape, the map's constant keyword arguments (fetched once per map, see `shared_kwargs`) and
    the call's `Guard` (see `CallGuard`). ``ObjectRef`` arguments are fetched here
    (`resolve_refs`; items of plain data hold none, see `CallRequest.plain`). A coroutine
    function's items are awaited (one event loop for the call) when the replica is not an async
    actor. Values travel packed (`pack_values`).

    Examples:
        >>> from types import SimpleNamespace
        >>> reply = run_batch(SimpleNamespace(fn=abs), CallRequest("fn", [-1, 2, "x"])).unpacked()
        >>> reply.values[:2], reply.failures[2].type_name
        ([1, 2], 'TypeError')
    """
    items, star = request.items, request.star
    target = getattr(instance, request.method)
    call_guard = CallGuard(request.guard)
    reason = call_guard.stop_reason()
    if reason is not None:
        return _reply([None] * len(items), {}, 0.0, (0, reason))
    items, failures = (items, {}) if request.plain else resolve_refs(items, star)
    kwargs = shared_kwargs(request.kwargs) if request.kwargs else None
    digests = _digests(request, items)
    started = time.perf_counter()  # the items' own time: what sizes the next calls
    if request.batched:
        batch, call, positions = _batched_call(target, items, star, kwargs, failures, call_guard)
        _run_to_its_end(_call_spans(batch, lambda start, stop: _settled(call(start, stop))))
        return _batched_reply(batch, positions, failures, len(items),
                              time.perf_counter() - started, digests)
    values, not_started = _call_items(target, items, star, kwargs, failures, call_guard)
    pending = _awaitable_positions(values)
    if pending:
        asyncio.run(_await_into(values, failures, pending))
    return _reply(values, failures, time.perf_counter() - started, not_started, digests)


async def run_batch_async(instance: Any, request: CallRequest) -> BatchReply:
    """`run_batch` for an ``async def`` function or method: the call's items run concurrently
    on the replica's event loop.

    Examples:
        >>> import asyncio
        >>> async def double(x):
        ...     await asyncio.sleep(0.01)
        ...     return 2 * x
        >>> from types import SimpleNamespace
        >>> request = CallRequest("fn", [1, 2])
        >>> asyncio.run(run_batch_async(SimpleNamespace(fn=double), request)).unpacked().values
        [2, 4]
    """
    items, star = request.items, request.star
    target = getattr(instance, request.method)
    reason = CallGuard(request.guard).stop_reason()
    if reason is not None:
        return _reply([None] * len(items), {}, 0.0, (0, reason))
    items, failures = (items, {}) if request.plain else await resolve_refs_async(items, star)
    kwargs = await shared_kwargs_async(request.kwargs) if request.kwargs else None
    digests = _digests(request, items)
    started = time.perf_counter()
    if request.batched:
        batch, call, positions = _batched_call(target, items, star, kwargs, failures,
                                               CallGuard(None))
        await _call_spans(batch, call)
        return _batched_reply(batch, positions, failures, len(items),
                              time.perf_counter() - started, digests)
    values, _ = _call_items(target, items, star, kwargs, failures, CallGuard(None))
    await _await_into(values, failures, _awaitable_positions(values))
    return _reply(values, failures, time.perf_counter() - started, None, digests)


def _batched_call(target: Callable, items: list, star: bool, kwargs: dict | None,
                  failures: dict[int, RemoteFailure], guard: CallGuard
                  ) -> tuple[BatchedCall, Callable[[int, int], Any], list[int]]:
    """The `BatchedCall` over the items not already failed (their reference could not be
    fetched), the function that calls ``target`` on a span of them (the span's items as one
    list, or with ``star`` one list per argument), and the items' positions in the call."""
    positions = [position for position in range(len(items)) if position not in failures]
    callable_items = [items[position] for position in positions]
    name = getattr(target, "__qualname__", repr(target))
    batch = BatchedCall(len(callable_items), name, guard.stop_reason)
    keywords = kwargs or {}
    if star:
        def call(start: int, stop: int) -> Any:
            return target(*map(list, zip(*callable_items[start:stop])), **keywords)
    else:
        def call(start: int, stop: int) -> Any:
            return target(callable_items[start:stop], **keywords)
    return batch, call, positions


def _batched_reply(batch: BatchedCall, positions: list[int], failures: dict[int, RemoteFailure],
                   size: int, seconds: float, digests: bytes | None) -> BatchReply:
    values: list = [None] * size
    for position, value in zip(positions, batch.values):
        values[position] = value
    for index, error in batch.errors.items():
        failures[positions[index]] = RemoteFailure.capture(error)
    not_started = batch.not_started and (positions[batch.not_started[0]], batch.not_started[1])
    return _reply(values, failures, seconds, not_started, digests)


async def _call_spans(batch: BatchedCall, call: Callable[[int, int], Any]) -> None:
    """Call the function on each span ``batch`` gives (awaiting what it returns, if awaitable)
    and tell ``batch`` what came of it."""
    while (span := batch.next_span()) is not None:
        try:
            result = call(*span)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as error:  # noqa: B036 - split until the items that raise
            batch.failed(*span, error)
            continue
        batch.answered(*span, result)


def _settled(result: Any) -> Any:
    """``result``, awaited on an event loop of its own if it is awaitable (on a thread that
    runs no loop: a replica that is not an async actor)."""
    return asyncio.run(_awaited(result)) if inspect.isawaitable(result) else result


def _run_to_its_end(coroutine: Any) -> None:
    """Run ``coroutine``, which awaits nothing unfinished, with no event loop."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a coroutine run without an event loop waited for something")


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _awaitable_positions(values: list) -> list[int]:
    """The positions of values to await: results of an ``async def`` target, or of a plain
    function that returns coroutines (a decorated ``async def``), told by the first value. An
    ``ObjectRef`` is awaitable too, but a result, as an actor call would return it."""
    first = next((value for value in values if value is not None), None)
    if not _to_await(first):
        return []
    return [position for position, value in enumerate(values) if _to_await(value)]


def _to_await(value: Any) -> bool:
    return inspect.isawaitable(value) and not isinstance(value, ray.ObjectRef)


async def _await_into(values: list, failures: dict[int, RemoteFailure], pending: list[int]) -> None:
    outcomes = await asyncio.gather(*(_outcome(values[position]) for position in pending))
    for position, outcome in zip(pending, outcomes):
        if isinstance(outcome, _ItemFailed):
            failures[position] = RemoteFailure.capture(outcome.error)
            values[position] = None
        else:
            values[position] = outcome


@dataclass(frozen=True)
class _ItemFailed:
    error: BaseException


async def _outcome(awaitable: Any) -> Any:
    """Await one item; its exception (even ``SystemExit``) is its own failure, but the call's
    own cancellation goes on up."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as error:  # noqa: B036 - even SystemExit costs only its own item
        return _ItemFailed(error)
