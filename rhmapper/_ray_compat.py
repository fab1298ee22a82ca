"""Every access rhmapper makes to a private Ray name, in one place.

Each function says which public API is missing and the Ray versions it was checked on, so that a
Ray upgrade breaks (at most) this file, and a reader sees at once what rhmapper relies on.
"""

from __future__ import annotations

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
