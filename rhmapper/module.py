"""What a replica runs: the user's class spec, the host for plain functions, and the batch runner.

Auto replicas take a call's batch through their own ``_rhmapper_run`` method (or
``_rhmapper_run_async`` for an ``async def`` target, on the actor's event loop). Actors the user
brings run the same `run_batch` through ``__ray_call__``, which Ray gives every actor; an
``async def`` method of theirs is called directly, one item per call, as Ray would (see
``rhmapper.replicas``).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.actor import ActorHandle

from rhmapper import _ray_compat
from rhmapper.signals import EndSignal, ended
from rhmapper.wire import BatchReply, RawValue, RemoteFailure, pack_values, use_by_value_pickler

use_by_value_pickler(_ray_compat.RAY_CLOUDPICKLE)  # replicas' values and errors keep their class

_CACHE_ENTRIES = 8
_shared_objects: OrderedDict[tuple, Any] = OrderedDict()
"""The constant keyword arguments of recent maps, by their references (see `shared_kwargs`)."""
_shared_objects_lock = threading.Lock()


@dataclass(frozen=True)
class Module:
    """A class for replicas to build once each, with the arguments to build it with.

    Create it with `module`.

    Examples:
        >>> class Model:
        ...     def __init__(self, scale):
        ...         self.scale = scale
        >>> spec = module(Model, 3)
        >>> spec.build().scale
        3
    """

    cls: type
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def build(self) -> Any:
        """Build the user's object, as each replica does once when it starts.

        Examples:
            >>> module(dict, a=1).build()
            {'a': 1}
        """
        return self.cls(*self.args, **self.kwargs)


def plain_class(cls: Any) -> type:
    """The user's own class, given the class itself or its ``@ray.remote`` actor class.

    Examples:
        >>> class Model: ...
        >>> plain_class(Model) is Model
        True
    """
    if _ray_compat.is_actor_class(cls):
        return _ray_compat.user_class_of(cls)
    if not isinstance(cls, type):
        raise TypeError(f"expected a class or a @ray.remote class, got {cls!r}")
    return cls


def module(cls: type, *args: Any, **kwargs: Any) -> Module:
    """Describe a class that each replica builds once, as ``cls(*args, **kwargs)``.

    ``cls`` may be a plain class or its ``@ray.remote`` actor class. Map one of its methods
    with ``rm.mapper(rm.module(Model, "ckpt"), method="predict", replicas=4)``.

    Examples:
        >>> class Model:
        ...     def __init__(self, ckpt, device="cpu"):
        ...         self.ckpt, self.device = ckpt, device
        >>> spec = module(Model, "ckpt", device="cpu")
        >>> spec.cls.__name__, spec.args, spec.kwargs
        ('Model', ('ckpt',), {'device': 'cpu'})
    """
    return Module(plain_class(cls), args, dict(kwargs))


def run_call(instance: Any, payload: "Payload") -> list:
    """A replica's entry point for one call (auto replicas have it as ``_rhmapper_run``; your
    actors run it through ``__ray_call__``): `run_batch`, with the reply as a plain list.

    Examples:
        >>> run_call(FunctionReplica(abs), ["fn", [-3], False, None, None])[0]
        [3]
    """
    return run_batch(instance, payload).to_wire()


_NO_REFERENCES_OVER_GRAPHS = (
    "the item's result holds a Ray ObjectRef or actor handle, which a compiled graph cannot "
    "carry: Ray counts no references through a graph's channels, so the object (or actor) could "
    "be gone before the driver reads it. Return the value itself, or make the mapper without "
    "compiled_graphs=True.")


def run_call_compiled(instance: Any, payload: "Payload") -> list:
    """`run_call` for a call over the replica's compiled graph (``_rhmapper_run_compiled``,
    see `rhmapper.compiled`): a result that holds Ray references fails its item instead.

    Examples:
        >>> import ray
        >>> put_in_a_list = lambda x: [ray.put(x)]
        >>> reply = run_call_compiled(FunctionReplica(put_in_a_list), ["fn", [1], False, None, None])
        >>> reply[0], reply[1][0].type_name
        ([None], 'TypeError')
    """
    reply = run_batch(instance, payload)
    if not reply.packed or not any(isinstance(value, RawValue) for value in reply.values):
        return reply.to_wire()
    failures = dict(reply.failures or {})
    values = list(reply.values)
    for position, value in enumerate(values):
        if isinstance(value, RawValue):
            failures[position] = RemoteFailure.capture(TypeError(_NO_REFERENCES_OVER_GRAPHS))
            values[position] = None
    return BatchReply(values, failures, reply.seconds, True, reply.not_started).to_wire()


async def run_call_async(instance: Any, payload: "Payload") -> list:
    """`run_call` for ``async def`` targets (``_rhmapper_run_async``).

    Examples:
        >>> import asyncio
        >>> async def negate(x):
        ...     return -x
        >>> asyncio.run(run_call_async(FunctionReplica(negate), ["fn", [3], False, None, None]))[0]
        [-3]
    """
    return (await run_batch_async(instance, payload)).to_wire()


def is_async_callable(target: Any) -> bool:
    """Whether calling ``target`` returns a coroutine (``async def`` functions and methods,
    partials of them, objects with ``async def __call__``).

    Examples:
        >>> async def fetch(url): ...
        >>> is_async_callable(fetch), is_async_callable(len)
        (True, False)
    """
    return (inspect.iscoroutinefunction(target)
            or inspect.iscoroutinefunction(getattr(target, "__call__", None)))


def has_async_methods(cls: type) -> bool:
    """Whether Ray makes ``cls`` an async actor: it has an ``async def`` method.

    Examples:
        >>> class Client:
        ...     async def get(self, url): ...
        >>> has_async_methods(Client), has_async_methods(dict)
        (True, False)
    """
    return any(inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
               for _, member in inspect.getmembers(cls, inspect.isfunction))


class FunctionReplica:
    """The actor class of auto replicas that map a plain function: it holds the function as ``fn``.

    Examples:
        >>> FunctionReplica(abs).fn(-2)
        2
    """

    _rhmapper_run = run_call
    _rhmapper_run_compiled = run_call_compiled

    def __init__(self, fn: Callable) -> None:
        self.fn = fn


class AsyncFunctionReplica(FunctionReplica):
    """The actor class of auto replicas that map an ``async def`` function: an async actor whose
    calls await their items concurrently on its event loop.

    Examples:
        >>> import asyncio
        >>> async def double(x):
        ...     return 2 * x
        >>> payload = ["fn", [4], False, None, None]
        >>> asyncio.run(AsyncFunctionReplica(double)._rhmapper_run_async(payload))[0]
        [8]
    """

    _rhmapper_run_async = run_call_async


def function_replica_class(fn: Callable) -> type:
    """The actor class of auto replicas for the function ``fn``.

    Examples:
        >>> function_replica_class(abs).__name__
        'FunctionReplica'
    """
    return AsyncFunctionReplica if is_async_callable(fn) else FunctionReplica


def replica_class(cls: type) -> type:
    """The actor class of a module's auto replicas: the user's class plus ``_rhmapper_run``, the
    batch entry point (a direct actor method costs less per call than ``__ray_call__``), and for
    a class with ``async def`` methods (an async actor) ``_rhmapper_run_async`` as well.

    Examples:
        >>> class Model:
        ...     def predict(self, x):
        ...         return x
        >>> replica = replica_class(Model)()
        >>> isinstance(replica, Model), replica._rhmapper_run(["predict", [7], False, None, None])[0]
        (True, [7])
    """
    entry_points: dict[str, Any] = {"_rhmapper_run": run_call,
                                    "_rhmapper_run_compiled": run_call_compiled}
    if has_async_methods(cls):
        entry_points["_rhmapper_run_async"] = run_call_async
    return _subclass(cls, "replica_class", entry_points)


def _subclass(base: type, made_by: str, attributes: dict[str, Any]) -> type:
    """A subclass of ``base`` with ``attributes``, named as made inside ``made_by`` (so that
    cloudpickle ships it by value to the replicas)."""
    def body(namespace: dict) -> None:
        namespace.update(attributes, __module__=__name__,
                         __qualname__=f"{made_by}.<locals>.{base.__name__}")

    return types.new_class(base.__name__, (base,), exec_body=body)


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
    the references travel inside the payload, where Ray does not fetch them on every call.

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
    values = itertools.chain.from_iterable(items) if star else items
    if not any(issubclass(kind, ray.ObjectRef) for kind in set(map(type, values))):
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

    ``spec`` is ``[board, key, deadline, sent_at]``: the map's end signal (the board actor's
    name and the map's key, see `rhmapper.signals.EndSignal`; ``None`` and ``None`` for none), a
    wall-clock deadline in seconds since the epoch (or ``None``), and when the driver sent the
    call (``None``: it had no call ahead of it on the replica, so it waited in no queue; a
    compiled graph's thread knows). Plain values, so that Ray packs them without pickling.

    Examples:
        >>> CallGuard([None, None, 0.0, 0.0]).stop_reason()
        'timeout'
        >>> CallGuard([None, None, None, 0.0]).stop_reason() is None
        True
    """

    def __init__(self, spec: list | None) -> None:
        board, key, self.deadline, self.sent_at = spec or (None, None, None, 0.0)
        self.signal = EndSignal(board, key) if board is not None else None
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


