"""The names rhmapper gives on a Ray cluster: its namespace and how each of its actors is named.

Every actor rhmapper names lives in the Ray namespace `NAMESPACE`: auto replicas
(``<pool>_replica_<i>``), each driver's end board, the mapper hosts of ``on_cluster=True``,
and the directory of spawned maps. A later driver, the ``rhmapper`` command and the tests find
them by these names, so they are written here only.

This module is pure: it imports no Ray.
"""

from __future__ import annotations

import re
import uuid

NAMESPACE = "rhmapper"
"""The Ray namespace of every actor rhmapper names (and of the connections it opens)."""

SPAWNED_DIRECTORY = "rhmapper_spawned_maps"
"""The detached actor that finds a spawned map's host by the map's name."""

_REPLICA_NAME = re.compile(r"^(?P<pool>.+)_replica_(?P<index>\d+)$")


def replica_name(pool: str, index: int) -> str:
    """The Ray actor name of auto replica ``index`` of the pool (env) ``pool``.

    Examples:
        >>> replica_name("embed", 3)
        'embed_replica_3'
    """
    return f"{pool}_replica_{index}"


def parse_replica_name(name: str | None) -> tuple[str, int] | None:
    """The pool and index of an auto replica's name (`replica_name` reversed), else ``None``.

    Examples:
        >>> parse_replica_name("embed_replica_3"), parse_replica_name("other")
        (('embed', 3), None)
    """
    match = _REPLICA_NAME.match(name or "")
    return (match["pool"], int(match["index"])) if match else None


def new_board_name() -> str:
    """A new name for a driver's end board (see `rhmapper.signals`): unique per call.

    Examples:
        >>> name = new_board_name()
        >>> name.startswith("rhmapper_end_board_"), len(name), name == new_board_name()
        (True, 31, False)
    """
    return f"rhmapper_end_board_{uuid.uuid4().hex[:12]}"


def new_host_name() -> str:
    """A new name for a mapper's host on the cluster (see `rhmapper.host`): unique per call.

    Examples:
        >>> name = new_host_name()
        >>> name.startswith("rhmapper_host_"), len(name), name == new_host_name()
        (True, 26, False)
    """
    return f"rhmapper_host_{uuid.uuid4().hex[:12]}"
