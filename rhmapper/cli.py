"""The ``rhmapper`` command: list, diagnose and kill the replica pools living on a Ray cluster.

A pool is the set of auto replicas of one `Env`: Ray named actors
``<pool>_replica_<i>`` in the namespace ``rhmapper``. A detached pool (``Env(detached=True)``)
outlives the driver that made it; these commands find it again and end it::

    rhmapper pools [--address ADDR] [--json]     # one line per pool: replicas, alive, nodes, detached
    rhmapper diagnose POOL [--address ADDR]      # each replica's node, pid and running stack
    rhmapper kill POOL [--address ADDR]          # kill the pool's replicas

Both connect with ``ray.init(address=ADDR or "auto")``: ``RAY_ADDRESS``, then the cluster this
machine started last; ``ADDR`` may be a GCS ``HOST:PORT`` or a Ray Client ``ray://HOST:PORT``. The
actors are read from Ray's state API when the cluster has a dashboard, and from the GCS directly
when it has none; a Ray Client driver reads them in a zero-CPU task on the head node.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import ray

from rhmapper import _ray_compat
from rhmapper.connect import (
    ClusterAuthenticationError,
    ClusterNotFoundError,
    connect,
    over_ray_client,
    run_on_head_node,
)
from rhmapper.errors import RhmapperError
from rhmapper.names import NAMESPACE, parse_replica_name
from rhmapper.pool_setup import wait_name_released
from rhmapper.stacks import stacks_of

_CLUSTER_LOOKUP_SECONDS = 60.0


@dataclass(frozen=True)
class ReplicaInfo:
    """One live replica of a pool, as the cluster reports it.

    Examples:
        >>> ReplicaInfo("embed_replica_0", 0, "ALIVE", "ab12", 4242, True).alive
        True
    """

    name: str
    index: int
    state: str
    node_id: str | None
    pid: int | None
    detached: bool | None

    @property
    def alive(self) -> bool:
        """Whether the replica's actor is up (not still starting or restarting)."""
        return self.state == "ALIVE"


@dataclass(frozen=True)
class PoolInfo:
    """The live replicas of one pool, in index order.

    Examples:
        >>> pool = PoolInfo("embed", (ReplicaInfo("embed_replica_0", 0, "ALIVE", "n1", 1, True),
        ...                           ReplicaInfo("embed_replica_1", 1, "PENDING_CREATION", None,
        ...                                       None, True)))
        >>> pool.num_replicas, pool.num_alive, pool.nodes, pool.detached
        (2, 1, ['n1'], True)
    """

    name: str
    replicas: tuple[ReplicaInfo, ...]

    @property
    def num_replicas(self) -> int:
        """How many replicas the pool has (alive or starting)."""
        return len(self.replicas)

    @property
    def num_alive(self) -> int:
        """How many of them are alive."""
        return sum(replica.alive for replica in self.replicas)

    @property
    def nodes(self) -> list[str]:
        """The distinct node ids the alive replicas run on."""
        return sorted({r.node_id for r in self.replicas if r.alive and r.node_id})

    @property
    def detached(self) -> bool | None:
        """True if every replica is detached, False if none is, None if unknown or mixed."""
        flags = {replica.detached for replica in self.replicas}
        return flags.pop() if len(flags) == 1 else None

    def to_dict(self) -> dict:
        """A JSON-ready summary (what ``rhmapper pools --json`` prints per pool).

        Examples:
            >>> PoolInfo("embed", ()).to_dict()
            {'pool': 'embed', 'replicas': 0, 'alive': 0, 'nodes': [], 'detached': None, 'members': []}
        """
        return {"pool": self.name, "replicas": self.num_replicas, "alive": self.num_alive,
                "nodes": self.nodes, "detached": self.detached,
                "members": [asdict(replica) for replica in self.replicas]}


def list_pools(source: Literal["auto", "state", "gcs"] = "auto") -> list[PoolInfo]:
    """The replica pools on the connected cluster, sorted by name (dead replicas left out).

    ``source`` picks where actors are read: ``"state"`` Ray's state API (needs the cluster's
    dashboard), ``"gcs"`` the GCS directly (works without a dashboard), ``"auto"`` the state
    API when the cluster has a dashboard (the GCS if that fails), else the GCS. A Ray Client
    driver (``ray.init("ray://...")``) reads them in a zero-CPU task on the head node.

    Examples:
        >>> import ray, rhmapper as rm
        >>> from rhmapper.cli import list_pools
        >>> m = rm.mapper(abs, replicas=2, env=rm.Env(name="shared", detached=True))  # doctest: +SKIP
        >>> [(p.name, p.num_replicas) for p in list_pools()]  # doctest: +SKIP
        [('shared', 2)]
    """
    if source not in ("auto", "state", "gcs"):
        raise ValueError(f"source must be 'auto', 'state' or 'gcs', got {source!r}")
    replicas = _replicas_on_cluster(source) if over_ray_client() else _replicas(source)
    pools: dict[str, list[ReplicaInfo]] = {}
    for pool, replica in replicas:
        pools.setdefault(pool, []).append(replica)
    return [PoolInfo(name, tuple(sorted(members, key=lambda r: r.index)))
            for name, members in sorted(pools.items())]


