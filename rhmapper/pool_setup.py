"""What a pool needs around its replicas, on Ray: constant arguments put once, local folders
uploaded, what auto replicas are built from, and their names in Ray's namespace."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from typing import Any

import cloudpickle
import ray

from rhmapper import _ray_compat
from rhmapper.env import Env
from rhmapper.errors import RhmapperError
from rhmapper.module import Module
from rhmapper.names import NAMESPACE


def put_kwargs(kwargs: dict) -> dict:
    """A map's constant keyword arguments, each put in the object store once for the whole map
    (an ``ObjectRef`` value is passed on as it is, and reaches the function as its value).

    Examples:
        >>> import ray
        >>> refs = put_kwargs({"scale": 3}); ray.get(refs["scale"])
        3
    """
    refs = {}
    for key, value in kwargs.items():
        if isinstance(value, ray.ObjectRef):
            refs[key] = value
            continue
        try:
            refs[key] = ray.put(value)
        except TypeError:
            check_picklable(value, f"kwargs[{key!r}]")
            raise
    return refs


class ClusterKwargs(dict):
    """A map's constant keyword arguments put on each of several clusters: cluster address ->
    that cluster's refs (see `put_kwargs`)."""


def check_picklable(obj: Any, what: str) -> None:
    """Raise a ``TypeError`` naming ``what`` when ``obj`` cannot be pickled for the replicas.

    Examples:
        >>> import threading
        >>> check_picklable(threading.Lock(), "kwargs['lock']")
        Traceback (most recent call last):
        ...
        TypeError: kwargs['lock'] cannot be pickled to send it to the replicas: cannot pickle '_thread.lock' object
    """
    try:
        cloudpickle.dumps(obj)
    except Exception as error:  # any pickling failure is the user's to fix; name the object
        raise TypeError(f"{what} cannot be pickled to send it to the replicas: {error}") from error


def upload_local_dirs(options: dict[str, Any]) -> dict[str, Any]:
    """Actor options with a local ``working_dir`` / ``py_modules`` uploaded to the cluster.

    Ray uploads local folders only for a whole job; an actor's ``runtime_env`` needs URIs. Uploads
    are content-hashed, so each folder is sent once.

    Examples:
        >>> upload_local_dirs({"num_cpus": 1})
        {'num_cpus': 1}
    """
    runtime_env = options.get("runtime_env")
    if not runtime_env or not {"working_dir", "py_modules"} & runtime_env.keys():
        return options
    runtime_env = _ray_compat.upload_local_dirs(runtime_env, tempfile.gettempdir())
    runtime_env.pop("excludes", None)
    return {**options, "runtime_env": runtime_env}


def pool_fingerprint(target: Module | Any, env: Env, concurrency: int) -> dict[str, str]:
    """What a pool's auto replicas are built from, as short digests by part: the function or
    class, the constructor arguments, the ``runtime_env``, the ``compute`` request and the
    concurrency.

    Examples:
        >>> sorted(pool_fingerprint(abs, Env(name="abs"), 1))
        ['compute', 'concurrency', 'constructor', 'runtime_env', 'target']
    """
    if isinstance(target, Module):
        built_from, arguments = target.cls, (target.args, target.kwargs)
    else:
        built_from, arguments = target, ()
    return {
        "target": _digest(cloudpickle.dumps(built_from)),
        "constructor": _digest(cloudpickle.dumps(arguments)),
        "runtime_env": _digest(json.dumps(env.runtime_env(), sort_keys=True, default=str).encode()),
        "compute": _digest(json.dumps(env.resource_request(), sort_keys=True).encode()),
        "concurrency": str(concurrency),
    }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def wait_name_released(name: str, timeout: float = 30.0) -> None:
    """Wait until Ray has released the actor name ``name`` (a killed actor's name is released
    asynchronously); raise `RhmapperError` after ``timeout`` seconds.

    Examples:
        >>> wait_name_released("no_such_replica_0")  # returns at once: nobody holds it
    """
    deadline = time.monotonic() + timeout
    while name_taken(name):
        if time.monotonic() >= deadline:
            raise RhmapperError(f"replica {name} still exists {timeout}s after ray.kill")
        time.sleep(0.1)


def name_taken(name: str) -> bool:
    """Whether an actor of rhmapper's namespace holds ``name`` (Ray releases a killed actor's
    name asynchronously).

    Examples:
        >>> name_taken("no_such_replica_0")
        False
    """
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def actor_name(handle: Any, class_name: str) -> str:
    """The name your actor goes by in a pool: its class and the start of its actor id.

    Examples:
        >>> actor_name("not an actor", "Model")
        Traceback (most recent call last):
        ...
        TypeError: replicas=[...] must hold Ray actor handles, got 'not an actor'
    """
    if not hasattr(handle, "__ray_call__"):
        raise TypeError(f"replicas=[...] must hold Ray actor handles, got {handle!r}")
    return f"{class_name}({_ray_compat.actor_id_hex(handle)[:8]})"