"""A thread that calls a function every so often until stopped (the autoscaler's clock)."""

from __future__ import annotations

import logging
import threading
from typing import Callable

_log = logging.getLogger(__name__)


class Ticker:
    """Calls ``tick`` every ``seconds`` in a daemon thread of its own until `stop`, and at once
    when poked (`poke`). A tick that raises is logged as a warning with its traceback (naming
    ``what``), and the next one runs.

    Examples:
        >>> import time
        >>> ticks = []
        >>> ticker = Ticker(0.01, lambda: ticks.append(1), "a doctest")
        >>> time.sleep(0.2); ticker.stop(); bool(ticks)
        True
        >>> slow = Ticker(3600, lambda: ticks.append("poked"), "a doctest")
        >>> slow.poke(); time.sleep(0.2); slow.stop(); ticks[-1]
        'poked'

    """

    def __init__(self, seconds: float, tick: Callable[[], None], what: str) -> None:
        self._seconds = seconds
        self._tick = tick
        self._what = what
        self._stopped = False
        self._poked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rhmapper-ticker", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Tick now (from any thread), not at the end of the current wait."""
        self._poked.set()

    def stop(self) -> None:
        """No tick starts from now on (one running ends on its own)."""
        self._stopped = True
        self._poked.set()

    def _run(self) -> None:
        while True:
            self._poked.wait(self._seconds)
            self._poked.clear()
            if self._stopped:
                return
            try:
                self._tick()
            except Exception:  # the next tick tries again; what failed is in the log
                _log.warning("rhmapper: %s failed this tick", self._what, exc_info=True)
