"""What pulling a map's input costs: ``imap`` over a generator (pulled by a thread) and over a
list (sliced, as ``map`` does) against ``map`` over the same items as a list, interleaved round
by round in one process on one mapper, and how soon the items of a stream that pauses come back.

Usage::

    python benchmarks/imap_input.py                  # 200,000 x `x + 1`, 10 rounds
    python benchmarks/imap_input.py --items 50000 --rounds 5

Reports the median wall time of each and their ratio, then, for a stream that gives 5 items and
blocks: the seconds until their 5 results are back (the items wait at most 10 ms for more).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

import ray

import rhmapper as rm


def increment(x: int) -> int:
    return x + 1


def paused_stream_latency(mapper: rm.Mapper, count: int = 5, limit: float = 30.0) -> float:
    """Seconds from putting ``count`` items in a stream (that then blocks) to their results
    (``inf`` if they are not back within ``limit`` seconds)."""
    inputs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def stream():
        while (item := inputs.get()) is not None:
            yield item

    reader = threading.Thread(target=lambda: [results.put(v) for v in mapper.imap(stream())],
                              daemon=True)
    reader.start()
    started = time.perf_counter()
    for item in range(count):
        inputs.put(item)
    try:
        for _ in range(count):
            results.get(timeout=limit)
        seconds = time.perf_counter() - started
    except queue.Empty:
        seconds = float("inf")
    inputs.put(None)
    reader.join(60)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--items", type=int, default=200_000)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    items = list(range(args.items))
    expected = [x + 1 for x in items]
    with rm.mapper(increment, replicas=4,
                   env=rm.Env(name="imap_input", compute={"CPU": 0.5})) as mapper:
        mapper.wait_ready()
        mapper.map(items)  # sizes the calls of the rounds below
        times: dict[str, list[float]] = {"map over a list": [], "imap over a list": [],
                                         "imap over a generator": []}
        for _ in range(args.rounds):
            started = time.perf_counter()
            assert mapper.map(items) == expected
            times["map over a list"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert list(mapper.imap(items)) == expected
            times["imap over a list"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert list(mapper.imap(x for x in items)) == expected
            times["imap over a generator"].append(time.perf_counter() - started)
        baseline = statistics.median(times["map over a list"])
        print(f"{args.items:,} x `x + 1`, {args.rounds} interleaved rounds, medians")
        print("| verb | wall ms | / map |")
        print("|---|---|---|")
        for name, seconds in times.items():
            median = statistics.median(seconds)
            print(f"| {name} | {median * 1e3:.1f} | {median / baseline:.2f} |")
        latencies = [paused_stream_latency(mapper) for _ in range(3)]
        print(f"5 items of a stream that then blocks: results back in "
              f"{statistics.median(latencies) * 1e3:.0f} ms (median of 3)")


if __name__ == "__main__":
    main()
