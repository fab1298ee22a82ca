"""The exception types rhmapper raises besides the user's own."""

from __future__ import annotations


class RhmapperError(Exception):
    """Base class of the errors rhmapper raises itself.

    Examples:
        >>> import rhmapper as rm
        >>> issubclass(rm.NoReplicasError, rm.RhmapperError)
        True
    """


class NoReplicasError(RhmapperError):
    """No live replica is left to run the remaining work.

    Raised when every replica in the pool has died (or could not be placed again)
    while inputs were still waiting.

    ``benched`` is True when every replica is your actor still running a call that outlived
    ``timeout=``: they may come back once those calls answer.

    Examples:
        >>> import rhmapper as rm
        >>> str(rm.NoReplicasError("all 2 replicas died"))
        'all 2 replicas died'
        >>> rm.NoReplicasError("all busy", benched=True).benched
        True
    """

    def __init__(self, message: str, benched: bool = False) -> None:
        super().__init__(message)
        self.benched = benched


class ReplicaLostError(RhmapperError):
    """A replica died while it was running an item.

    The scheduler normally re-runs such items elsewhere; this error reaches the caller
    only when an item killed its replica on every one of its allowed attempts.

    Examples:
        >>> import rhmapper as rm
        >>> issubclass(rm.ReplicaLostError, rm.RhmapperError)
        True
    """


class UnschedulableError(RhmapperError):
    """The resources an `Env` asks for can never be granted by the cluster.

    Examples:
        >>> import rhmapper as rm
        >>> issubclass(rm.UnschedulableError, rm.RhmapperError)
        True
    """


class MapCancelledError(RhmapperError):
    """The map was cancelled by `Mapper.cancel` before it finished.

    Examples:
        >>> import rhmapper as rm
        >>> issubclass(rm.MapCancelledError, rm.RhmapperError)
        True
    """


class PoolMismatchError(RhmapperError):
    """Named replicas of the env already exist, built from another function, class, constructor
    arguments, ``runtime_env``, ``compute`` or ``concurrency``: the mapper will not run on them.

    Examples:
        >>> import rhmapper as rm
        >>> issubclass(rm.PoolMismatchError, rm.RhmapperError)
        True
    """


class ClusterNotFoundError(RhmapperError, ConnectionError):
    """No Ray cluster answered at the address the command was given (or found).

    Examples:
        >>> issubclass(ClusterNotFoundError, ConnectionError)
        True
    """


class ClusterAuthenticationError(RhmapperError, ConnectionError):
    """The Ray cluster refused this driver: it uses token authentication and this driver sent no
    token (``RAY_AUTH_MODE=token`` unset) or another one.

    Examples:
        >>> error = ClusterAuthenticationError("the Ray cluster at ray://10.0.0.5:10001 ...")
        >>> isinstance(error, ConnectionError)
        True
    """


class CheckpointMismatchError(RhmapperError, ValueError):
    """A checkpoint belongs to another map: it was written with another fingerprint (target,
    constant kwargs, options that change results), one of its inputs differs from the input whose
    result it holds, or its location holds files that are not a checkpoint.

    Examples:
        >>> issubclass(CheckpointMismatchError, ValueError)
        True
    """


class CheckpointWriteError(RhmapperError):
    """Writing results to a checkpoint failed (the storage is down, full or refused the write).

    Results already written stay readable; the message says how many were not saved. The
    storage's own error is the ``__cause__``.

    Examples:
        >>> issubclass(CheckpointWriteError, RhmapperError)
        True
    """


class CheckpointIncompleteError(RhmapperError):
    """A checkpoint was read as a whole, but its map has not finished all its items.

    Examples:
        >>> issubclass(CheckpointIncompleteError, RhmapperError)
        True
    """


class CheckpointNotFoundError(RhmapperError, FileNotFoundError):
    """No checkpoint is at the URI that was read (no ``manifest.json`` there).

    Examples:
        >>> issubclass(CheckpointNotFoundError, FileNotFoundError)
        True
    """


class CheckpointCorruptError(RhmapperError, ValueError):
    """A shard of a checkpoint cannot be read (it was cut short or damaged outside rhmapper).

    Examples:
        >>> issubclass(CheckpointCorruptError, ValueError)
        True
    """
