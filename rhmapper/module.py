"""What a replica runs: the user's class spec, the host for plain functions, and the batch runner.

Every call the scheduler makes is ``handle.__ray_call__.remote(run_batch, ...)``. Ray gives every
actor ``__ray_call__``, so the same runner serves auto replicas and actors the user brings.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle
import ray

_CACHE_ENTRIES = 8
_shared_objects: OrderedDict[bytes, Any] = OrderedDict()
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
    metadata = getattr(cls, "__ray_metadata__", None)
    if metadata is not None:
        modified = metadata.modified_class
        return getattr(modified, "__ray_actor_class__", modified)
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


def _run_in_replica(self: Any, payload: tuple) -> "BatchReply":
    return run_batch(self, payload)


class FunctionReplica:
    """The actor class of auto replicas that map a plain function: it holds the function as ``fn``.

    Examples:
        >>> FunctionReplica(abs).fn(-2)
        2
    """

    _rhmapper_run = _run_in_replica

    def __init__(self, fn: Callable) -> None:
        self.fn = fn


def replica_class(cls: type) -> type:
    """The actor class of a module's auto replicas: the user's class plus ``_rhmapper_run``, the
    batch entry point (a direct actor method costs less per call than ``__ray_call__``).

    Examples:
        >>> class Model:
        ...     def predict(self, x):
        ...         return x
        >>> replica = replica_class(Model)()
        >>> isinstance(replica, Model), replica._rhmapper_run(("predict", [7], False, None)).values
        (True, [7])
    """
    def body(namespace: dict) -> None:
        namespace.update(_rhmapper_run=_run_in_replica, __module__=__name__,
                         __qualname__=f"replica_class.<locals>.{cls.__name__}")

    return types.new_class(cls.__name__, (cls,), exec_body=body)


@dataclass
class RemoteFailure:
    """An exception raised by the user's code for one item, with its remote traceback.

    ``error`` is the exception itself, or ``None`` when it could not be pickled back.

    Examples:
        >>> failure = RemoteFailure.capture(ValueError("bad"))
        >>> type(failure.error).__name__, failure.type_name
        ('ValueError', 'ValueError')
    """

    error: BaseException | None
    type_name: str
    message: str
    remote_traceback: str

    @classmethod
    def capture(cls, error: BaseException) -> "RemoteFailure":
        """Capture ``error`` (inside an ``except`` block, to keep its traceback).

        Examples:
            >>> RemoteFailure.capture(KeyError("k")).message
            "'k'"
        """
        try:
            cloudpickle.loads(cloudpickle.dumps(error))
            picklable: BaseException | None = error
        except Exception:  # any pickling failure means: send the text only
            picklable = None
        return cls(
            error=picklable,
            type_name=type(error).__qualname__,
            message=str(error),
            remote_traceback="".join(traceback.format_exception(error)),
        )


@dataclass
class BatchReply:
    """What one call returns: a value per item, the failures by position, and the run time.

    Examples:
        >>> reply = BatchReply(values=[2, None], failures={1: None}, seconds=0.1)
        >>> len(reply.values)
        2
    """

    values: list
    failures: dict[int, RemoteFailure] | None
    seconds: float


def shared_object(box: list) -> Any:
    """Fetch an object the driver put in the object store once per map, cached in this process.

    ``box`` is ``[ObjectRef]``: wrapping the reference keeps Ray from fetching it on every call.

    Examples:
        >>> import ray  # doctest: +SKIP
        >>> shared_object([ray.put({"k": 1})])  # doctest: +SKIP
        {'k': 1}
    """
    ref = box[0]
    key = ref.binary()
    with _shared_objects_lock:
        if key in _shared_objects:
            _shared_objects.move_to_end(key)
            return _shared_objects[key]
    value = ray.get(ref)
    with _shared_objects_lock:
        _shared_objects[key] = value
        while len(_shared_objects) > _CACHE_ENTRIES:
            _shared_objects.popitem(last=False)
    return value


def run_batch(instance: Any, payload: tuple[str, list, bool, list | None]) -> BatchReply:
    """Run one call's items on a replica; a failing item does not stop its neighbours.

    ``payload`` is ``(method, items, star, kwargs_box)``: the replica's method to call (``"fn"``
    for a function replica), the items, whether each item is a tuple of positional arguments
    (else the single argument), and the map's constant keyword arguments. It travels as one
    argument because Ray serialises each argument of a call separately.

    Examples:
        >>> reply = run_batch(FunctionReplica(abs), ("fn", [-1, 2, "x"], False, None))
        >>> reply.values[:2], type(reply.failures[2].error).__name__
        ([1, 2], 'TypeError')
    """
    started = time.perf_counter()
    method, items, star, kwargs_box = payload
    target = getattr(instance, method)
    kwargs = shared_object(kwargs_box) if kwargs_box is not None else None
    values: list = []
    append = values.append
    failures: dict[int, RemoteFailure] | None = None
    for position, item in enumerate(items):
        try:
            if star:
                append(target(*item, **kwargs) if kwargs else target(*item))
            else:
                append(target(item, **kwargs) if kwargs else target(item))
        except Exception as error:  # the user's error for this item, reported per item
            if failures is None:
                failures = {}
            failures[position] = RemoteFailure.capture(error)
            append(None)
    return BatchReply(values, failures, time.perf_counter() - started)


def replica_info(instance: Any) -> dict[str, Any]:
    """Where a replica runs (node id, pid); also the probe that tells the replica is ready.

    Examples:
        >>> handle.__ray_call__.remote(replica_info)  # doctest: +SKIP
    """
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "pid": os.getpid()}
