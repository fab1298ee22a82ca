"""rhmapper: map a function, or a method of a stateful class, over a pool of Ray actors.

The scheduler and its types (``rhmapper.scheduler``, ``rhmapper.wire``, ``rhmapper.env``,
``rhmapper.retries``) import no Ray, so they can be used and tested where Ray is not installed;
the mapper itself needs Ray.
"""

from rhmapper.autoscaling import Autoscale, ReplicaCount, ScalingDecision
from rhmapper.batching import Batched
from rhmapper.checkpoint_read import read_checkpoint
from rhmapper.env import Env
from rhmapper.errors import (
    CheckpointCorruptError,
    CheckpointIncompleteError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ClusterAuthenticationError,
    MapCancelledError,
    NoReplicasError,
    PoolMismatchError,
    ReplicaLostError,
    RhmapperError,
    UnschedulableError,
)
from rhmapper.diagnosis import Diagnosis, RunningCall
from rhmapper.pool_stats import MapperStats, MapSnapshot, ReplicaStats
from rhmapper.retries import Retries

__all__ = [
    "Autoscale",
    "Batched",
    "CheckpointCorruptError",
    "CheckpointIncompleteError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "ClusterAuthenticationError",
    "Diagnosis",
    "Env",
    "MapCancelledError",
    "MapSnapshot",
    "MapperStats",
    "NoReplicasError",
    "PoolMismatchError",
    "ReplicaCount",
    "ReplicaLostError",
    "ReplicaStats",
    "Retries",
    "RunningCall",
    "RhmapperError",
    "ScalingDecision",
    "UnschedulableError",
    "read_checkpoint",
]
__version__ = "0.1.0"

try:
    from rhmapper.mapper import Mapper, mapper
    from rhmapper.module import Module, module
    from rhmapper.spawned import MapStatus, SpawnedMap, get_map
except ImportError as error:
    if error.name != "ray":  # without Ray only the core above is here; anything else is a bug
        raise
else:
    __all__ += ["MapStatus", "Mapper", "Module", "SpawnedMap", "get_map", "mapper", "module"]
