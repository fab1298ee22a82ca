"""Whether a cluster can ever host a replica: the resources nodes offer, and the node types Ray's
autoscaler may add."""

from __future__ import annotations

import json
import os
import warnings

import ray

from rhmapper import _ray_compat
from rhmapper.connect import over_ray_client, run_on_head_node
from rhmapper.env import Env
from rhmapper.errors import UnschedulableError

_CLUSTER_LOOKUP_SECONDS = 60.0


def check_feasible(env: Env) -> None:
    """Raise `UnschedulableError` when no node of the cluster can ever host one replica.

    With Ray's autoscaler configured, the largest node type it may add counts as a node. A Ray
    Client driver (``ray.init("ray://...")``) reads the autoscaler's node types in a zero-CPU
    task on the head node.

    Examples:
        >>> check_feasible(Env(name="huge", compute={"CPU": 512}))
        Traceback (most recent call last):
        ...
        rhmapper.errors.UnschedulableError: no node can ever host a replica of env 'huge': it asks for CPU=512, and CPU is more than any node offers (nodes offer: CPU=4). Lower Env.compute, or add nodes that have it.
    """
    request = env.resource_request()
    if not request:
        return
    offers = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(_fits(request, offer) for offer in offers):
        return
    node_types = _autoscaler_node_types()
    if node_types is None:
        return  # an autoscaler whose node types this driver cannot read: wait (ready_timeout)
    if any(_fits(request, offer) for offer in node_types):
        return
    offers.extend(node_types)
    short = sorted({key for key, amount in request.items()
                    if all(offer.get(key, 0) < amount for offer in offers)})
    described = "; ".join(
        ", ".join(f"{key}={_amount(offer.get(key, 0), key)}" for key in request) for offer in offers
    ) or "no live nodes"
    raise UnschedulableError(
        f"no node can ever host a replica of env {env.name!r}: it asks for "
        f"{', '.join(f'{key}={_amount(amount, key)}' for key, amount in request.items())}, "
        f"and {', '.join(short) or 'that combination'} is more than any node offers "
        f"(nodes offer: {described}). Lower Env.compute, or add nodes that have it."
    )


def _fits(request: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(key, 0) >= amount for key, amount in request.items())


def _autoscaler_node_types() -> list[dict[str, float]] | None:
    """`_autoscaler_node_types_here`, run on the head node for a Ray Client driver (which has
    no GCS connection of its own). ``None`` (wait) if that lookup fails, with a warning."""
    if not over_ray_client():
        return _autoscaler_node_types_here()
    try:
        return run_on_head_node(_autoscaler_node_types_here, timeout=_CLUSTER_LOOKUP_SECONDS)
    except ray.exceptions.RayError as error:
        warnings.warn(f"could not read the autoscaler's node types on the cluster ({error}); a "
                      "replica that no node can host now waits for one (up to ready_timeout)",
                      RuntimeWarning, stacklevel=4)
        return None


def _autoscaler_node_types_here() -> list[dict[str, float]] | None:
    """What one node of each type Ray's autoscaler may add offers: ``[]`` with no autoscaler,
    ``None`` when one is configured but its node types cannot be read from this driver.

    An autoscaler that reports its config to the GCS (``ReportClusterConfig``) is read with
    ``get_cluster_config()``, one entry per node group (a node's resources, not the cluster-wide
    sums of ``get_max_resources_from_cluster_config()``). Ray's open-source autoscaler (``ray up``,
    ``ray start --autoscaling-config``) reports nothing: its node types are in the config file on
    its ``monitor.py`` command line, which a driver on the head node can read.
    """
    config = _ray_compat.autoscaler_cluster_config()
    if config is not None and config.node_group_configs:
        return [{key: float(value) for key, value in group.resources.items()}
                for group in config.node_group_configs if group.max_count != 0]
    gcs_address = ray.get_runtime_context().gcs_address
    from_monitor = _monitor_node_types(gcs_address)
    if from_monitor is not None:
        return from_monitor
    return None if _autoscaler_configured() else []


def _monitor_node_types(gcs_address: str) -> list[dict[str, float]] | None:
    """Node types from the config file of this cluster's ``monitor.py``, if it runs here."""
    try:
        import yaml  # a dependency of Ray's
    except ImportError:
        return None
    path = _ray_compat.monitor_autoscaling_config(gcs_address)
    if path is None:
        return None
    if not path:
        return []  # no config: Ray's read-only autoscaler, which adds no nodes
    try:
        with open(os.path.expanduser(path)) as handle:
            config = yaml.safe_load(handle)  # YAML or JSON
    except (OSError, yaml.YAMLError):
        return None
    node_types = []
    for spec in (config.get("available_node_types") or {}).values():
        if spec.get("max_workers", config.get("max_workers", 0)) <= 0:
            continue
        if not spec.get("resources"):
            return None  # resources filled in by the cloud provider: unknown here
        node_types.append({key: float(value) for key, value in spec["resources"].items()})
    return node_types


def _autoscaler_configured() -> bool:
    """Whether Ray's v1 autoscaler runs with node types of its own (not the read-only mirror)."""
    status = _ray_compat.autoscaling_status_json()
    if not status:
        return False
    report = json.loads(status).get("autoscaler_report") or {}
    names = {*(report.get("node_type_mapping") or {}).values(), *(report.get("active_nodes") or {})}
    return any(not name.startswith("node_") for name in names)  # read-only types: node_<id>


def _amount(value: float, key: str) -> str:
    if key == "memory":
        return f"{value / 2**30:.2f}GiB"
    return f"{value:g}"
