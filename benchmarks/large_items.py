"""Large items: the driver's peak memory when mapping 400 items of 10 MiB each over 4 actors.

Each item is a ``bytes`` object of ``--item-mib`` MiB: its index as 4 little-endian bytes,
repeated (so every page is really resident in the driver). The mapped function,
``checksum(item)``, returns ``(len(item), index)``, so results are tiny and every one is checked.

Contenders, on one local Ray (4 logical CPUs) started by this script:

- ``rhmapper``: ``rm.mapper(checksum, replicas=4, env=rm.Env(..., compute={"CPU": 0.5}))
  .map(items)`` with the default ``batch_size="auto"``.
- ``actorpool``: ``ray.util.ActorPool`` over 4 actors (``num_cpus=0.5``) with the same
  ``checksum`` method, ``list(pool.map(lambda a, v: a.checksum.remote(v), items))``.

Each run of a contender is its own fresh driver process, joined to the parent's Ray through
``RAY_ADDRESS``, so its peak RSS is its own. The driver builds the items, creates and warms its
actors, takes the baseline RSS, then maps. Its peak is the larger of a psutil sample taken every
~10 ms in a thread (which cannot run while a C call holds the GIL) and
``getrusage(RUSAGE_SELF).ru_maxrss``; the growth is the peak above the baseline. "anon" is RSS
minus its shared pages (psutil's ``shared``: file-backed and shared-memory pages, which include
the pages of Ray's object store the driver has written into), sampled only by the thread.

Runs alternate between the contenders, ``--repeats`` times each; the table shows medians and
the rhmapper / actorpool ratios of the peak growth and of the peak RSS.

    python benchmarks/large_items.py                                        # 400 x 10 MiB, 3 repeats
    python benchmarks/large_items.py --items 40 --item-mib 10 --repeats 1   # quick (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

# The project's Ray runs with token auth (tests/conftest.py); Ray reads this when it is imported,
# and the children inherit it.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.util import ActorPool  # noqa: E402

import rhmapper as rm  # noqa: E402

MIB = 2**20
ACTORS = 4
ACTOR_CPUS = 0.5
CONTENDERS = ("rhmapper", "actorpool")
SAMPLE_SECONDS = 0.01
CHILD_TIMEOUT_SECONDS = 900
RESULT_PREFIX = "LARGE_ITEMS_RESULT "
MIN_RATIO_MIB = 16


def checksum(item: bytes) -> tuple[int, int]:
    """The item's length and the index stored in its first 4 bytes."""
    return len(item), int.from_bytes(item[:4], "little")


@ray.remote(num_cpus=ACTOR_CPUS)
class Checker:
    def checksum(self, item: bytes) -> tuple[int, int]:
        return checksum(item)


