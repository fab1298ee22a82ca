"""Durable maps (issue 22, part 5): the cost of ``checkpoint=`` on local disk, and how long a
resume takes after the driver was killed at 90 %.

- **Overhead**: ``m.map(range(N))`` of a function returning a ~1 KiB result, with and without
  ``checkpoint=`` (a new directory each time), interleaved, ``--rounds`` times; the median of
  each and their ratio (goal <= 1.05).
- **Where the time goes**: for each map, the CPU seconds of every process on the machine
  (driver, replicas, Ray's own) and of the driver's main thread; and a **floor**: the CPU
  seconds this process takes to write the same bytes to a file of the same disk and to digest
  the same inputs, which any checkpoint of this map must spend somewhere. When the
  plain map already keeps every core busy, the wall-clock ratio cannot be below
  ``1 + floor / (plain map's CPU)``, whatever the design.
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
from dataclasses import dataclass

import psutil
import ray

import rhmapper as rm
from rhmapper.digests import input_digests

RESULT_BYTES = 1024


def kilobyte_result(x: int, work_seconds: float) -> bytes:
    """A ~1 KiB result (the item's number, padded), after ``work_seconds`` of waiting."""
    if work_seconds:
        time.sleep(work_seconds)
    return x.to_bytes(8, "little") * (RESULT_BYTES // 8)


def machine_cpu_seconds() -> float:
    """The CPU seconds (user and system) every process on this machine has used so far."""
    total = 0.0
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
        except psutil.Error:  # it ended, or is not ours to read: it adds nothing we can see
            continue
        total += times.user + times.system
    return total


@dataclass
class Measured:
    """Wall seconds, CPU seconds of the machine, CPU seconds of this thread."""

    wall: float
    machine_cpu: float
    driver_cpu: float


def median_of(runs: list[Measured]) -> Measured:
    return Measured(*(statistics.median(getattr(run, name) for run in runs)
                      for name in ("wall", "machine_cpu", "driver_cpu")))


def timed_map(mapper: rm.Mapper, items: int, work_seconds: float, checkpoint: str | None
              ) -> Measured:
    """One map of ``items`` (results checked), measured."""
    options = {"kwargs": {"work_seconds": work_seconds}}
    if checkpoint is not None:
        options["checkpoint"] = checkpoint
    machine, thread, started = machine_cpu_seconds(), time.thread_time(), time.perf_counter()
    results = mapper.map(range(items), **options)
    measured = Measured(time.perf_counter() - started, machine_cpu_seconds() - machine,
                        time.thread_time() - thread)
    if len(results) != items or results[items // 2] != kilobyte_result(items // 2, 0.0):
        raise AssertionError("a map came back wrong")
    return measured


def floor_cpu_seconds(folder: str, items: int) -> float:
    """The CPU seconds this process takes to write ``items`` results to a new file in
    ``folder`` (into the page cache: the disk's writeback comes later, for any writer) and to
    digest ``items`` inputs."""
    results = memoryview(b"".join(kilobyte_result(x, 0.0) for x in range(items)))
    inputs = list(range(items))
    path = os.path.join(folder, "floor")
    started = time.process_time()
    with open(path, "wb") as file:  # from memory the CPU's caches do not hold, as the writer's
        for start in range(0, len(results), 1 << 20):
            file.write(results[start:start + (1 << 20)])
    input_digests(inputs, plain=True)
    spent = time.process_time() - started
    os.remove(path)
    return spent


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
                print(f"round {round_}: plain {plain[-1].wall:.3f} s, checkpointed "
                      f"{durable[-1].wall:.3f} s", flush=True)
            floor = statistics.median(floor_cpu_seconds(folder, args.items) for _ in range(3))
            killed = os.path.join(folder, "killed")
            killed_at_ninety(killed, args.items, work, args.replicas)
            saved = sum(1 for _ in rm.read_checkpoint(killed, partial=True))
            resume = timed_map(m, args.items, work, killed).wall
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        ray.shutdown()
    report(args, median_of(plain), median_of(durable), floor, saved, resume)


def report(args: argparse.Namespace, plain: Measured, full: Measured, floor: float, saved: int,
           resume: float) -> None:
    ratio, share = full.wall / plain.wall, resume / full.wall
    print(f"\n{args.items:,} items of {args.work_ms:g} ms, ~{RESULT_BYTES} B results, "
          f"{args.replicas} replicas, local disk, {os.cpu_count()} cores; medians of "
          f"{args.rounds}\n")
    print("| measured | plain | checkpointed | ratio | goal | met |\n|---|---:|---:|---:|---:|---|")
    print(f"| wall clock (s) | {plain.wall:.3f} | {full.wall:.3f} | {ratio:.3f} | <= 1.05 | "
          f"{'yes' if ratio <= 1.05 else 'NO'} |")
    print(f"| CPU of every process (s) | {plain.machine_cpu:.3f} | {full.machine_cpu:.3f} | "
          f"{full.machine_cpu / plain.machine_cpu:.3f} | | |")
    print(f"| CPU of the driver's thread (s) | {plain.driver_cpu:.3f} | {full.driver_cpu:.3f} | "
          f"{full.driver_cpu / plain.driver_cpu:.3f} | | |")
    print(f"\n- floor: writing the results and digesting the inputs take {floor:.3f} CPU s, "
          f"{floor / plain.machine_cpu:.2f}x the plain map's CPU; the plain map kept "
          f"{plain.machine_cpu / plain.wall:.2f} of {os.cpu_count()} cores busy")
    print(f"- saved when killed at 90 %: {saved:,}; resume {resume:.3f} s, "
          f"{share:.3f} of the full checkpointed map (goal <= 0.15: "
          f"{'met' if share <= 0.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
