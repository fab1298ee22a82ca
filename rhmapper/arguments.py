"""The arguments of ``rm.mapper(...)``, checked into the `MapperSpec` a `rhmapper.Mapper` is
built from (`spec_of`): what is mapped, which method, the named env, and whether
``compiled_graphs=True`` can serve it. Each wrong argument is refused here, before any replica
or host exists, with a message saying what to pass instead.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable

from rhmapper import _ray_compat
from rhmapper.backend import AUTO_ONLY, MapperSpec, method_of
from rhmapper.batching import batched_of
from rhmapper.checks import check_concurrency, check_count
from rhmapper.connect import ensure_ray, over_ray_client
from rhmapper.env import Env
from rhmapper.module import Module, has_async_methods, is_async_callable, module, plain_class
from rhmapper.pool_setup import check_picklable
from rhmapper.plan import DEFAULT_MAX_CALL_BYTES


def spec_of(obj: Callable | type | Module, method: str | None = None, replicas: Any = 1,
            env: Env | None = None, concurrency: Any = None, ready_timeout: float | None = None,
            replace_mismatched: bool = False, max_call_bytes: Any = DEFAULT_MAX_CALL_BYTES,
            on_cluster: bool = False, compiled_graphs: Any = False, batched: Any = False,
            metrics: Any = True) -> MapperSpec:
    """The `MapperSpec` of ``rm.mapper(obj, ...)``'s arguments (see `rhmapper.mapper` for
    each), checked: ``TypeError`` or ``ValueError`` saying what to pass for a wrong one. An
    unnamed env is named after ``obj`` plus a unique suffix. ``replicas`` is only looked at
    here (a count per cluster gives the spec its ``clusters``); the mapper adds them.

    Examples:
        >>> spec = spec_of(abs, env=Env(name="args_abs"))
        >>> spec.target is abs, spec.method, spec.env.name
        (True, None, 'args_abs')
        >>> import collections
        >>> spec = spec_of(collections.Counter, "most_common")
        >>> spec.cls.__name__, spec.method, spec.env.name
        ('Counter', 'most_common', 'Counter_...')
        >>> spec_of(abs, method="predict")
        Traceback (most recent call last):
        ...
        ValueError: method='predict' applies to a class; a function is called as is
    """
    concurrency = check_concurrency(concurrency)
    max_call_bytes = check_count("max_call_bytes", max_call_bytes)
    batching = batched_of(batched)
    if env is not None and not isinstance(env, Env):
        raise TypeError(f"env must be an rm.Env, got {type(env).__name__}; build it with rm.Env(...)")
    target, cls = _target_of(obj)
    method = _check_method(cls, method)
    env = env or Env()
    if env.detached and not env.name:
        raise ValueError(
            "a detached Env needs an explicit name, so that a later driver finds the same "
            "pool: rm.Env(name='embed', detached=True)")
    env = env if env.name else env.named(_default_name(cls or obj))
    if cls is None:
        check_picklable(target, f"the function {getattr(obj, '__qualname__', obj)!r}")
    else:
        check_picklable(target, f"the module {cls.__qualname__}(...) with its arguments")
    clusters = tuple(replicas) if isinstance(replicas, dict) else ()
    if not isinstance(metrics, bool):
        raise TypeError(f"metrics must be True or False, got {metrics!r}")
    if not isinstance(compiled_graphs, bool):
        raise TypeError(f"compiled_graphs must be True or False, got {compiled_graphs!r}")
    if compiled_graphs and batching is not None:
        raise ValueError("batched calls do not run over compiled graphs yet: pass either "
                         "batched= or compiled_graphs=True")
    if compiled_graphs:
        if not clusters:
            ensure_ray()  # whether it is over Ray Client is known once connected
        _check_compiled_graphs(target, cls, replicas, env, concurrency, on_cluster)
    if clusters and on_cluster:
        raise ValueError("on_cluster=True runs the mapper on one cluster; a mapper over "
                         "several (replicas={...}) runs on the driver")
    return MapperSpec(
        target=target, method=method, env=env, concurrency=concurrency,
        ready_timeout=ready_timeout, replace_mismatched=replace_mismatched,
        max_call_bytes=max_call_bytes, compiled_graphs=compiled_graphs, clusters=clusters,
        batched=batching, metrics=metrics)


def _default_name(obj: Any) -> str:
    """``<function or class name>_<6 hex>``: unique, so that two functions (or lambdas) that
    share a ``__name__`` never share a pool by accident."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(obj, "__name__", type(obj).__name__)).strip("_")
    return f"{name or 'mapper'}_{uuid.uuid4().hex[:6]}"


def _target_of(obj: Any) -> tuple[Any, type | None]:
    """What replicas run for ``obj`` (the function, or a `Module` of the class), and the class."""
    if isinstance(obj, Module):
        return obj, obj.cls
    if isinstance(obj, type) or _ray_compat.is_actor_class(obj):
        cls = plain_class(obj)
        return module(cls), cls
    if callable(obj):
        return obj, None
    raise TypeError(f"rm.mapper() maps a function, a class or rm.module(...), got {obj!r}")


def _check_method(cls: type | None, method: str | None) -> str | None:
    """The method to map of ``cls`` (``__call__`` if not given and it has one); ``None`` for a
    function."""
    if cls is None:
        if method is not None:
            raise ValueError(f"method={method!r} applies to a class; a function is called as is")
        return None
    if method is None:
        if callable(getattr(cls, "__call__", None)) and "__call__" in dir(cls):
            method = "__call__"
        else:
            raise ValueError(
                f"say which method of {cls.__name__} to map: rm.mapper(..., method='name')")
    method_of(cls, method)
    return method


def _check_compiled_graphs(target: Any, cls: type | None, replicas: Any, env: Env,
                           concurrency: int | None, on_cluster: bool) -> None:
    """Refuse ``compiled_graphs=True`` where a compiled graph per replica cannot serve it."""
    why = None
    if isinstance(replicas, (list, tuple)):
        why = AUTO_ONLY
    elif isinstance(replicas, dict) or on_cluster or over_ray_client():
        why = ("Ray Compiled Graphs are driven from a driver on the cluster, not over Ray Client "
               "or from the mapper's host actor (on_cluster=True): run the script on the head "
               "node or with `ray job submit`")
    elif concurrency not in (None, 1):
        why = "a compiled graph runs one call at a time on its replica: use concurrency=1"
    elif has_async_methods(cls) if cls is not None else is_async_callable(target):
        why = ("an async target runs on its actor's event loop; compiled graphs call a "
               "synchronous method")
    elif env.detached:
        why = ("a detached pool is shared by drivers, and Ray kills the actors of compiled "
               "graphs still open when a driver exits")
    if why is not None:
        raise ValueError(f"compiled_graphs=True cannot be used here: {why}.")