def make_items(count: int, item_mib: int) -> list[bytes]:
    """``count`` distinct items of ``item_mib`` MiB, every page written."""
    return [index.to_bytes(4, "little") * (item_mib * MIB // 4) for index in range(count)]


def expected_results(count: int, item_mib: int) -> list[tuple[int, int]]:
    return [(item_mib * MIB, index) for index in range(count)]


# -- memory sampling (in the child) ---------------------------------------------------------


class PeakSampler:
    """Samples this process's RSS and anonymous RSS (RSS minus shared pages) in a thread."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)
        self.peak_rss = 0
        self.peak_anon = 0
        self.samples = 0

    def _sample(self) -> None:
        info = self._process.memory_info()
        self.peak_rss = max(self.peak_rss, info.rss)
        self.peak_anon = max(self.peak_anon, info.rss - info.shared)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def rss_and_anon() -> tuple[int, int]:
    info = psutil.Process().memory_info()
    return info.rss, info.rss - info.shared


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- the contenders (in the child) ----------------------------------------------------------


def prepare_rhmapper(stack: list[Callable[[], None]]) -> Callable[[list[bytes]], list]:
    env = rm.Env(name=f"large_items_{os.getpid()}", compute={"CPU": ACTOR_CPUS})
    mapper = rm.mapper(checksum, replicas=ACTORS, env=env)
    stack.append(mapper.shutdown)
    mapper.wait_ready(timeout=120)
    mapper.map([b"warm"] * (2 * ACTORS))  # the replicas' imports and first calls
    return mapper.map


def prepare_actorpool(stack: list[Callable[[], None]]) -> Callable[[list[bytes]], list]:
    actors = [Checker.remote() for _ in range(ACTORS)]

    def kill() -> None:
        for actor in actors:
            ray.kill(actor)

    stack.append(kill)
    ray.get([actor.checksum.remote(b"warm") for actor in actors])
    pool = ActorPool(actors)

    def run(items: list[bytes]) -> list:
        return list(pool.map(lambda actor, value: actor.checksum.remote(value), items))

    return run


PREPARE = {"rhmapper": prepare_rhmapper, "actorpool": prepare_actorpool}


def measure(name: str, count: int, item_mib: int) -> dict[str, Any]:
    """Build the items, start and warm the actors, then map once under the sampler."""
    items = make_items(count, item_mib)
    cleanup: list[Callable[[], None]] = []
    try:
        run = PREPARE[name](cleanup)
        baseline_rss, baseline_anon = rss_and_anon()
        maxrss_before = maxrss_bytes()
        with PeakSampler() as sampler:
            started = time.perf_counter()
            results = run(items)
            elapsed = time.perf_counter() - started
        maxrss_after = maxrss_bytes()
    finally:
        for step in reversed(cleanup):
            step()
    if results != expected_results(count, item_mib):
        wrong = sum(a != b for a, b in zip(results, expected_results(count, item_mib)))
        raise AssertionError(f"{name}: {len(results)} results, {wrong} wrong")
    peak_rss = max(sampler.peak_rss, maxrss_after)
    return {
        "contender": name, "items": count, "item_mib": item_mib, "seconds": elapsed,
        "baseline_rss": baseline_rss, "baseline_anon": baseline_anon,
        "sampled_peak_rss": sampler.peak_rss, "sampled_peak_anon": sampler.peak_anon,
        "maxrss_before": maxrss_before, "maxrss_after": maxrss_after, "samples": sampler.samples,
        "peak_rss": peak_rss, "growth": peak_rss - baseline_rss,
        "anon_growth": sampler.peak_anon - baseline_anon,
    }


def child_main(name: str, count: int, item_mib: int) -> None:
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        report = measure(name, count, item_mib)
    finally:
        ray.shutdown()
    print(RESULT_PREFIX + json.dumps(report), flush=True)


# -- the parent -----------------------------------------------------------------------------


@dataclass
class Run:
    contender: str
    report: dict[str, Any]


def run_child(name: str, args: argparse.Namespace, gcs_address: str) -> Run:
    command = [sys.executable, os.path.abspath(__file__), "--child", name,
               "--items", str(args.items), "--item-mib", str(args.item_mib)]
    env = {**os.environ, "RAY_ADDRESS": gcs_address}
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_SECONDS, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"the {name} driver failed (exit status {done.returncode})")
    return Run(name, json.loads(lines[-1][len(RESULT_PREFIX):]))


def describe(run: Run) -> str:
    r = run.report
    return (f"  {run.contender:<10} growth {r['growth'] / MIB:8.0f} MiB  anon growth "
            f"{r['anon_growth'] / MIB:8.0f} MiB  peak RSS {r['peak_rss'] / MIB:8.0f} MiB "
            f"(sampled {r['sampled_peak_rss'] / MIB:.0f}, ru_maxrss {r['maxrss_after'] / MIB:.0f}, "
            f"baseline {r['baseline_rss'] / MIB:.0f})  {r['seconds']:6.2f} s")


def median_of(runs: list[Run], contender: str, key: str) -> float:
    return statistics.median(run.report[key] for run in runs if run.contender == contender)


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"{args.items} items x {args.item_mib} MiB ({args.items * args.item_mib} MiB of inputs), "
          f"{ACTORS} actors; median of {args.repeats}, each run in its own driver process")
    print(f"{'contender':<12}{'growth MiB':>12}{'anon growth':>13}{'peak RSS MiB':>14}"
          f"{'seconds':>9}")
    for name in CONTENDERS:
        print(f"{name:<12}{median_of(runs, name, 'growth') / MIB:>12.0f}"
              f"{median_of(runs, name, 'anon_growth') / MIB:>13.0f}"
              f"{median_of(runs, name, 'peak_rss') / MIB:>14.0f}"
              f"{median_of(runs, name, 'seconds'):>9.2f}")
    print("rhmapper / actorpool: " + ", ".join(
        f"{label} {ratio(runs, key)}" for label, key in (
            ("peak growth", "growth"), ("anon growth", "anon_growth"), ("peak RSS", "peak_rss"),
            ("seconds", "seconds"))))


def ratio(runs: list[Run], key: str) -> str:
    """rhmapper's median over actorpool's, or n/a when actorpool's is too small for a ratio."""
    denominator = median_of(runs, "actorpool", key)
    if key != "seconds" and denominator < MIN_RATIO_MIB * MIB:
        return f"n/a (actorpool {denominator / MIB:.0f} MiB)"
    return f"{median_of(runs, 'rhmapper', key) / denominator:.2f}"


def parent_main(args: argparse.Namespace) -> None:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=args.object_store_mib * MIB)
    try:
        gcs_address = ray.get_runtime_context().gcs_address
        runs = []
        for repeat in range(args.repeats):
            for name in CONTENDERS:
                runs.append(run_child(name, args, gcs_address))
                print(f"run {repeat + 1}/{args.repeats}" + describe(runs[-1]), file=sys.stderr,
                      flush=True)
        print_table(runs, args)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--item-mib", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--object-store-mib", type=int, default=4096,
                        help="the local Ray's object store (the inputs are items x item-mib "
                             "in each driver; keep the sum well under the machine's memory)")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.items, args.item_mib)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
