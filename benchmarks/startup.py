"""Start-up: time to first result with N new replicas, against one replica's start-up time.

Replicas are created in parallel and each takes work as soon as it is ready, so the first result of
a map over 4 new replicas should come about as fast as one replica starts. Two start-ups are timed:
a bare replica (a new worker process importing Ray: CPU-bound, so on a 2-core machine four of them
contend for the cores) and a replica whose constructor waits ``--init-seconds`` (like a model
download: parallel start-ups overlap).

    python benchmarks/startup.py [--replicas 4] [--repeats 3] [--init-seconds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

import rhmapper as rm


class SlowInit:
    """A replica whose start-up waits, as one that downloads a model would."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)

    def identity(self, x):
        return x


def first_result_seconds(replicas: int, name: str, init_seconds: float) -> tuple[float, float]:
    """Seconds from mapper creation to the first imap result, and to every replica ready."""
    started = time.perf_counter()
    env = rm.Env(name=name, compute={"CPU": 0.5})
    target = rm.module(SlowInit, init_seconds)
    with rm.mapper(target, method="identity", replicas=replicas, env=env) as m:
        next(iter(m.imap(range(1000))))
        first = time.perf_counter() - started
        m.wait_ready()
        ready = time.perf_counter() - started
    return first, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--init-seconds", type=float, default=2.0)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    first_result_seconds(1, "warmup", 0)  # the first actor of a session also starts Ray's workers
    print("| start-up | replicas | first result (s) | all ready (s) | first result / one replica's |")
    print("|---|---|---|---|---|")
    for label, init_seconds in (("bare process", 0.0), (f"{args.init_seconds:g} s init", args.init_seconds)):
        rows = []
        for repeat in range(args.repeats):
            one, _ = first_result_seconds(1, f"one{repeat}", init_seconds)
            many, all_ready = first_result_seconds(args.replicas, f"many{repeat}", init_seconds)
            rows.append((one, many, all_ready))
        one = statistics.median(row[0] for row in rows)
        many = statistics.median(row[1] for row in rows)
        all_ready = statistics.median(row[2] for row in rows)
        print(f"| {label} | 1 | {one:.2f} | {one:.2f} | 1.00 |")
        print(f"| {label} | {args.replicas} | {many:.2f} | {all_ready:.2f} | {many / one:.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
