"""Joining a Ray cluster: the mapper's implicit ``ray.init()`` and the CLI's explicit connect."""

from __future__ import annotations

import logging
import os
import socket
import warnings

import ray

from rhmapper.errors import RhmapperError
from rhmapper.replicas import NAMESPACE

_PROBE_SECONDS = 3.0


class ClusterNotFoundError(RhmapperError, ConnectionError):
    """No Ray cluster answered at the address the command was given (or found)."""


def ensure_ray() -> None:
    """``ray.init()`` if needed: the cluster of ``RAY_ADDRESS`` or of this head node, else a
    local Ray. A stale record of a dead cluster falls back to a local Ray, with a warning."""
    if ray.is_initialized():
        return
    try:
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
    `ClusterNotFoundError` when no cluster is found or none answers there; it never
    starts a local Ray.

    Examples:
        >>> connect("127.0.0.1:6379")  # doctest: +SKIP
        True
    """
    if ray.is_initialized():
        return False
    target = address or "auto"
    if target == "auto" and os.environ.get("RAY_ADDRESS", "").startswith("ray://"):
        target = os.environ["RAY_ADDRESS"]
    if not target.startswith("ray://"):
        target = _reachable_gcs_address(target)
    try:
        ray.init(address=target, namespace=NAMESPACE, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
    except ConnectionError as error:
        raise ClusterNotFoundError(f"could not join the Ray cluster at {target}: {error}") from error
    except Exception as error:  # Ray's AuthenticationError and kin: add the usual fix
        if "uthentication" not in type(error).__name__ + str(error):
            raise
        raise ClusterNotFoundError(
            f"the Ray cluster at {target} refused the connection: {error}. It uses token "
            "authentication: set RAY_AUTH_MODE=token and give its token (~/.ray/auth_token, "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH).") from error
    return True


def _reachable_gcs_address(address: str) -> str:
    """Resolve ``address`` as ``ray.init`` would and check that something listens there (a
    ``ray.init`` to a dead address retries for minutes)."""
    from ray._private import services

    try:
        resolved = services.canonicalize_bootstrap_address_or_die(address)
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
