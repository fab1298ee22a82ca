"""The progress bar of a map: a tqdm bar with live replicas, retries and failures."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from rhmapper.plan import MapStats


class Progress:
    """A tqdm bar for one map, or nothing when disabled.

    ``enabled=None`` shows the bar when stderr is a terminal.

    Examples:
        >>> bar = Progress(enabled=False, total=10, description="double")
        >>> bar.update(3, MapStats(done=3), live_replicas=2); bar.close()
        >>> bar.bar is None
        True
    """

    def __init__(self, enabled: bool | None, total: int | None, description: str) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=description, unit="item", dynamic_ncols=True) if enabled else None

    def update(self, done: int, stats: MapStats, live_replicas: int | str) -> None:
        """Count ``done`` more finished items and refresh the postfix."""
        if self.bar is None:
            return
        self.bar.set_postfix(replicas=live_replicas, retries=stats.retries, failed=stats.failures,
                             refresh=False)
        self.bar.update(done)

    def close(self) -> None:
        """Close the bar (it stays on screen with its final counts)."""
        if self.bar is not None:
            self.bar.close()
