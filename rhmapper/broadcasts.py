"""A broadcast in two halves: sent to every replica (`Broadcast.futures` complete as each
replica answers), then its answers read. ``m.broadcast`` reads them at once; ``await
m.abroadcast`` awaits the futures on the event loop first, so no thread waits for them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """A broadcast sent: one future per replica, done once the replica answered, and
    ``answers`` to read the answers (in pool order; raising the first replica's error, noted
    with its name).

    Examples:
        >>> done = concurrent.futures.Future(); done.set_result("ok")
        >>> sent = Broadcast([done], answers=lambda: [done.result()])
        >>> concurrent.futures.wait(sent.futures).not_done, sent.answers()
        (set(), ['ok'])
        >>> Broadcast.joined([sent, sent]).answers()
        ['ok', 'ok']
    """

    futures: list[concurrent.futures.Future]
    answers: Callable[[], list]

    @staticmethod
    def joined(parts: list[Broadcast]) -> Broadcast:
        """One broadcast of ``parts`` (the pools of several clusters), answers in their order."""
        return Broadcast([future for part in parts for future in part.futures],
                         lambda: [answer for part in parts for answer in part.answers()])
