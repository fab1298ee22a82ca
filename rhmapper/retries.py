"""Retries: how often a failed item is run again, after what delay, and for which errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rhmapper.checks import check_count


class Retries(BaseModel):
    """Retry policy for items whose user code raised: exponential backoff, optional error filter.

    Pass ``retries=3`` to a map for this policy's defaults with three retries, or a
    ``Retries(...)`` for full control. A retried item prefers a replica other than the one it
    failed on. Items whose replica *died* are re-run regardless of this policy (see
    ``max_replica_crashes`` on the map calls).

    Args:
        max_retries: how many times an item may be re-run after its first failure.
        initial_delay: seconds before the first retry.
        backoff: factor the delay grows by with each further retry.
        max_delay: the delay never exceeds this many seconds.
        retry_on: only exceptions of these types are retried; others fail at once.

    Examples:
        >>> policy = Retries(max_retries=3, initial_delay=0.5, backoff=2, max_delay=1.5)
        >>> [policy.delay(attempt) for attempt in (1, 2, 3)]
        [0.5, 1.0, 1.5]
        >>> policy.should_retry(ValueError("x"), attempt=1)
        True
        >>> Retries(max_retries=1, retry_on=(TimeoutError,)).should_retry(ValueError(), 1)
        False
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    max_retries: int = Field(default=0, ge=0)
    initial_delay: float = Field(default=0.05, ge=0)
    backoff: float = Field(default=2.0, ge=1)
    max_delay: float = Field(default=10.0, ge=0)
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    @field_validator("max_retries", mode="before")
    @classmethod
    def _check_max_retries(cls, max_retries: object) -> int:
        return check_count("max_retries", max_retries, minimum=0)

    @field_validator("retry_on", mode="before")
    @classmethod
    def _check_retry_on(cls, retry_on: object) -> object:
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        for kind in retry_on:  # type: ignore[union-attr]
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ValueError(f"retry_on must hold exception classes, got {kind!r}")
        return tuple(retry_on)  # type: ignore[arg-type]

    @classmethod
    def of(cls, retries: "int | Retries") -> "Retries":
        """The policy for a map's ``retries=`` argument (an int or a ``Retries``).

        A count of another type (``"2"``, ``2.0``, ``True``) raises ``TypeError``, a negative
        one ``ValueError`` (see `rhmapper.checks.check_count`).

        Examples:
            >>> Retries.of(2).max_retries
            2
            >>> Retries.of(2.0)
            Traceback (most recent call last):
            ...
            TypeError: retries must be a whole number >= 0 or rm.Retries(...), got 2.0 (float)
        """
        if isinstance(retries, Retries):
            return retries
        return cls(max_retries=check_count("retries", retries, minimum=0,
                                           or_else="rm.Retries(...)"))

    def should_retry(self, error: BaseException | None, attempt: int) -> bool:
        """Whether an item that failed on its ``attempt``-th run (1 = first) runs again.

        Examples:
            >>> Retries(max_retries=1).should_retry(ValueError(), attempt=2)
            False
        """
        if attempt > self.max_retries:
            return False
        if error is None:  # it could not be pickled back: only a catch-all policy retries it
            return any(issubclass(Exception, kind) for kind in self.retry_on)
        return isinstance(error, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before re-running an item that failed on its ``attempt``-th run.

        Examples:
            >>> Retries(initial_delay=1, backoff=3).delay(2)
            3.0
        """
        return float(min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1)))
