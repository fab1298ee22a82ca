"""Joining a Ray cluster: the mapper's implicit ``ray.init()``, the CLI's explicit connect, and
running a lookup on the cluster's head node for a Ray Client driver."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any, Callable, TypeVar

import ray
import ray.util.client
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rhmapper import _ray_compat
from rhmapper.errors import ClusterAuthenticationError, ClusterNotFoundError
from rhmapper.names import NAMESPACE

_PROBE_SECONDS = 3.0
_CLIENT_PREFIX = "ray://"
_IMPLICIT_ADDRESSES = ("", "auto", "local")
_TOKEN_SOURCES = (
    "Ray reads it from ~/.ray/auth_token, or the file named by RAY_AUTH_TOKEN_PATH, or "
    "RAY_AUTH_TOKEN; `ray get-auth-token` on the head node prints it."
)

T = TypeVar("T")


def ensure_ray() -> None:
    """``ray.init()`` if needed: the cluster of ``RAY_ADDRESS`` (a GCS ``HOST:PORT`` or a
    ``ray://`` Ray Client address) or of this head node, else a local Ray. A stale record of a
    dead cluster falls back to a local Ray, with a warning.

    Raises `ClusterAuthenticationError` at once (not after Ray's 20-30 s of retries) when the
    cluster of ``RAY_ADDRESS`` uses token authentication and refuses this driver.

    Examples:
        >>> ensure_ray()  # doctest: +SKIP
        >>> ray.is_initialized()  # doctest: +SKIP
        True
    """
    if ray.is_initialized():
        return
    explicit = os.environ.get("RAY_ADDRESS", "")
    if explicit not in _IMPLICIT_ADDRESSES:
        check_token_accepted(explicit)
    try:
        with _ray_compat.client_mode_undone_on_failure():  # a ray:// RAY_ADDRESS that failed
            ray.init()
    except ConnectionError as error:
        if os.environ.get("RAY_ADDRESS"):
            raise
        warnings.warn(f"no running Ray cluster answered ({error}); starting a local Ray",
                      RuntimeWarning, stacklevel=3)
        ray.init(address="local")


def connect(address: str | None = None) -> bool:
    """Connect this process to a running Ray cluster; return True if it connected (False if
    Ray was already initialised, which is then used as it is).

    ``address`` is a GCS address ``HOST:PORT``, ``"auto"`` (``RAY_ADDRESS``, else the cluster
    this machine started last) or a ``ray://`` client address. Raises
    `ClusterNotFoundError` when no cluster is found or none answers there, and
    `ClusterAuthenticationError` when it refuses this driver's token (or lack of one); it never
    starts a local Ray.

    Examples:
        >>> connect("127.0.0.1:6379")  # doctest: +SKIP
        True
        >>> connect("ray://10.0.0.5:10001")  # doctest: +SKIP
        True
    """
    if ray.is_initialized():
        return False
    target = address or "auto"
    if target == "auto" and os.environ.get("RAY_ADDRESS", "") not in _IMPLICIT_ADDRESSES:
        target = os.environ["RAY_ADDRESS"]
    if target.startswith(_CLIENT_PREFIX):
        check_token_accepted(target)
    else:
        resolved = _reachable_gcs_address(target)
        if target != "auto":  # ray.init turns token auth on itself for a cluster found by "auto"
            check_token_accepted(target)
        target = resolved
    try:
        with _ray_compat.client_mode_undone_on_failure():  # a ray:// address that failed
            ray.init(address=target, namespace=NAMESPACE, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
    except ConnectionError as error:
        raise ClusterNotFoundError(f"could not join the Ray cluster at {target}: {error}") from error
    except ray.exceptions.AuthenticationError as error:  # e.g. token mode on, but no token
        raise ClusterAuthenticationError(
            f"the Ray cluster at {target} refused the connection: {error}") from error
    return True


def check_token_accepted(address: str) -> None:
    """Raise `ClusterAuthenticationError` if the Ray cluster at ``address`` (``HOST:PORT`` of
    its GCS, or ``ray://HOST:PORT`` of its Ray Client server) refuses this process's token (or
    lack of one). Takes milliseconds; anything else (no answer, a timeout) is left to
    ``ray.init`` to report.

    Examples:
        >>> check_token_accepted("ray://10.0.0.5:10001")  # doctest: +SKIP
        Traceback (most recent call last):
        ClusterAuthenticationError: the Ray cluster at ray://10.0.0.5:10001 uses token ...
    """
    client = address.startswith(_CLIENT_PREFIX)
    if "://" in address and not client:
        return  # not a Ray address rhmapper knows how to ask: ray.init judges it
    server = address[len(_CLIENT_PREFIX):] if client else address
    if not _ray_compat.refuses_token(server, "client" if client else "gcs", _PROBE_SECONDS):
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        problem, fix = "sent a token the cluster does not accept", "Give the driver"
    else:
        problem = "sent no token, since RAY_AUTH_MODE is not 'token'"
        fix = "Set RAY_AUTH_MODE=token in the driver's environment and give it"
    raise ClusterAuthenticationError(
        f"the Ray cluster at {address} uses token authentication and this driver {problem}. "
        f"{fix} the cluster's token: {_TOKEN_SOURCES}")


def over_ray_client() -> bool:
    """Whether this process is a Ray Client driver (``ray.init("ray://HOST:PORT")``): it reaches
    the cluster only through the client server, not the GCS, so cluster-side state (the
    autoscaler, the actor table, the dashboard's address) must be read on the cluster.

    Examples:
        >>> import ray
        >>> ray.init("ray://10.0.0.5:10001")  # doctest: +SKIP
        >>> over_ray_client()  # doctest: +SKIP
        True
    """
    return ray.util.client.ray.is_connected()


@ray.remote(num_cpus=0, max_retries=0)
def _call(function: Callable[..., T], *args: Any) -> T:
    return function(*args)


def run_on_head_node(function: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
    """``function(*args)`` run in a zero-CPU Ray task on the cluster's head node (on any node if
    the head node cannot take it), and its result.

    ``function`` must be importable on the cluster (a module-level function of rhmapper, which is
    installed on every node). Raises ``ray.exceptions.GetTimeoutError`` after ``timeout``
    seconds, and ``RayTaskError`` (also an instance of the error's own type) if it raised.

    Examples:
        >>> import socket
        >>> run_on_head_node(socket.gethostname)  # doctest: +SKIP
        'ip-10-0-0-5'
    """
    head = _ray_compat.head_node_id(ray.nodes())
    options: dict[str, Any] = {}
    if head is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    ref = _call.options(**options).remote(function, *args)
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise


def _reachable_gcs_address(address: str) -> str:
    """Resolve ``address`` as ``ray.init`` would and check that something listens there (a
    ``ray.init`` to a dead address retries for minutes)."""
    try:
        resolved = _ray_compat.bootstrap_gcs_address(address, or_die=True)
    except (ConnectionError, ValueError) as error:
        raise ClusterNotFoundError(
            f"no Ray cluster found ({error}). Start one (`ray start --head`), or name it with "
            "--address HOST:PORT or RAY_ADDRESS.") from error
    # Probe the address as given (Ray swaps 127.0.0.1 for the node's IP when it resolves it).
    shown = address if address not in ("auto", "") and ":" in address else resolved
    host, _, port = shown.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_SECONDS).close()
    except (OSError, ValueError) as error:
        raise ClusterNotFoundError(
            f"no Ray cluster answers at {shown} ({error}). Is it running? Name another one "
            "with --address HOST:PORT or RAY_ADDRESS.") from error
    return resolved
