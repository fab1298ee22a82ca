"""What one map asks of the scheduler (`MapPlan`) and what it counts (`MapStats`): the types the
verbs, the host, the progress bar and the scheduler's rooms all share, so none of them imports
the dispatch loop (`rhmapper.scheduler`) to name them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rhmapper.latency import LatencySketch
from rhmapper.retries import Retries
from rhmapper.wire import CallSpec

if TYPE_CHECKING:
    from rhmapper.durable import Checkpointing

DEFAULT_MAX_CALL_BYTES = 16 * 2**20
"""A call carries about this many bytes of input at most; a larger item goes alone."""
DEFAULT_MAX_WAIT_SECONDS = 0.01
"""How long items pulled from an iterator wait for more to fill their call, unless the mapper is
batched (then its ``Batched(max_wait_ms=...)``)."""
DEFAULT_WINDOW = 16_384
"""imap/imap_unordered keep at most this many items pulled from the input but not yet yielded."""


@dataclass(frozen=True)
class MapPlan:
    """The options of one map, as the scheduler needs them.

    Examples:
        >>> plan = MapPlan(CallSpec("fn"), total=3)
        >>> plan.batch_size, plan.window == DEFAULT_WINDOW, plan.ordered
        ('auto', True, True)
    """

    call: CallSpec
    ordered: bool = True
    collect: bool = False
    total: int | None = None
    retries: Retries = field(default_factory=Retries)
    return_exceptions: bool = False
    timeout: float | None = None
    batch_size: int | str = "auto"
    max_replica_crashes: int = 3
    window: int | None = DEFAULT_WINDOW
    max_call_bytes: int = DEFAULT_MAX_CALL_BYTES
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS
    """How long items pulled from an iterator wait for more to fill their call once they could
    go (see `rhmapper.input_feed.InputFeed.take`)."""
    indexed: bool = False
    """An unordered map yields each result as an ``(index, value)`` pair (the shared runs of
    `rhmapper.lanes` tell by the index whose item it was)."""
    checkpoint: Checkpointing | None = None
    """A `rhmapper.durable.Checkpointing`: the map's results are saved there, and only inputs
    without one are sent."""
    item_seconds_hint: float | None = None
    """The run time of one item measured by an earlier map of the same method, if any: auto
    batches are sized from it until this map's own calls answer (see `CallSizer.batch_size`)."""


@dataclass
class MapStats:
    """Counters of one map, for the progress bar and for callers.

    Examples:
        >>> MapStats().done
        0
    """

    done: int = 0
    retries: int = 0
    failures: int = 0
    replicas_lost: int = 0
    """Replicas that died under the map's calls."""
    timed_out: int = 0
    """Items whose call outlived ``timeout=``."""
    calls: int = 0
    """Calls answered."""
    started_at: float = field(default_factory=time.monotonic)
    call_seconds: LatencySketch = field(default_factory=LatencySketch, repr=False)
    """Each answered call's time from sending to answer."""
