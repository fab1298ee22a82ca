"""A thread that calls a function every so often until stopped (the autoscaler's clock)."""

from __future__ import annotations

import logging
import threading
from typing import Callable

_log = logging.getLogger(__name__)


class Ticker:
    """Calls ``tick`` every ``seconds`` in a daemon thread of its own until `stop`. A tick that
    raises is logged as a warning with its traceback (naming ``what``), and the next one runs.

    Examples:
        >>> import time
        >>> ticks = []
        >>> ticker = Ticker(0.01, lambda: ticks.append(1), "a doctest")
        >>> time.sleep(0.2); ticker.stop(); bool(ticks)
        True
    """

    def __init__(self, seconds: float, tick: Callable[[], None], what: str) -> None:
        self._seconds = seconds
        self._tick = tick
        self._what = what
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rhmapper-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No tick starts from now on (one running ends on its own)."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._seconds):
            try:
                self._tick()
            except Exception:  # the next tick tries again; what failed is in the log
                _log.warning("rhmapper: %s failed this tick", self._what, exc_info=True)
