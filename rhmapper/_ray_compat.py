"""Every access rhmapper makes to a private Ray name, in one place.

Each function says which public API is missing and the Ray versions it was checked on, so that a
Ray upgrade breaks (at most) this file, and a reader sees at once what rhmapper relies on.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Iterator

import ray


def current_actor_max_concurrency() -> int | None:
    """The ``max_concurrency`` of the actor this code runs in (``None`` outside an actor, or if
    this Ray cannot say).

    Missing public API: Ray exposes an actor's ``max_concurrency`` neither on its handle, nor in
    ``ray.get_runtime_context()``, nor in ``ray.util.state``. Checked on Ray 2.60.
    """
    core_worker = getattr(ray._private.worker.global_worker, "core_worker", None)
    reader = getattr(core_worker, "current_actor_max_concurrency", None)
    if reader is None:
        return None
    concurrency = reader()
    return concurrency if isinstance(concurrency, int) and concurrency > 0 else None


def current_actor_is_async() -> bool:
    """Whether this code runs in an async actor, where Ray cancels a call by raising
    ``CancelledError`` in it and ``ray.get_runtime_context().is_canceled()`` raises.

    Missing public API: the runtime context says neither whether the actor is async nor (there)
    whether the call was cancelled. Checked on Ray 2.60.
    """
    core_worker = getattr(ray._private.worker.global_worker, "core_worker", None)
    return bool(core_worker is not None and core_worker.current_actor_is_asyncio())


def autoscaler_cluster_config():
    """The cluster config an autoscaler reported to the GCS (``ReportClusterConfig``), or None.

    Missing public API: Ray has no public reader of the autoscaler's node groups (only
    ``ray.autoscaler.sdk.request_resources`` to ask for more). Needs a process connected to the
    GCS (not a Ray Client driver). Checked on Ray 2.60.
    """
    return ray._private.state.state.get_cluster_config()


def autoscaling_status_json() -> bytes | None:
    """The v1 autoscaler's last status report (JSON) from the GCS key-value store, or None.

    Missing public API: ``ray status`` prints this report but Ray offers no function returning it.
    Needs a process connected to the GCS (not a Ray Client driver). Checked on Ray 2.60.
    """
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS)


def bootstrap_gcs_address(address: str | None, or_die: bool) -> str | None:
    """``address`` (``None``, ``"auto"`` or ``HOST:PORT``) resolved to the GCS ``host:port`` as
    ``ray.init`` resolves it: ``RAY_ADDRESS``, then the cluster this machine started last.

    With ``or_die`` it also looks for a running local GCS and raises ``ConnectionError`` when it
    finds none; without, it returns None where ``ray.init`` would start a local Ray.

    Missing public API: ``ray.init`` resolves addresses internally and does not expose it.
    Checked on Ray 2.60.
    """
    from ray._private import services

    if or_die:
        return services.canonicalize_bootstrap_address_or_die(address)
    return services.canonicalize_bootstrap_address(address)


def dashboard_address() -> str | None:
    """The dashboard ``host:port`` the head recorded in the GCS when it started one (or
    ``RAY_OVERRIDE_DASHBOARD_URL``, as Ray's own lookup), or None.

    Missing public API: the URL is only returned by the ``ray.init`` that started or joined the
    cluster; ``ray._private.worker.get_dashboard_url()`` reports Ray's default port, not the real
    one, inside a task. Needs a process connected to the GCS (not a Ray Client driver).
    Checked on Ray 2.60.
    """
    import os

    from ray._private import ray_constants, services

    if os.environ.get(ray_constants.RAY_OVERRIDE_DASHBOARD_URL):
        return ray._private.worker.get_dashboard_url()
    return services.get_webui_url_from_internal_kv() or None


def actor_table_entry(handle) -> dict:
    """The GCS actor-table entry of the actor behind ``handle`` (``State``, ``Address.NodeID``,
    ``Pid``, ``IsDetached``, ...), ``{}`` if the GCS has none.

    Missing public API: ``ray.util.state.get_actor`` needs the dashboard; without one only the
    GCS has an actor's state, and handles do not expose their actor id publicly. Needs a process
    connected to the GCS (not a Ray Client driver). Checked on Ray 2.60.
    """
    return ray._private.state.actors(actor_id=handle._actor_id.hex()) or {}


RAY_CLOUDPICKLE = ray.cloudpickle
"""The copy of cloudpickle Ray serializes with (arguments, results, Ray Client traffic), for
rhmapper's own by-value pickles of user objects (see `rhmapper.wire.use_by_value_pickler`).

cloudpickle gives a class it pickles by value (one of the driver's ``__main__``) an id in a
registry of its own copy, and unpickling gives back the class held under that id: pickled by
this copy, a replica's exception or value is an instance of the driver's own class, because Ray
sent that class to the replica under the same id; pickled by the ``cloudpickle`` package (a
separate registry), it arrives as a new class of the same name (``except MyError`` misses it).

Missing public API: Ray documents neither which pickler its serializer uses nor a way to share
its class registry. Checked on Ray 2.60 (its vendored cloudpickle 3.1.2)."""


HEAD_NODE_RESOURCE = "node:__internal_head__"
"""The resource only the head node has. Missing public API: Ray marks its head node only by this
internal resource (Ray Serve pins its controller with it too). Checked on Ray 2.60."""


def head_node_id(nodes: list[dict]) -> str | None:
    """The node id of the head node among ``ray.nodes()``, or None if none is marked as head
    (by `HEAD_NODE_RESOURCE`)."""
    for node in nodes:
        if node.get("Alive") and HEAD_NODE_RESOURCE in node.get("Resources", {}):
            return node["NodeID"]
    return None


def refuses_token(address: str, kind: str, timeout: float) -> bool:
    """Whether the Ray server at ``address`` (``kind`` ``"gcs"``: the GCS, ``"client"``: the Ray
    Client server) rejects this process's authentication (no token, or a wrong one) with gRPC
    ``UNAUTHENTICATED``. Anything else (it answers, nothing listens, a timeout) is False: then
    ``ray.init`` is left to report it.

    Missing public API: on a token mismatch ``ray.init`` retries for 20 s (GCS) or 30 s (Ray
    Client) and then raises a bare ``ConnectionError`` that does not say why. This sends one
    cheap RPC through Ray's own channel factory (which adds the token when
    ``RAY_AUTH_MODE=token``): ``GetClusterId`` to the GCS, a ``PING`` to the client server.
    Checked on Ray 2.60.
    """
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import (
        gcs_service_pb2,
        gcs_service_pb2_grpc,
        ray_client_pb2,
        ray_client_pb2_grpc,
    )

    channel = init_grpc_channel(address)
    try:
        if kind == "gcs":
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        else:
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING),
                timeout=timeout)
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
    return False


def actor_id_hex(handle) -> str:
    """The hex id of the actor behind ``handle`` (a driver's handle or a Ray Client's).

    Missing public API: an actor handle does not expose its actor id. Checked on Ray 2.60.
    """
    return handle._actor_id.hex()


def is_actor_class(obj) -> bool:
    """Whether ``obj`` is a ``@ray.remote`` actor class (of a driver, or of a Ray Client, where
    it is a ``ClientActorClass``).

    Missing public API: the Ray Client's actor class type lives in ``ray.util.client.common``.
    Checked on Ray 2.60.
    """
    from ray.util.client.common import ClientActorClass

    return isinstance(obj, (ray.actor.ActorClass, ClientActorClass))


def user_class_of(actor_class) -> type:
    """The user's own class behind a ``@ray.remote`` actor class (see `is_actor_class`).

    Missing public API: ``ray.actor.ActorClass`` keeps the decorated class only in its
    ``__ray_metadata__``, a ``ClientActorClass`` in ``actor_cls``. Checked on Ray 2.60.
    """
    if hasattr(actor_class, "actor_cls"):
        return actor_class.actor_cls
    modified = actor_class.__ray_metadata__.modified_class
    return getattr(modified, "__ray_actor_class__", modified)


def upload_local_dirs(runtime_env: dict, scratch_dir: str) -> dict:
    """``runtime_env`` with its local ``working_dir`` and ``py_modules`` uploaded to the cluster
    (content-hashed, so each folder is sent once) and replaced by their URIs.

    Missing public API: Ray uploads local folders only for a whole job (``ray.init`` or ``ray job
    submit``); an actor's ``runtime_env`` option takes URIs. Checked on Ray 2.60.
    """
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    runtime_env = upload_py_modules_if_needed(dict(runtime_env), include_gitignore=True,
                                              scratch_dir=scratch_dir)
    return upload_working_dir_if_needed(runtime_env, include_gitignore=True,
                                        scratch_dir=scratch_dir)


def monitor_autoscaling_config(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` path of the ``monitor.py`` (Ray's autoscaler process) of the
    cluster at ``gcs_address`` when it runs on this machine: ``""`` if it runs without one (the
    read-only autoscaler), ``None`` if none runs here.

    Missing public API: Ray's open-source autoscaler (``ray up``, ``ray start
    --autoscaling-config``) does not report its node types to the GCS; only its process's
    command line names the config file. Reads the process table (``psutil``, which Ray vendors).
    Checked on Ray 2.60.
    """
    import os

    try:
        import psutil  # vendored by Ray (ray/thirdparty_files)
    except ImportError:
        return None
    port = gcs_address.rsplit(":", 1)[-1]
    monitor = os.path.join("autoscaler", "_private", "monitor.py")
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(arg.endswith(monitor) for arg in args):
            continue
        options = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        if options.get("gcs-address", "").rsplit(":", 1)[-1] == port:
            return options.get("autoscaling-config", "")
    return None


def client_connection(context) -> object:
    """The connection behind ``ray.init("ray://...", allow_multiple=True)``'s context: what
    `using_client_connection` switches to. While the context is not entered, Ray keeps that
    connection in its ``_context_to_restore``.

    Missing public API: entering Ray's ``ClientContext`` (``with context:``) swaps one slot on
    the context object, so it is neither re-entrant nor safe from two threads; the thread-local
    ``ray.util.client.ray.set_context`` it calls is. Checked on Ray 2.60.
    """
    return context._context_to_restore


@contextlib.contextmanager
def using_client_connection(connection) -> Iterator[None]:
    """Make Ray calls of this thread go to ``connection`` (see `client_connection`)."""
    previous = ray.util.client.ray.set_context(connection)
    try:
        yield
    finally:
        ray.util.client.ray.set_context(previous)


def connection_of(handle) -> object | None:
    """The client worker a Ray Client actor handle belongs to (``None`` for a non-client handle).

    Missing public API: a handle does not say which of several client connections made it.
    Checked on Ray 2.60.
    """
    return getattr(getattr(handle, "actor_ref", None), "_worker", None)


def client_worker(connection) -> object:
    """The client worker of a connection (see `client_connection`)."""
    return connection.client_worker


def is_connection_failure(error: BaseException) -> bool:
    """Whether ``error`` says a Ray Client connection is broken: a ``ConnectionError``, a gRPC
    error, or any error raised inside gRPC itself (on a closed channel gRPC raises a plain
    ``ValueError``).

    Missing public API: Ray Client raises whatever its transport raised while it still reports
    ``is_connected()`` during its reconnect grace period. Checked on Ray 2.60 (grpcio 1.7x).
    """
    import grpc

    if isinstance(error, (ConnectionError, grpc.RpcError)):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}grpc{os.sep}" in frames[-1].filename


