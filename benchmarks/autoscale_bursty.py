"""Autoscaling on the local Ray (issue 21, part 6): ``replicas=rm.Autoscale(min=0, max=4,
idle_seconds=3)`` against a hand-tuned fixed pool on the same bursty workload.

Each pool runs ``--bursts`` maps of ``--items`` items (each ``time.sleep(0.05)``) at
``compute={"CPU": 0.5}``, the next map ``--gap-seconds`` after the last one returned; the pool is
made just before the first map (its start-up counts, for both). Measured:

- replica-seconds: ``m.num_replicas`` (starting or ready) sampled every 0.1 s, from making the
  mapper to the end of the last map, plus, for the autoscaled pool, its way back to ``min``,
- makespan: the sum of the maps' times,
- to min: after each map, until ``m.num_replicas`` is back at ``min`` (polled every 0.05 s).

The fixed pool is hand-tuned by trying sizes from ``max`` down: the smallest whose makespan is
within 5% of the best tried. Goals (issue 21): replica-seconds <= 1.15 x fixed, makespan <= 1.05 x
fixed, at min within ``idle_seconds`` + 2 s after each burst.

Usage (it starts its own local Ray with 4 CPUs; about 2 minutes)::

    python benchmarks/autoscale_bursty.py
    python benchmarks/autoscale_bursty.py --items 480 --gap-seconds 8
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass

import ray

import rhmapper as rm

ITEM_SECONDS = 0.05
FIXED_SLACK = 0.05
"""The hand-tuned fixed pool: the smallest whose makespan is within this of the best tried."""


def work(x: int) -> int:
    """One item: 50 ms of waiting (a replica runs one call at a time)."""
    time.sleep(ITEM_SECONDS)
    return 2 * x


class ReplicaMeter:
    """Integrates ``mapper.num_replicas`` over time, sampled every 0.1 s in a thread."""

    def __init__(self, mapper: rm.Mapper) -> None:
        self.mapper = mapper
        self.replica_seconds = 0.0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        last = time.monotonic()
        while True:
            count = self.mapper.num_replicas
            stopping = self._stop.wait(0.1)
            now = time.monotonic()
            self.replica_seconds += count * (now - last)
            self.peak, last = max(self.peak, count), now
            if stopping:
                return

    def stop(self) -> float:
        """Stop sampling; the replica-seconds counted."""
        self._stop.set()
        self._thread.join(5)
        return self.replica_seconds


@dataclass
class Run:
    """What one pool used and took on the bursts."""

    label: str
    replica_seconds: float
    makespan: float
    to_min: list[float | None]
    peak: int
    decisions: list[str]
    """The autoscaler's decisions (`rhmapper.Mapper.scaling_history`), seconds from the start."""


def run_bursts(label: str, replicas: int | rm.Autoscale, bursts: int, items: int,
               gap_seconds: float) -> Run:
    """Make a mapper of ``replicas`` and run the bursts on it (results checked)."""
    least = replicas.min if isinstance(replicas, rm.Autoscale) else replicas
    env = rm.Env(name=f"bursty_{label}", compute={"CPU": 0.5})
    makespan, to_min, made = 0.0, [], time.time()
    with rm.mapper(work, replicas=replicas, env=env) as mapper:
        meter = ReplicaMeter(mapper)
        for burst in range(bursts):
            started = time.monotonic()
            if mapper.map(range(items)) != [2 * x for x in range(items)]:
                raise AssertionError(f"{label}: a burst came back wrong")
            ended = time.monotonic()
            makespan += ended - started
            while mapper.num_replicas > least and time.monotonic() - ended < gap_seconds:
                time.sleep(0.05)
            at_min = time.monotonic()
            to_min.append(at_min - ended if mapper.num_replicas <= least else None)
            if burst == bursts - 1:
                meter.stop()
            else:
                time.sleep(max(0.0, ended + gap_seconds - at_min))
        decisions = [f"{decision.at - made:6.2f} s  {decision}"
                     for decision in mapper.scaling_history()]
    return Run(label, meter.replica_seconds, makespan, to_min, meter.peak, decisions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--items", type=int, default=320, help="items per burst")
    parser.add_argument("--gap-seconds", type=float, default=6.0)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with rm.mapper(work, replicas=args.max, env=rm.Env(name="bursty_warm",
                                                       compute={"CPU": 0.5})) as warm:
        warm.map(range(4 * args.max))  # Ray's first worker processes, imports
    burst = (args.bursts, args.items, args.gap_seconds)
    fixed: list[Run] = []
    for size in range(args.max, 0, -1):
        fixed.append(run_bursts(f"fixed{size}", size, *burst))
        print(f"fixed {size}: makespan {fixed[-1].makespan:.2f} s, "
              f"{fixed[-1].replica_seconds:.1f} replica-s", flush=True)
        if fixed[-1].makespan > (1 + FIXED_SLACK) * min(run.makespan for run in fixed):
            break
    best = min(run.makespan for run in fixed)
    tuned = [run for run in fixed if run.makespan <= (1 + FIXED_SLACK) * best][-1]
    scale = rm.Autoscale(min=0, max=args.max, idle_seconds=args.idle_seconds)
    auto = run_bursts("auto", scale, *burst)
    ray.shutdown()
    cost, slower = auto.replica_seconds / tuned.replica_seconds, auto.makespan / tuned.makespan
    in_time = all(t is not None and t <= args.idle_seconds + 2 for t in auto.to_min)
    print(f"\n{args.bursts} bursts of {args.items} x {ITEM_SECONDS} s items, "
          f"{args.gap_seconds} s apart; {scale}\n")
    print("| pool | replica-s | makespan (s) | peak replicas | to min after bursts (s) |")
    print("|---|---:|---:|---:|---|")
    for run in (tuned, auto):
        print(f"| {run.label} | {run.replica_seconds:.1f} | {run.makespan:.2f} | {run.peak} "
              f"| {_listed(run.to_min)} |")
    print("\n| ratio / check | measured | goal | met |\n|---|---:|---:|---|")
    for name, measured, goal, met in (
            ("replica-s auto / fixed", f"{cost:.2f}", "<= 1.15", cost <= 1.15),
            ("makespan auto / fixed", f"{slower:.2f}", "<= 1.05", slower <= 1.05),
            ("to min after each burst (s)", _listed(auto.to_min),
             f"<= {args.idle_seconds + 2:g}", in_time)):
        print(f"| {name} | {measured} | {goal} | {'yes' if met else 'NO'} |")
    print("\nthe autoscaler's decisions:", *auto.decisions, sep="\n  ")


def _listed(seconds: list[float | None]) -> str:
    """Times to min, ``-`` where the pool was not back at min within the gap."""
    return ", ".join("-" if t is None else f"{t:.1f}" for t in seconds)


if __name__ == "__main__":
    main()
