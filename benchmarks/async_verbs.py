"""asyncio (issue 24, part 3): what the async verbs cost against the blocking ones, whether they
block the event loop, and how many threads many concurrent async maps take.

One process, one local Ray (``num_cpus=4``), bench.py's ``rhmapper`` contender (4 replicas of
0.5 CPU) on bench.py's ``tiny`` and ``sleep`` workloads, both mappers alive throughout, one event
loop (an ``asyncio.Runner``) for every async part. Before each part (and each workload of
part 1) the script waits for a quiet host, as bench.py does (``--quiet-host``). Three
measurements:

1. **Throughput**: ``await m.amap(xs)`` against ``m.map(xs)`` (called from plain code, no loop
   running) on the same mapper, timed in alternating order (map, amap, amap, map, ...) for
   ``--rounds`` rounds per workload after one untimed run of each; every result is checked.
   Reported: the median of each, their ratio, the median and the spread (min-max) of the
   per-round ratios. Goal: amap / map <= 1.05. ``tiny`` runs 1,000,000 items here, as in
   metrics_cost.py (100,000 take ~20 ms, too short to time to 5 %).
2. **Loop lag**: a ticker task on the loop does ``await asyncio.sleep(0.001)`` in a loop and
   records each tick's lateness (actual - 1 ms) while the loop awaits one
   ``m.amap(range(--lag-items))`` of ``tiny``; beside it, the same ticker while the loop awaits
   the blocking ``m.map`` in ``asyncio.to_thread`` (the loop's default executor), and the ticker on
   an idle loop (0.1 s). ``--lag-rounds`` rounds of each, alternating, the ticks pooled.
   Reported: p50, p99, max lag and tick count of each; the ratio amap / to_thread of the p99.
   Goal: p99 <= 5 ms during the amap.
3. **Many maps**: ``--maps`` concurrent ``amap`` s of ``--map-items`` items each, and ``--calls``
   concurrent ``acall`` s, each batch run with ``asyncio.gather``, against the same work as blocking
   ``m.map`` / ``m.call`` in a ``ThreadPoolExecutor(max_workers=--threads)`` (a new one per run,
   awaited from the same loop with ``run_in_executor``); every value is checked, ``--rounds``
   alternating rounds, medians. Part 2's ticker runs on the loop during each run (its lag is
   reported too) and samples ``threading.enumerate()`` at every tick: the threads counted
   "extra" are those that were not alive before the run, plus, for the async verbs, the
   ``rhmapper-async`` driver thread (started by the first async map, so alive before).
   Goal: correct values, at most one extra thread for the async verbs.

Usage::

    python benchmarks/async_verbs.py                          # the defaults (~1 min)
    python benchmarks/async_verbs.py --tiny-items 100000 --rounds 2 --lag-rounds 3 --maps 10 \\
        --calls 100                                           # a quick pass

The report (a markdown table) and a JSON line (prefixed ``ASYNC_VERBS_RESULT``) go to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from typing import Any, Awaitable, Callable

import bench  # sets RAY_AUTH_MODE and ships the workloads by value
import ray
from bench_contenders import RAY_CPUS, Rhmapper
from bench_workloads import build_workloads

DRIVER_THREAD = "rhmapper-async"
TICK_S = 0.001


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spread(values: list) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def percentile(values: list, q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


# --------------------------------------------------------------------------------------
# The ticker: loop lag and thread samples
# --------------------------------------------------------------------------------------


class Ticker:
    """A task on the running loop that sleeps 1 ms at a time and records how late each tick
    was; with ``threads=True`` it also samples ``threading.enumerate()`` at every tick."""

    def __init__(self, threads: bool = False) -> None:
        self.lags: list[float] = []
        self.samples: list[list[threading.Thread]] = []
        self._threads = threads
        self._stop = False
        self._task: asyncio.Task | None = None

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True

    async def stopped(self) -> Ticker:
        self._stop = True
        assert self._task is not None
        await self._task
        return self

    async def _run(self) -> None:
        while not self._stop:
            if self._threads:
                self.samples.append(threading.enumerate())
            started = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.lags.append(time.perf_counter() - started - TICK_S)


async def ticked(work: Callable[[], Awaitable], threads: bool = False) -> tuple[Any, float, Ticker]:
    """Await ``work()`` with a ticker on the loop: (its value, its wall seconds, the ticker)."""
    ticker = Ticker(threads)
    with ticker:
        await asyncio.sleep(0)  # the ticker's first sleep is under way
        started = time.perf_counter()
        value = await work()
        elapsed = time.perf_counter() - started
    await ticker.stopped()
    return value, elapsed, ticker


def extra_threads(before: set, ticker: Ticker, driver: bool) -> tuple[int, dict]:
    """Threads alive during the run that were not before it (and, with ``driver``, the async
    driver's thread): the most at one sample, and how many distinct were seen per name (digits
    as ``N``)."""
    most, seen = 0, {}
    for sample in ticker.samples:
        extra = [t for t in sample
                 if t.ident not in before or (driver and t.name == DRIVER_THREAD)]
        most = max(most, len(extra))
        seen.update((t.ident, t.name) for t in extra)
    return most, dict(collections.Counter(re.sub(r"\d+", "N", name) for name in seen.values()))


def lag_stats(lags: list) -> dict:
    return {"p50_ms": percentile(lags, 50) * 1e3, "p99_ms": percentile(lags, 99) * 1e3,
            "max_ms": max(lags) * 1e3, "ticks": len(lags)}


# --------------------------------------------------------------------------------------
# 1. Throughput
# --------------------------------------------------------------------------------------


def throughput(runner: asyncio.Runner, contender: Rhmapper, rounds: int) -> dict:
    """amap against map on one mapper, alternating rounds; every result checked."""
    m, items = contender.m, contender.wl.items

    def timed_map() -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        values = m.map(items, progress=False)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        contender.check(values)
        return elapsed, cpu

    async def amap() -> tuple[float, float, list]:
        started, cpu = time.perf_counter(), time.process_time()
        values = await m.amap(items, progress=False)
        return time.perf_counter() - started, time.process_time() - cpu, values

    def timed_amap() -> tuple[float, float]:
        elapsed, cpu, values = runner.run(amap())
        contender.check(values)
        return elapsed, cpu

    contenders = {"map": timed_map, "amap": timed_amap}
    for run in contenders.values():  # a first full run of each: batch sizes measured
        run()
    times: dict[str, list] = {"map": [], "amap": []}
    for round_ in range(rounds):
        order = ("map", "amap") if round_ % 2 == 0 else ("amap", "map")
        for name in order:
            times[name].append(contenders[name]())
    wall = {name: [run[0] for run in runs] for name, runs in times.items()}
    cpu = {name: statistics.median(run[1] for run in runs) for name, runs in times.items()}
    ratios = [a / b for a, b in zip(wall["amap"], wall["map"])]
    row = {"workload": contender.wl.name, "items": len(items),
           "map_s": statistics.median(wall["map"]), "amap_s": statistics.median(wall["amap"]),
           "per_round_ratios": ratios, "median_per_round_ratio": statistics.median(ratios),
           "driver_cpu_map_s": cpu["map"], "driver_cpu_amap_s": cpu["amap"],
           "map_runs_s": wall["map"], "amap_runs_s": wall["amap"]}
    row["ratio"] = row["amap_s"] / row["map_s"]
    log(f"{row['workload']}: map {row['map_s']:.4f} s, amap {row['amap_s']:.4f} s, "
        f"amap / map {row['ratio']:.3f} (per round {spread(ratios)}), driver CPU amap / map "
        f"{cpu['amap'] / cpu['map']:.3f}")
    return row


# --------------------------------------------------------------------------------------
# 2. Loop lag
# --------------------------------------------------------------------------------------


def loop_lag(runner: asyncio.Runner, contender: Rhmapper, items: int, rounds: int) -> dict:
    """The ticker's lag during an amap, during a map in asyncio.to_thread, and on an idle loop."""
    m = contender.m
    xs = list(range(items))
    expected = [contender.wl.fn(x) for x in xs]

    async def during_amap():
        return await m.amap(xs, progress=False)

    async def during_to_thread():
        return await asyncio.to_thread(m.map, xs, progress=False)

    async def idle():
        await asyncio.sleep(0.1)
        return expected

    kinds = {"amap": during_amap, "to_thread": during_to_thread, "idle": idle}
    for work in (during_amap, during_to_thread):  # warm: the default executor's thread exists
        assert runner.run(work()) == expected
    lags: dict[str, list] = {name: [] for name in kinds}
    per_round_p99: dict[str, list] = {name: [] for name in kinds}
    walls: dict[str, list] = {name: [] for name in kinds}
    for round_ in range(rounds):
        names = list(kinds) if round_ % 2 == 0 else list(reversed(kinds))
        for name in names:
            values, elapsed, ticker = runner.run(ticked(kinds[name]))
            if values != expected:
                raise AssertionError(f"loop lag, {name}: wrong results")
            lags[name] += ticker.lags
            per_round_p99[name].append(percentile(ticker.lags, 99) * 1e3)
            walls[name].append(elapsed)
    result = {"items": items, "rounds": rounds, "switch_interval_ms": sys.getswitchinterval() * 1e3}
    for name in kinds:
        result[name] = {**lag_stats(lags[name]), "per_round_p99_ms": per_round_p99[name],
                        "median_wall_s": statistics.median(walls[name])}
        log(f"lag {name}: p50 {result[name]['p50_ms']:.3f} ms, p99 {result[name]['p99_ms']:.3f} "
            f"ms, max {result[name]['max_ms']:.3f} ms, {result[name]['ticks']} ticks, per-round "
            f"p99 {min(per_round_p99[name]):.2f}-{max(per_round_p99[name]):.2f} ms, run "
            f"{result[name]['median_wall_s'] * 1e3:.1f} ms")
    return result