def close_client_connection(connection) -> None:
    """Close ``connection`` (see `client_connection`); once no Ray Client connection is left,
    Ray leaves client mode, so that ``ray.is_initialized()`` and the ``ray.*`` calls of this
    process reach its own Ray again (a local ``ray.init``), or none. Idempotent.

    Missing public API: ``ClientContext.disconnect()`` closes a connection that still answers
    the same way (it switches to it and calls ``ray.util.client.ray.disconnect()``), but one
    whose cluster was lost it does not close: seeing it not connected, it instead leaves the
    process's own Ray alone (on a head node, or with none) or calls ``ray.shutdown()``, and the
    lost connection keeps client mode on. Checked on Ray 2.60.
    """
    with using_client_connection(connection):
        ray.util.client.ray.disconnect()


@contextlib.contextmanager
def client_mode_undone_on_failure() -> Iterator[None]:
    """Around a ``ray.init("ray://...")``: if it raises, put back this thread's Ray Client
    context and (when no Ray Client connection is left) Ray's client mode as they were, so that
    the process's own Ray (a local ``ray.init``), or none, is its Ray again.

    Missing public API: a Ray Client ``ray.init`` turns client mode on before it connects, and
    with ``allow_multiple=True`` switches this thread to a new context; when the connection
    fails it undoes neither, and ``ray.is_initialized()`` then says False and Ray calls fail
    with "Maybe you called ray.init twice". Checked on Ray 2.60.
    """
    from ray._private import client_mode_hook

    context = ray.util.client.ray.get_context()
    client_mode = client_mode_hook.is_client_mode_enabled
    try:
        yield
    except BaseException:
        ray.util.client.ray.set_context(context)
        if not client_mode and ray.util.client.num_connected_contexts() == 0:
            client_mode_hook._explicitly_disable_client_mode()
        raise
