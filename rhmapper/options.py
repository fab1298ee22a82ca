"""The options of the map verbs, defined and validated once. Pure Python: no Ray.

`MapOptions` types them for callers (``m.map(xs, **options)`` with ``Unpack``, so editors show
each one); `MapSettings` holds them with their defaults, checked as they are built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict

from rhmapper.checks import check_count, check_seconds
from rhmapper.retries import Retries
from rhmapper.plan import DEFAULT_WINDOW


class MapOptions(TypedDict, total=False):
    """The options of `Mapper.map`, `Mapper.starmap`, `Mapper.imap` and
    `Mapper.imap_unordered`, all keyword-only and optional.

    Attributes:
        method: map this method instead of the mapper's own.
        kwargs: constant keyword arguments for every call, sent to the replicas once.
        retries: re-runs of a failed item (an int, or `rhmapper.Retries`). Default 0.
        return_exceptions: put an item's exception in its place instead of raising it.
        timeout: seconds an item may take; a slower item fails with ``TimeoutError``.
        batch_size: ``"auto"`` (default) adapts to item durations; an int fixes items per call.
        progress: show a tqdm bar (``None``, the default: when stderr is a terminal).
        max_replica_crashes: an item that was running each time a replica died this many times
            (default 3) fails with `rhmapper.ReplicaLostError`.
        checkpoint: a local path or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://``):
            each result is saved there as it finishes, and the same map run again sends only
            the inputs without one (see the "Durable maps" page).
        overwrite: with ``checkpoint``, start afresh: delete what is saved there first.

    Examples:
        >>> options: MapOptions = {"retries": 2, "timeout": 30.0}
        >>> MapSettings.of(options).retries
        2
    """

    method: str | None
    kwargs: dict | None
    retries: int | Retries
    return_exceptions: bool
    timeout: float | None
    batch_size: int | Literal["auto"]
    progress: bool | None
    max_replica_crashes: int
    checkpoint: str | None
    overwrite: bool


class StreamOptions(MapOptions, total=False):
    """`MapOptions`, plus how far a lazy map reads ahead (`Mapper.imap`, `Mapper.imap_unordered`).

    Attributes:
        window: at most this many items are pulled from the input and not yet yielded (default
            16,384), so memory stays bounded for endless inputs.

    Examples:
        >>> MapSettings.of({"window": 64}).window
        64
    """

    window: int


@dataclass(frozen=True)
class MapSettings:
    """The options of one map with their defaults, checked when built (see `MapOptions`).

    Examples:
        >>> MapSettings().batch_size, MapSettings().max_replica_crashes
        ('auto', 3)
        >>> MapSettings(timeout=0)
        Traceback (most recent call last):
        ...
        ValueError: timeout must be a number of seconds > 0, got 0
        >>> MapSettings(window="64")
        Traceback (most recent call last):
        ...
        TypeError: window must be a whole number >= 1, got '64' (str)
    """

    method: str | None = None
    kwargs: dict | None = None
    retries: int | Retries = 0
    return_exceptions: bool = False
    timeout: float | None = None
    batch_size: int | str = "auto"
    progress: bool | None = None
    max_replica_crashes: int = 3
    window: int = DEFAULT_WINDOW
    checkpoint: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.method is not None and not isinstance(self.method, str):
            raise TypeError(f"method must be a method name (a str), got {self.method!r}")
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            raise TypeError(
                f"kwargs must be a dict of constant keyword arguments, got {self.kwargs!r}")
        Retries.of(self.retries)
        if self.batch_size != "auto":
            self._set("batch_size", check_count("batch_size", self.batch_size, or_else="'auto'"))
        if self.timeout is not None:
            check_seconds("timeout", self.timeout)
        self._set("max_replica_crashes", check_count("max_replica_crashes",
                                                     self.max_replica_crashes))
        self._set("window", check_count("window", self.window))
        if self.checkpoint is not None:
            if isinstance(self.checkpoint, os.PathLike):
                self._set("checkpoint", os.fspath(self.checkpoint))
            if not isinstance(self.checkpoint, str) or not self.checkpoint:
                raise TypeError(f"checkpoint must be a local path or a URI (s3://..., gs://..., "
                                f"file://...), got {self.checkpoint!r}")
        if self.overwrite is not False and (self.overwrite is not True or not self.checkpoint):
            raise ValueError(f"overwrite={self.overwrite!r} applies to a map with checkpoint=URI "
                             "(overwrite=True deletes what is saved there first)")

    def _set(self, name: str, value: Any) -> None:
        """Store a checked value (a NumPy integer becomes an int) in this frozen dataclass."""
        object.__setattr__(self, name, value)

    @classmethod
    def of(cls, options: dict[str, Any], stream: bool = True) -> "MapSettings":
        """Build from a verb's keyword arguments (``stream``: of a lazy verb, which also takes
        ``window``); an unknown one is a ``TypeError`` naming the known ones.

        Examples:
            >>> MapSettings.of({"retry": 1})
            Traceback (most recent call last):
            ...
            TypeError: unknown map option 'retry'; the options are: batch_size, checkpoint, kwargs, max_replica_crashes, method, overwrite, progress, retries, return_exceptions, timeout, window
        """
        known = {option.name for option in fields(cls)} - (set() if stream else {"window"})
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown map option {unknown[0]!r}; the options are: "
                            f"{', '.join(sorted(known))}")
        return cls(**options)
