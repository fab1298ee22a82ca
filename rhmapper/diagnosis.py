""""Why is it stuck?": the calls of a pool running longest, where they run, how long against their
map's p99, and the Python stacks of the replica threads running them. No Ray here: the Ray edge
(`rhmapper.stacks`) takes the stacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BATCH_RUNNER_FRAME = "batch_runner.py"
"""A thread whose stack holds this file runs a call of rhmapper's (see `calls_threads`)."""


@dataclass(frozen=True)
class RunningCall:
    """One call in flight: items ``first_item`` to ``first_item + items - 1`` of map ``map_id``
    on ``replica`` (its node and process), running for ``seconds``; ``map_p99_seconds`` is the
    p99 of the map's answered calls (``None`` before any answered).

    Examples:
        >>> call = RunningCall(1, 40, 1, "embed_replica_0", "ab12", 4242, 95.0, 0.5)
        >>> call.items_text, round(call.times_p99, 1)
        ('item 40', 190.0)
    """

    map_id: int
    first_item: int
    items: int
    replica: str
    node_id: str | None
    pid: int | None
    seconds: float
    map_p99_seconds: float | None

    @property
    def items_text(self) -> str:
        last = self.first_item + self.items - 1
        return f"item {self.first_item}" if last == self.first_item else (
            f"items {self.first_item}-{last}")

    @property
    def times_p99(self) -> float | None:
        """How many times the map's p99 call time it has run (``None``: no p99 yet)."""
        if not self.map_p99_seconds:
            return None
        return self.seconds / self.map_p99_seconds


@dataclass(frozen=True)
class Diagnosis:
    """What `Mapper.diagnose` found: the ``calls`` running longest (longest first), and the
    stack of each replica process running one, by ``(node_id, pid)`` (the threads running rhmapper's calls, as
    ``py-spy dump`` takes them; or why it could not be taken).

    Examples:
        >>> call = RunningCall(1, 40, 1, "embed_replica_0", "ab12", 4242, 95.0, 0.5)
        >>> print(Diagnosis([call], {("ab12", 4242): 'Thread 7 (active): "Thread-1"\\n    predict (model.py:9)'}))
        item 40 of map 1: 95.0 s on embed_replica_0 (node ab12, pid 4242), 190.0 x the map's p99 (0.500 s)
            Thread 7 (active): "Thread-1"
                predict (model.py:9)
        >>> print(Diagnosis([], {}))
        no call in flight
    """

    calls: list[RunningCall]
    stacks: dict[tuple[str | None, int], str] = field(default_factory=dict)
    taken_at: float = field(default_factory=time.time)

    def __str__(self) -> str:
        if not self.calls:
            return "no call in flight"
        lines = []
        for call in self.calls:
            against = ("no call of the map answered yet" if call.times_p99 is None else
                       f"{call.times_p99:.1f} x the map's p99 ({call.map_p99_seconds:.3f} s)")
            lines.append(f"{call.items_text} of map {call.map_id}: {call.seconds:.1f} s on "
                         f"{call.replica} (node {call.node_id}, pid {call.pid}), {against}")
            stack = self.stacks.get((call.node_id, call.pid)) if call.pid is not None else None
            if stack:
                lines.extend("    " + line for line in stack.splitlines())
        return "\n".join(lines)


NO_CALL_RUNNING = ("(no thread is running a call now: the replica is idle, or its calls await "
                   "between items, as an async replica's do)")


def calls_threads(dump: str) -> str:
    """The threads of a ``py-spy dump`` that run a call of rhmapper's (their stack holds
    `BATCH_RUNNER_FRAME`), or `NO_CALL_RUNNING`.

    Examples:
        >>> dump = '''Process 9: ray::Replica
        ... Thread 1 (idle): "MainThread"
        ...     main_loop (worker.py:900)
        ... Thread 2 (active): "Thread-3"
        ...     predict (model.py:9)
        ...     run_batch (rhmapper/batch_runner.py:330)
        ... '''
        >>> print(calls_threads(dump))
        Thread 2 (active): "Thread-3"
            predict (model.py:9)
            run_batch (rhmapper/batch_runner.py:330)
        >>> calls_threads(dump.split("Thread 2")[0]) == NO_CALL_RUNNING
        True
    """
    threads: list[list[str]] = []
    for line in dump.splitlines():
        if line.startswith("Thread "):
            threads.append([line])
        elif threads and line.strip():
            threads[-1].append(line)
    running = ["\n".join(thread) for thread in threads
               if any(BATCH_RUNNER_FRAME in line for line in thread)]
    return "\n".join(running) if running else NO_CALL_RUNNING