# --------------------------------------------------------------------------------------
# 3. Many maps
# --------------------------------------------------------------------------------------


def many(runner: asyncio.Runner, contender: Rhmapper, maps: int, map_items: int, calls: int,
         threads: int, rounds: int) -> list:
    """``maps`` concurrent amaps and ``calls`` concurrent acalls against the blocking verbs in a
    thread pool; values checked, extra threads sampled."""
    m, fn = contender.m, contender.wl.fn
    chunks = [list(range(i * map_items, (i + 1) * map_items)) for i in range(maps)]
    expected_maps = [[fn(x) for x in chunk] for chunk in chunks]
    call_xs = list(range(calls))
    expected_calls = [fn(x) for x in call_xs]

    async def amaps():
        return await asyncio.gather(*(m.amap(chunk, progress=False) for chunk in chunks))

    async def acalls():
        return await asyncio.gather(*(m.acall(x) for x in call_xs))

    async def in_threads(submit: Callable, args: list):
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            return await asyncio.gather(*(loop.run_in_executor(pool, submit, arg)
                                          for arg in args))

    async def map_threads():
        return await in_threads(lambda chunk: m.map(chunk, progress=False), chunks)

    async def call_threads():
        return await in_threads(m.call, call_xs)

    cases = [
        (f"{maps} x amap({map_items})", expected_maps, amaps, map_threads),
        (f"{calls} x acall", expected_calls, acalls, call_threads),
    ]
    rows = []
    for label, expected, async_work, thread_work in cases:
        contenders = {"async": async_work, "threads": thread_work}
        for work in contenders.values():  # warm
            assert runner.run(work()) == expected, f"{label}: wrong values (warm-up)"
        walls: dict[str, list] = {name: [] for name in contenders}
        most: dict[str, list] = {name: [] for name in contenders}
        growth: dict[str, list] = {name: [] for name in contenders}
        lags: dict[str, list] = {name: [] for name in contenders}
        names_seen: dict[str, collections.Counter] = {name: collections.Counter()
                                                      for name in contenders}
        for round_ in range(rounds):
            order = ("async", "threads") if round_ % 2 == 0 else ("threads", "async")
            for name in order:
                before_threads = threading.enumerate()
                before = {t.ident for t in before_threads}
                values, elapsed, ticker = runner.run(ticked(contenders[name], threads=True))
                if values != expected:
                    raise AssertionError(f"{label}, {name}: wrong values")
                walls[name].append(elapsed)
                lags[name] += ticker.lags
                peak, seen = extra_threads(before, ticker, driver=name == "async")
                most[name].append(peak)
                names_seen[name] |= collections.Counter(seen)  # the most of one run
                growth[name].append(max(len(s) for s in ticker.samples) - len(before_threads))
        row = {"case": label, "rounds": rounds, "threads_baseline_workers": threads}
        for name in contenders:
            row[name] = {"wall_s": statistics.median(walls[name]), "runs_s": walls[name],
                         "extra_threads_max": max(most[name]),
                         "active_count_growth_max": max(growth[name]),
                         "extra_thread_names": dict(names_seen[name]),
                         "loop_lag": lag_stats(lags[name])}
        ratios = [a / b for a, b in zip(walls["async"], walls["threads"])]
        row["ratio"] = row["async"]["wall_s"] / row["threads"]["wall_s"]
        row["per_round_ratios"] = ratios
        rows.append(row)
        log(f"{label}: async {row['async']['wall_s']:.3f} s ({row['async']['extra_threads_max']} "
            f"extra threads: {row['async']['extra_thread_names']}), threads "
            f"{row['threads']['wall_s']:.3f} s ({row['threads']['extra_threads_max']} extra), "
            f"async / threads {row['ratio']:.3f} (per round {spread(ratios)})")
    return rows


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def report(args, rows: list, lag: dict, many_rows: list, loads: tuple) -> None:
    print(f"\nasync verbs, {args.rounds} alternating rounds (loop lag: {args.lag_rounds}), "
          f"1-minute load average {loads[0]:.2f} before, {loads[1]:.2f} after\n")
    print("| measure | async | blocking | async / blocking | per-round ratios | goal | met |\n"
          "|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        met = row["ratio"] <= 1.05
        print(f"| {row['workload']} ({row['items']:,} items): amap / map wall | "
              f"{row['amap_s']:.4f} s | {row['map_s']:.4f} s | {row['ratio']:.3f} | "
              f"{spread(row['per_round_ratios'])} (median {row['median_per_round_ratio']:.3f}) | "
              f"<= 1.05 | {'yes' if met else 'NO'} |")
    if lag:
        amap, thread, idle = lag["amap"], lag["to_thread"], lag["idle"]
        for stat in ("p50_ms", "p99_ms", "max_ms"):
            goal = "<= 5 ms" if stat == "p99_ms" else ""
            met = ("yes" if amap[stat] <= 5 else "NO") if goal else ""
            rounds = (f"amap p99 {min(amap['per_round_p99_ms']):.2f}-"
                      f"{max(amap['per_round_p99_ms']):.2f} ms" if goal else "")
            print(f"| loop lag {stat[:-3]}, amap({lag['items']:,}) / to_thread(map) (idle loop "
                  f"{idle[stat]:.3f} ms) | {amap[stat]:.3f} ms | {thread[stat]:.3f} ms | "
                  f"{amap[stat] / thread[stat]:.2f} | {rounds} | {goal} | {met} |")
        print(f"| loop lag ticks, amap / to_thread (idle) | {amap['ticks']} | {thread['ticks']} "
              f"| | ({idle['ticks']}) | | |")
    for row in many_rows:
        a, t = row["async"], row["threads"]
        print(f"| {row['case']}: wall, values checked | {a['wall_s']:.3f} s | {t['wall_s']:.3f} s "
              f"| {row['ratio']:.3f} | {spread(row['per_round_ratios'])} | | |")
        print(f"| {row['case']}: extra threads (active_count growth) | "
              f"{a['extra_threads_max']} ({a['active_count_growth_max']:+d}) | "
              f"{t['extra_threads_max']} ({t['active_count_growth_max']:+d}) | | | <= 1 | "
              f"{'yes' if a['extra_threads_max'] <= 1 else 'NO'} |")
        a_lag, t_lag = a["loop_lag"], t["loop_lag"]
        print(f"| {row['case']}: loop lag p99 (max) | {a_lag['p99_ms']:.2f} ms "
              f"({a_lag['max_ms']:.1f}) | {t_lag['p99_ms']:.2f} ms ({t_lag['max_ms']:.1f}) | "
              f"{a_lag['p99_ms'] / t_lag['p99_ms']:.2f} | | | |")
    for row in many_rows:
        for name in ("async", "threads"):
            names = row[name]["extra_thread_names"].items()
            print(f"\nextra threads seen, {row['case']}, {name}: "
                  + (", ".join(f"{n} x {thread}" for thread, n in names) or "-"), end="")
    print()
    print(f"\nblocking baselines: m.map from plain code (no loop); the loop lag beside "
          f"asyncio.to_thread(m.map); ThreadPoolExecutor(max_workers={args.threads}). "
          f"sys.getswitchinterval() = {sys.getswitchinterval() * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-items", type=int, default=1_000_000,
                        help="items of the tiny workload in the throughput part")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds of the throughput and many-maps parts")
    parser.add_argument("--lag-items", type=int, default=100_000,
                        help="items of the amap (and map) during which the loop lag is measured")
    parser.add_argument("--lag-rounds", type=int, default=20,
                        help="rounds of the loop-lag part; their ticks are pooled")
    parser.add_argument("--maps", type=int, default=100, help="concurrent amaps")
    parser.add_argument("--map-items", type=int, default=100, help="items per concurrent amap")
    parser.add_argument("--calls", type=int, default=1000, help="concurrent acalls")
    parser.add_argument("--threads", type=int, default=100,
                        help="workers of the blocking baseline's ThreadPoolExecutor")
    parser.add_argument("--quiet-host", type=float, default=0.25,
                        help="before each part, wait until at most this share of the host's "
                             "cores is busy, as bench.py does (1 turns the wait off)")
    parser.add_argument("--quiet-timeout", type=float, default=60.0,
                        help="seconds to wait for a quiet host before going on with a warning")
    parser.add_argument("--only", default="throughput,lag,many",
                        help="parts to run, of throughput,lag,many")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    workloads = build_workloads(bench.parse_args(["--tiny-items", str(args.tiny_items),
                                                  "--only", "tiny,sleep"]))
    loads = [os.getloadavg()[0]]
    if loads[0] > 1:
        log(f"(warning: 1-minute load average {loads[0]:.2f} at the start)")
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    rows: list = []
    lag: dict = {}
    many_rows: list = []
    contenders = {name: Rhmapper(wl, None) for name, wl in workloads.items()}

    def settle() -> None:
        bench.wait_for_quiet_host(args.quiet_host, args.quiet_timeout)

    try:
        for contender in contenders.values():  # both alive throughout
            contender.start()
            contender.warm()
        with asyncio.Runner() as runner:
            if "throughput" in parts:
                for contender in contenders.values():
                    settle()
                    rows.append(throughput(runner, contender, args.rounds))
            if "lag" in parts:
                settle()
                lag = loop_lag(runner, contenders["tiny"], args.lag_items, args.lag_rounds)
            if "many" in parts:
                settle()
                many_rows = many(runner, contenders["tiny"], args.maps, args.map_items,
                                 args.calls, args.threads, args.rounds)
    finally:
        for contender in contenders.values():
            contender.stop()
        ray.shutdown()
    loads.append(os.getloadavg()[0])
    report(args, rows, lag, many_rows, tuple(loads))
    print("ASYNC_VERBS_RESULT " + json.dumps({
        "config": {**vars(args), "ray_cpus": RAY_CPUS, "loadavg_1min": loads},
        "throughput": rows, "loop_lag": lag, "many": many_rows}), flush=True)


if __name__ == "__main__":
    main()
