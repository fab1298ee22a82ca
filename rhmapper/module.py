"""What a replica is: the user's class spec, the replica actor classes (the host for plain
functions, the user's class with rhmapper's entry points), and the entry points of a call.

Auto replicas take a call's batch through their own ``_rhmapper_run`` method (or
``_rhmapper_run_async`` for an ``async def`` target, on the actor's event loop). Actors the user
brings run the same `run_call` through ``__ray_call__``, which Ray gives every actor; an
``async def`` method of theirs is called directly, one item per call, as Ray would (see
``rhmapper.replicas``). The batch itself runs in ``rhmapper.batch_runner``.
"""

from __future__ import annotations

import inspect
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from rhmapper import _ray_compat
from rhmapper.batch_runner import run_batch, run_batch_async
from rhmapper.durable import map_fingerprint
from rhmapper.wire import BatchReply, CallRequest, RawValue, RemoteFailure


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


def run_call(instance: Any, wire: list) -> list:
    """A replica's entry point for one call (auto replicas have it as ``_rhmapper_run``; your
    actors run it through ``__ray_call__``): `run_batch` on the `CallRequest` ``wire`` carries
    (its `CallRequest.to_wire` form), with the reply as a plain list (`BatchReply.to_wire`).

    Examples:
        >>> reply = run_call(FunctionReplica(abs), CallRequest("fn", [-3]).to_wire())
        >>> BatchReply.from_wire(reply).unpacked().values
        [3]
    """
    return run_batch(instance, CallRequest.from_wire(wire)).to_wire()


_NO_REFERENCES_OVER_GRAPHS = (
    "the item's result holds a Ray ObjectRef or actor handle, which a compiled graph cannot "
    "carry: Ray counts no references through a graph's channels, so the object (or actor) could "
    "be gone before the driver reads it. Return the value itself, or make the mapper without "
    "compiled_graphs=True.")


def run_call_compiled(instance: Any, wire: list) -> list:
    """`run_call` for a call over the replica's compiled graph (``_rhmapper_run_compiled``,
    see `rhmapper.compiled`): a result that holds Ray references fails its item instead.

    Examples:
        >>> import ray
        >>> put_in_a_list = lambda x: [ray.put(x)]
        >>> wire = CallRequest("fn", [1]).to_wire()
        >>> reply = run_call_compiled(FunctionReplica(put_in_a_list), wire)
        >>> reply[0], reply[1][0].type_name
        ([None], 'TypeError')
    """
    reply = run_batch(instance, CallRequest.from_wire(wire))
    if not reply.packed or not any(isinstance(value, RawValue) for value in reply.values):
        return reply.to_wire()
    failures = dict(reply.failures or {})
    values = list(reply.values)
    for position, value in enumerate(values):
        if isinstance(value, RawValue):
            failures[position] = RemoteFailure.capture(TypeError(_NO_REFERENCES_OVER_GRAPHS))
            values[position] = None
    return BatchReply(values, failures, reply.seconds, True, reply.not_started,
                      reply.digests).to_wire()


async def run_call_async(instance: Any, wire: list) -> list:
    """`run_call` for ``async def`` targets (``_rhmapper_run_async``).

    Examples:
        >>> import asyncio
        >>> async def negate(x):
        ...     return -x
        >>> wire = CallRequest("fn", [3]).to_wire()
        >>> reply = asyncio.run(run_call_async(FunctionReplica(negate), wire))
        >>> BatchReply.from_wire(reply).unpacked().values
        [-3]
    """
    return (await run_batch_async(instance, CallRequest.from_wire(wire))).to_wire()


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
        >>> wire = CallRequest("fn", [4]).to_wire()
        >>> reply = asyncio.run(AsyncFunctionReplica(double)._rhmapper_run_async(wire))
        >>> BatchReply.from_wire(reply).unpacked().values
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
        >>> wire = CallRequest("predict", [7]).to_wire()
        >>> isinstance(replica, Model), BatchReply.from_wire(replica._rhmapper_run(wire)).unpacked().values
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


def target_fingerprint(target: Any, method: str | None, kwargs: dict | None,
                       star: bool) -> dict[str, str]:
    """`rhmapper.durable.map_fingerprint` of a map of a mapper's ``target``: a function, or the
    `Module` its replicas build.

    Examples:
        >>> target_fingerprint(pow, None, None, True)["target"]
        'builtins.pow'
    """
    if isinstance(target, Module):
        name, build_args = _qualified_name(target.cls), (target.args, target.kwargs)
    else:
        name, build_args = _qualified_name(target), None
    return map_fingerprint(name, method, build_args, kwargs, star)


def _qualified_name(target: Any) -> str:
    """``module.qualname`` of a function or class (its ``repr`` if it has none)."""
    qualname = getattr(target, "__qualname__", None)
    return repr(target) if qualname is None else f"{getattr(target, '__module__', '')}.{qualname}"