def sent_now(payload: "Payload", now: float) -> "Payload":
    """``payload`` as sent at ``now`` (``time.time()``) rather than when the driver made it: its
    guard's deadline moves on by as long as the call waited in the driver. A compiled graph's
    thread sends a call only once the graph is compiled, and compiling counts against no call's
    ``timeout=`` (see `rhmapper.compiled`). When it was made stays as it is: a call that waited
    in the driver behind its replica's running call asks, before it starts, whether its map
    ended meanwhile (see `CallGuard`), as a call queued in the actor does.

    Examples:
        >>> sent_now(["fn", [1], False, None, [None, None, 10.0, 4.0]], now=5.5)[4]
        [None, None, 11.5, 4.0]
        >>> sent_now(["fn", [1], False, None, None], now=5.5)[4] is None
        True
    """
    guard = payload[4]
    if guard is None:
        return payload
    board, key, deadline, made_at = guard
    if deadline is not None:
        deadline += max(0.0, now - made_at)
    return [*payload[:4], [board, key, deadline, made_at]]


def _call_items(target: Callable, items: list, star: bool, kwargs: dict | None,
                failures: dict[int, RemoteFailure], guard: CallGuard
                ) -> tuple[list, tuple[int, str] | None]:
    """Call ``target`` on each item not already failed; a failing item does not stop the others,
    and no item starts once the guard says stop. Returns the values and where it stopped."""
    call = _caller(target, star, kwargs)
    unfetched = set(failures)  # items whose arguments could not be fetched: not called
    values: list = []  # values[i] is item i's: len(values) is the next item's index
    append = values.append
    position, count = 0, len(items)
    while position < count:
        reason = guard.stop_reason(position)
        if reason is not None:
            values.extend([None] * (count - position))
            return values, (position, reason)
        end = min(count, guard.next_check)
        for item in items[position:end]:
            if unfetched and len(values) in unfetched:
                append(None)
                continue
            try:
                append(call(item))
            except BaseException as error:  # noqa: B036 - even SystemExit costs only its own item
                failures[len(values)] = RemoteFailure.capture(error)
                append(None)
        position = end
    return values, None


