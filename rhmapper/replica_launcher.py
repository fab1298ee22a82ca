"""Starting and stopping the Ray actors of a pool, and reading what their probes say: the Ray
half of the pool's `Create`, `Stop` and `Probed` (see `rhmapper.pool_events`)."""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import (
    ActorAlreadyExistsError,
    ActorUnavailableError,
    RayActorError,
    RuntimeEnvSetupError,
)

from rhmapper.env import Env
from rhmapper.module import Module, fingerprinted, function_replica_class, replica_class
from rhmapper.names import NAMESPACE, replica_name
from rhmapper.pool_events import Create, Probed, ProbeOutcome, Stop
from rhmapper.pool_setup import name_taken, upload_local_dirs, wait_name_released
from rhmapper.pool_state import PoolState
from rhmapper.ray_replica import RayReplica


class ReplicaLauncher:
    """Builds the auto replicas of one pool (from ``target``: a function or a `Module`) as
    named actors of rhmapper's namespace.

    Examples:
        >>> from rhmapper.pool_setup import pool_fingerprint
        >>> env = Env(name="negate")
        >>> state = PoolState("negate", pool_fingerprint(abs, env, 1))
        >>> launcher = ReplicaLauncher(env, abs, 1, state.fingerprint)
        >>> [replica] = [launcher.create(action, state) for action in state.add_auto(1)]
        >>> launcher.probe_answer(replica).outcome
        <ProbeOutcome.READY: 'ready'>
        >>> for action in state.shutdown():
        ...     launcher.stop(action)
    """

    def __init__(self, env: Env, target: Module | Any, concurrency: int,
                 fingerprint: dict[str, str], cluster: str | None = None) -> None:
        self.env = env
        self.concurrency = concurrency
        self.cluster = cluster
        self.class_name = target.cls.__name__ if isinstance(target, Module) else "actor"
        """What your actors are called in the pool (`rhmapper.pool_setup.actor_name`)."""
        if isinstance(target, Module):
            actor_class = replica_class(target.cls)
            self._init_args, self._init_kwargs = target.args, target.kwargs
        else:
            actor_class = function_replica_class(target)
            self._init_args, self._init_kwargs = (ray.put(target),), {}
        self._actor_class = ray.remote(fingerprinted(actor_class, fingerprint))
        self._options = {
            **upload_local_dirs(env.actor_options()),
            "namespace": NAMESPACE,
            "max_concurrency": concurrency,
            "max_restarts": 0,
            # A detached pool outlives its driver: a later driver attaches to it by name.
            "get_if_exists": env.detached,
        }

    def name_of(self, index: int) -> str:
        """The name of the pool's auto replica ``index``."""
        return replica_name(self.env.name, index)

    def create(self, action: Create, state: PoolState) -> RayReplica:
        """Start the auto replica ``<env>_replica_<index>`` and join it to ``state``, or the next
        free name if Ray still holds that one (a killed actor's name is released
        asynchronously)."""
        if action.wait_for_name is not None:
            wait_name_released(action.wait_for_name)
        index = action.index
        while True:
            name = self.name_of(index)
            try:
                handle = self._actor_class.options(name=name, **self._options).remote(
                    *self._init_args, **self._init_kwargs)
                break
            except ValueError as error:  # a dead actor's name may not be released yet
                if not isinstance(error, ActorAlreadyExistsError) and not name_taken(name):
                    raise
                index = state.free_index(index + 1, self.name_of)
        replica = RayReplica(name, handle, owned=True, requested=self.concurrency,
                             index=index, cluster=self.cluster)
        return state.join(replica, action.position)

    @staticmethod
    def stop(action: Stop) -> None:
        """Close the replica's compiled graph, and kill its actor if the action says so."""
        replica = action.replica
        if replica.compiled is not None:
            replica.compiled.close(kill=action.kill)
        elif action.kill:
            ray.kill(replica.handle, no_restart=True)

    def probe_answer(self, replica: RayReplica) -> Probed:
        """What the answered probe of ``replica`` says, as the policy's event."""
        try:
            info = ray.get(replica.ready_ref)
        except RuntimeEnvSetupError as error:
            return Probed(replica, ProbeOutcome.RUNTIME_ENV_FAILED,
                          f"{self.env.runtime_env()}: {error}", error)
        except ActorUnavailableError:  # restarting, or unreachable for now: Ray queues a probe
            return Probed(replica, ProbeOutcome.UNAVAILABLE)
        except RayActorError as error:
            outcome = ProbeOutcome.INIT_FAILED if error.actor_init_failed else ProbeOutcome.DIED
            return Probed(replica, outcome, str(error), error)
        return Probed(replica, ProbeOutcome.READY, fingerprint=info["fingerprint"],
                      max_concurrency=info["max_concurrency"], node_id=info["node_id"],
                      pid=info["pid"])
