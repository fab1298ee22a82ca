"""Durable maps (issue 22, part 5): the cost of ``checkpoint=`` on local disk, and how long a
resume takes after the driver was killed at 90 %.

- **Overhead**: ``m.map(range(N))`` of a function returning a ~1 KiB result, with and without
  ``checkpoint=`` (a new directory each time), interleaved, ``--rounds`` times; the median of
  each and their ratio (goal <= 1.05).
- **Resume**: a driver process joins this Ray, runs the same checkpointed map as an ``imap``
  and is killed with SIGKILL once 90 % of the results came back; this process then runs the map
  again with the same checkpoint, timed (goal <= 15 % of the full checkpointed map's median).
  The killed driver defines the same ``__main__.kilobyte_result``, so both are the same map.

Usage (starts its own local Ray with 4 CPUs)::

    python benchmarks/durable.py                 # N = 100,000 items of no work, 3 rounds
    python benchmarks/durable.py --work-ms 1 --replicas 4 --rounds 2   # items of 1 ms
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import ray

import rhmapper as rm

RESULT_BYTES = 1024


def kilobyte_result(x: int, work_seconds: float) -> bytes:
    """A ~1 KiB result (the item's number, padded), after ``work_seconds`` of waiting."""
    if work_seconds:
        time.sleep(work_seconds)
    return x.to_bytes(8, "little") * (RESULT_BYTES // 8)


def timed_map(mapper: rm.Mapper, items: int, work_seconds: float, checkpoint: str | None
              ) -> float:
    """Seconds for one map of ``items`` (results checked)."""
    started = time.perf_counter()
    options = {"kwargs": {"work_seconds": work_seconds}}
    if checkpoint is not None:
        options["checkpoint"] = checkpoint
    results = mapper.map(range(items), **options)
    elapsed = time.perf_counter() - started
    if len(results) != items or results[items // 2] != kilobyte_result(items // 2, 0.0):
        raise AssertionError("a map came back wrong")
    return elapsed


KILLED_DRIVER = """
    import sys, time
    import ray
    import rhmapper as rm

    def kilobyte_result(x, work_seconds):
        if work_seconds:
            time.sleep(work_seconds)
        return x.to_bytes(8, "little") * (1024 // 8)

    address, checkpoint, items = sys.argv[1], sys.argv[2], int(sys.argv[3])
    work_seconds, replicas = float(sys.argv[4]), int(sys.argv[5])
    ray.init(address=address, log_to_driver=False)
    with rm.mapper(kilobyte_result, replicas=replicas, env=rm.Env(name="durable_bench")) as m:
        for count, _ in enumerate(m.imap(range(items), checkpoint=checkpoint,
                                         kwargs={"work_seconds": work_seconds}), 1):
            if count == int(0.9 * items):
                print("NINETY", flush=True)
                break
        input()  # killed here, with SIGKILL
"""


def killed_at_ninety(checkpoint: str, items: int, work_seconds: float, replicas: int) -> None:
    """Run the checkpointed map in a driver process of this Ray; SIGKILL it at 90 %."""
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_DRIVER), address, checkpoint, str(items),
         str(work_seconds), str(replicas)],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        if line.strip() != "NINETY":
            raise AssertionError(f"the driver to kill printed {line!r}")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-ms", type=float, default=0.0, help="each item's wait")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    work = args.work_ms / 1000
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    folder = tempfile.mkdtemp(prefix="rhm-durable-bench-")
    try:
        with rm.mapper(kilobyte_result, replicas=args.replicas,
                       env=rm.Env(name="durable_bench")) as m:
            timed_map(m, min(args.items, 10_000), work, None)  # warm: workers, batch sizes
            plain, durable = [], []
            for round_ in range(args.rounds):
                plain.append(timed_map(m, args.items, work, None))
                checkpoint = os.path.join(folder, f"full{round_}")
                durable.append(timed_map(m, args.items, work, checkpoint))
                # Deleted at once, as a long-running machine's page cache recycles pages: on a
                # fresh VM, writing into memory the guest never touched is several times slower.
                shutil.rmtree(checkpoint)
                print(f"round {round_}: plain {plain[-1]:.3f} s, checkpointed "
                      f"{durable[-1]:.3f} s", flush=True)
            killed = os.path.join(folder, "killed")
            killed_at_ninety(killed, args.items, work, args.replicas)
            saved = sum(1 for _ in rm.read_checkpoint(killed, partial=True))
            resume = timed_map(m, args.items, work, killed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        ray.shutdown()
    full = statistics.median(durable)
    ratio, share = full / statistics.median(plain), resume / full
    print(f"\n{args.items:,} items of {args.work_ms:g} ms, ~{RESULT_BYTES} B results, "
          f"{args.replicas} replicas, local disk; medians of {args.rounds}\n")
    print("| measured | value | goal | met |\n|---|---:|---:|---|")
    print(f"| plain map (s) | {statistics.median(plain):.3f} | | |")
    print(f"| checkpointed map (s) | {full:.3f} | | |")
    print(f"| checkpointed / plain | {ratio:.3f} | <= 1.05 | {'yes' if ratio <= 1.05 else 'NO'} |")
    print(f"| saved when killed at 90 % | {saved:,} | | |")
    print(f"| resume (s) | {resume:.3f} | | |")
    print(f"| resume / full checkpointed map | {share:.3f} | <= 0.15 | "
          f"{'yes' if share <= 0.15 else 'NO'} |")


if __name__ == "__main__":
    main()
