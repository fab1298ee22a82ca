"""rhmapper: map a function, or a method of a stateful class, over a pool of Ray actors."""

from rhmapper.connect import ClusterAuthenticationError
from rhmapper.env import Env
from rhmapper.errors import (
    MapCancelledError,
    NoReplicasError,
    PoolMismatchError,
    ReplicaLostError,
    RhmapperError,
    UnschedulableError,
)
from rhmapper.mapper import Mapper, mapper
from rhmapper.module import Module, module
from rhmapper.retries import Retries

__all__ = [
    "ClusterAuthenticationError",
    "Env",
    "MapCancelledError",
    "Mapper",
    "Module",
    "NoReplicasError",
    "PoolMismatchError",
    "ReplicaLostError",
    "Retries",
    "RhmapperError",
    "UnschedulableError",
    "mapper",
    "module",
]
__version__ = "0.1.0"