def _caller(target: Callable, star: bool, kwargs: dict | None) -> Callable[[Any], Any]:
    if star:
        return (lambda item: target(*item, **kwargs)) if kwargs else (lambda item: target(*item))
    return (lambda item: target(item, **kwargs)) if kwargs else target


def _reply(values: list, failures: dict[int, RemoteFailure], seconds: float,
           not_started: tuple[int, str] | None) -> BatchReply:
    values, failures, packed = pack_values(values, failures, _is_ray_reference)
    return BatchReply(values, failures or None, seconds, packed, not_started)


_RAY_REFERENCES = (ray.ObjectRef, ActorHandle, ray.ObjectRefGenerator)


def _is_ray_reference(obj: Any) -> bool:
    """Whether ``obj`` is a Ray reference, which only Ray's serializer keeps alive across
    processes (a value holding one travels as a `RawValue`; see `pack_values`)."""
    return isinstance(obj, _RAY_REFERENCES)


Payload = list
"""``[method, items, star, kwargs, guard]``: see `run_batch`. A list of plain values, so that
Ray packs it without pickling (the items themselves are pickled only if they need it)."""


def run_batch(instance: Any, payload: Payload) -> BatchReply:
    """Run one call's items on a replica; a failing item does not stop its neighbours.

    ``payload`` is ``[method, items, star, kwargs, guard]``: the replica's method to call
    (``"fn"`` for a function replica), the items, whether each item is a tuple of positional
    arguments (else the single argument), the map's constant keyword arguments (see
    `shared_kwargs`) and the `CallGuard` spec. It travels as one argument because Ray serialises
    each argument of a call separately. ``ObjectRef`` arguments are fetched here
    (`resolve_refs`). A coroutine function's items are awaited (one event loop for the call)
    when the replica is not an async actor. Values travel packed per item (`pack_values`).

    Examples:
        >>> reply = run_batch(FunctionReplica(abs), ["fn", [-1, 2, "x"], False, None, None])
        >>> reply.values[:2], reply.failures[2].type_name
        ([1, 2], 'TypeError')
    """
    method, items, star, kwargs, guard = payload
    target = getattr(instance, method)
    call_guard = CallGuard(guard)
    reason = call_guard.stop_reason()
    if reason is not None:
        return _reply([None] * len(items), {}, 0.0, (0, reason))
    items, failures = resolve_refs(items, star)
    kwargs = shared_kwargs(kwargs) if kwargs else None
    started = time.perf_counter()  # the items' own time: what sizes the next calls
    values, not_started = _call_items(target, items, star, kwargs, failures, call_guard)
    pending = _awaitable_positions(values)
    if pending:
        asyncio.run(_await_into(values, failures, pending))
    return _reply(values, failures, time.perf_counter() - started, not_started)


