"""The exceptions the caller sees when an item fails on a replica: the user's own exception,
rebuilt on the driver, with the remote traceback and where it failed as PEP 678 notes."""

from __future__ import annotations

from rhmapper.errors import RhmapperError
from rhmapper.wire import RemoteFailure


def add_note(error: BaseException, note: str) -> None:
    """Attach a PEP 678 note to ``error`` (also on Python 3.10, which lacks ``add_note``).

    Examples:
        >>> error = ValueError("x"); add_note(error, "item 3"); error.__notes__
        ['item 3']
    """
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def user_error(failure: RemoteFailure, index: int, replica_name: str) -> BaseException:
    """The exception the caller sees for an item: the user's own type, noted with where it failed.

    Examples:
        >>> failure = RemoteFailure.capture(ValueError("bad"))
        >>> error = user_error(failure, 7, "double_replica_0")
        >>> type(error).__name__, error.__notes__[-1]
        ('ValueError', 'rhmapper: item 7 failed on replica double_replica_0')
    """
    error = remote_error(failure)
    add_note(error, f"rhmapper: item {index} failed on replica {replica_name}")
    return error


def remote_error(failure: RemoteFailure) -> BaseException:
    """The exception a replica raised, rebuilt here (else an `RhmapperError` naming it), with
    its remote traceback as a note.

    Examples:
        >>> error = remote_error(RemoteFailure.capture(KeyError("k")))
        >>> type(error).__name__, error.__notes__[0].splitlines()[0]
        ('KeyError', 'Remote traceback:')
    """
    error = failure.error
    if error is None:
        problem = failure.rebuild_problem
        error = RhmapperError(f"{failure.type_name}: {failure.message}"
                              + (f" (the exception could not be {problem})" if problem else ""))
    add_note(error, f"Remote traceback:\n{failure.remote_traceback.rstrip()}")
    return error