def _replicas_on_cluster(source: str) -> list[tuple[str, ReplicaInfo]]:
    """`_replicas` run on the head node, for a Ray Client driver: the actor table and the
    dashboard's address are cluster-side state, and a dashboard bound to the head's loopback
    answers only there."""
    try:
        return run_on_head_node(_replicas, source, timeout=_CLUSTER_LOOKUP_SECONDS)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, RhmapperError):
            raise error.cause from error
        raise RhmapperError(f"reading the pools on the cluster failed: {error}") from error
    except ray.exceptions.RayError as error:
        raise RhmapperError(f"reading the pools on the cluster failed: {error}") from error


def _replicas(source: str) -> list[tuple[str, ReplicaInfo]]:
    """(pool, replica) for every live replica, from the state API or the GCS (see `list_pools`)."""
    dashboard = _dashboard_url()
    if source == "state" and not dashboard:
        raise RhmapperError("this Ray cluster has no dashboard, so no state API: use source='gcs'")
    replicas = None
    if source != "gcs" and dashboard:
        try:
            replicas = _replicas_from_state_api(dashboard)
        except Exception as error:  # RayStateApiException, or a dashboard that does not answer
            if source == "state":
                raise RhmapperError(f"Ray's state API at {dashboard} failed: {error}") from error
    if replicas is None:
        replicas = _replicas_from_gcs()
    return replicas


def _dashboard_url() -> str | None:
    """The connected cluster's dashboard as ``http://host:port``, or None if it has none.

    Taken from what the head recorded when it started its dashboard, never guessed: Ray's
    state client would fall back to ``127.0.0.1:8265``, which may be another cluster's
    dashboard."""
    url = _ray_compat.dashboard_address()
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _replicas_from_state_api(dashboard: str) -> list[tuple[str, ReplicaInfo]]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("ray_namespace", "=", NAMESPACE)],
                         detail=True, limit=10_000, raise_on_missing_output=False)
    found = []
    for actor in actors:
        parts = parse_replica_name(actor.name)
        if parts is None or actor.state == "DEAD":
            continue
        found.append((parts[0], ReplicaInfo(actor.name, parts[1], actor.state, actor.node_id or None,
                                            actor.pid or None, actor.is_detached)))
    return found


def _replicas_from_gcs() -> list[tuple[str, ReplicaInfo]]:
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        parts = parse_replica_name(entry["name"])
        if entry["namespace"] != NAMESPACE or parts is None:
            continue
        try:
            handle = ray.get_actor(entry["name"], namespace=NAMESPACE)
        except ValueError:  # gone since it was listed
            continue
        info = _ray_compat.actor_table_entry(handle)
        state = info.get("State", "UNKNOWN")
        if state == "DEAD":
            continue
        node_id = (info.get("Address") or {}).get("NodeID") or None
        if node_id and set(node_id) == {"f"}:  # Ray's nil id: not placed yet
            node_id = None
        found.append((parts[0], ReplicaInfo(entry["name"], parts[1], state, node_id,
                                            info.get("Pid") or None, info.get("IsDetached"))))
    return found


def diagnose_pool(name: str) -> list[tuple[ReplicaInfo, str]]:
    """Each live replica of the pool ``name`` with the stack of its threads running rhmapper's
    calls, taken by ``py-spy dump`` on its node (see `rhmapper.stacks`). Which items those are,
    and for how long against their map's p99, only the map's driver knows: ``m.diagnose()``.
    Raises ``KeyError`` if there is no such pool.

    Examples:
        >>> from rhmapper.cli import connect, diagnose_pool
        >>> connect()  # doctest: +SKIP
        >>> for replica, stack in diagnose_pool("shared"):  # doctest: +SKIP
        ...     print(replica.name, replica.pid, stack.splitlines()[1].strip())
        shared_replica_0 4242 predict (model.py:9)
    """
    pool = _pool_named(name)
    alive = [replica for replica in pool.replicas if replica.alive and replica.pid]
    stacks = stacks_of({(replica.node_id, replica.pid) for replica in alive})
    return [(replica, stacks[(replica.node_id, replica.pid)]) for replica in alive]