async def run_batch_async(instance: Any, payload: Payload) -> BatchReply:
    """`run_batch` for an ``async def`` function or method: the call's items run concurrently
    on the replica's event loop.

    Examples:
        >>> import asyncio
        >>> async def double(x):
        ...     await asyncio.sleep(0.01)
        ...     return 2 * x
        >>> payload = ["fn", [1, 2], False, None, None]
        >>> asyncio.run(run_batch_async(FunctionReplica(double), payload)).values
        [2, 4]
    """
    method, items, star, kwargs, guard = payload
    target = getattr(instance, method)
    reason = CallGuard(guard).stop_reason()
    if reason is not None:
        return _reply([None] * len(items), {}, 0.0, (0, reason))
    items, failures = await resolve_refs_async(items, star)
    kwargs = await shared_kwargs_async(kwargs) if kwargs else None
    started = time.perf_counter()
    values, _ = _call_items(target, items, star, kwargs, failures, CallGuard(None))
    await _await_into(values, failures, _awaitable_positions(values))
    return _reply(values, failures, time.perf_counter() - started, None)


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


def fingerprinted(actor_class: type, fingerprint: dict[str, str]) -> type:
    """``actor_class`` carrying ``fingerprint``: what its replicas were built from, which a later
    driver compares before it attaches to them (see `replica_info`).

    Examples:
        >>> fingerprinted(FunctionReplica, {"target": "ab12"})(abs)._rhmapper_fingerprint
        {'target': 'ab12'}
    """
    return _subclass(actor_class, "fingerprinted", {"_rhmapper_fingerprint": dict(fingerprint)})


def replica_info(instance: Any) -> dict[str, Any]:
    """Where a replica runs (node id, pid), how many calls it runs at once (``max_concurrency``,
    ``None`` if Ray cannot say) and, for an auto replica, what it was built from
    (``fingerprint``); also the probe that tells the replica is ready.

    Examples:
        >>> handle = ray.remote(dict).options(max_concurrency=3).remote()
        >>> info = ray.get(handle.__ray_call__.remote(replica_info))
        >>> sorted(info), info["max_concurrency"], info["fingerprint"]
        (['fingerprint', 'max_concurrency', 'node_id', 'pid'], 3, None)
        >>> ray.kill(handle)
    """
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "pid": os.getpid(),
            "max_concurrency": _ray_compat.current_actor_max_concurrency(),
            "fingerprint": getattr(instance, "_rhmapper_fingerprint", None)}