def format_diagnosis(found: Sequence[tuple[ReplicaInfo, str]]) -> str:
    """What ``rhmapper diagnose`` prints.

    Examples:
        >>> replica = ReplicaInfo("embed_replica_0", 0, "ALIVE", "n1", 7, True)
        >>> print(format_diagnosis([(replica, 'Thread 7 (active): "Thread-1"')]))
        embed_replica_0 (node n1, pid 7):
            Thread 7 (active): "Thread-1"
    """
    if not found:
        return "no live replica with a known process in this pool"
    lines = []
    for replica, stack in found:
        lines.append(f"{replica.name} (node {replica.node_id}, pid {replica.pid}):")
        lines.extend("    " + line for line in stack.splitlines())
    return "\n".join(lines)


def _pool_named(name: str) -> PoolInfo:
    pool = next((pool for pool in list_pools(source="gcs") if pool.name == name), None)
    if pool is None:
        raise KeyError(f"no pool named {name!r} on this cluster (see `rhmapper pools`)")
    return pool


def kill_pool(name: str, timeout: float = 30.0) -> list[str]:
    """Kill every replica of the pool ``name`` on the connected cluster; return their names.

    Waits (up to ``timeout`` seconds) until Ray has released the names, so a new pool of the
    same name can start at once. Raises ``KeyError`` if there is no such pool.

    Examples:
        >>> from rhmapper.cli import connect, kill_pool
        >>> connect()  # doctest: +SKIP
        >>> kill_pool("shared")  # doctest: +SKIP
        ['shared_replica_0', 'shared_replica_1']
    """
    pool = _pool_named(name)
    killed = []
    for replica in pool.replicas:
        try:
            ray.kill(ray.get_actor(replica.name, namespace=NAMESPACE), no_restart=True)
            killed.append(replica.name)
        except ValueError:  # already gone
            continue
    deadline = time.monotonic() + timeout
    for replica_name in killed:
        wait_name_released(replica_name, max(0.0, deadline - time.monotonic()))
    return killed


def format_pools(pools: Sequence[PoolInfo]) -> str:
    """The table ``rhmapper pools`` prints.

    Examples:
        >>> print(format_pools([PoolInfo("embed", (ReplicaInfo("embed_replica_0", 0, "ALIVE",
        ...                                                    "n1", 7, True),))]))
        POOL   REPLICAS  ALIVE  NODES  DETACHED
        embed  1         1      1      yes
    """
    if not pools:
        return f"no rhmapper pools on this cluster (no actors named <pool>_replica_<i> in namespace {NAMESPACE!r})"
    header = ("POOL", "REPLICAS", "ALIVE", "NODES", "DETACHED")
    rows = [(p.name, str(p.num_replicas), str(p.num_alive), str(len(p.nodes)),
             {True: "yes", False: "no", None: "?"}[p.detached]) for p in pools]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhmapper",
        description="List, diagnose and kill rhmapper replica pools on a Ray cluster.")
    commands = parser.add_subparsers(dest="command", required=True)
    address_help = ("Ray cluster address: GCS HOST:PORT or Ray Client ray://HOST:PORT (default: "
                    "RAY_ADDRESS, else the local cluster)")
    pools = commands.add_parser("pools", help="list the pools on the cluster")
    pools.add_argument("--address", help=address_help)
    pools.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pools.add_argument("--source", choices=("auto", "state", "gcs"), default="auto",
                       help="read actors from the state API (needs a dashboard) or the GCS")
    diagnose = commands.add_parser(
        "diagnose", help="show each replica's node, pid and the stack of its running calls")
    diagnose.add_argument("pool", help="the pool (env) name")
    diagnose.add_argument("--address", help=address_help)
    kill = commands.add_parser("kill", help="kill a pool's replicas")
    kill.add_argument("pool", help="the pool (env) name, e.g. 'shared' for shared_replica_<i>")
    kill.add_argument("--address", help=address_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rhmapper`` command line; return its exit code (0 ok, 1 error).

    Examples:
        >>> from rhmapper.cli import main
        >>> main(["pools", "--address", "127.0.0.1:6379"])  # doctest: +SKIP
        POOL    REPLICAS  ALIVE  NODES  DETACHED
        shared  2         2      1      yes
        0
    """
    args = _parser().parse_args(argv)
    try:
        connected = connect(args.address)
    except (ClusterNotFoundError, ClusterAuthenticationError) as error:
        print(f"rhmapper: {error}", file=sys.stderr)
        return 1
    try:
        if args.command == "pools":
            pools = list_pools(source=args.source)
            if args.json:
                print(json.dumps([pool.to_dict() for pool in pools], indent=2))
            else:
                print(format_pools(pools))
            return 0
        try:
            if args.command == "diagnose":
                print(format_diagnosis(diagnose_pool(args.pool)))
                return 0
            killed = kill_pool(args.pool)
        except KeyError as error:
            print(f"rhmapper: {error.args[0]}", file=sys.stderr)
            return 1
        print(f"killed {len(killed)} replica(s) of pool {args.pool!r}: {', '.join(killed)}")
        return 0
    except RhmapperError as error:
        print(f"rhmapper: {error}", file=sys.stderr)
        return 1
    finally:
        if connected:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
