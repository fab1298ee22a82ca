"""Observability (issue 23, part 4): what rhmapper's Ray metrics cost on the side-by-side
benchmark's ``tiny``, ``sleep`` and ``cpu`` workloads (goal: within 2 % of ``metrics=False``).

The two contenders are bench.py's ``rhmapper`` and ``rhmapper_no_metrics``, both alive at once
(8 replicas of 0.5 CPU on 4), timed in alternating order (on, off, off, on, ...) for
``--rounds`` rounds per workload, so that drifts of this shared 2-core machine fall on both
alike. Reported per workload: the median of each, their ratio, and the median of the per-round
ratios. The workloads are bench.py's, with the same options (``--tiny-items`` defaults to
1,000,000 here: 100,000 tiny items take 20 ms, too short to time to 2 %).

Usage::

    python benchmarks/metrics_cost.py                      # tiny, sleep, cpu; 15 rounds
    python benchmarks/metrics_cost.py --only tiny --rounds 31
"""

from __future__ import annotations

import statistics
import sys
import time

import bench  # noqa: F401  (sets RAY_AUTH_MODE and ships the workloads by value)
import ray
from bench_contenders import RAY_CPUS, Rhmapper, RhmapperNoMetrics
from bench_workloads import build_workloads


def timed(contender, items: list) -> tuple[float, float]:
    """Wall seconds of one run, and CPU seconds of this (the driver's) process in it: the
    metrics' work is all the driver's."""
    started, cpu = time.perf_counter(), time.process_time()
    contender.check(contender.run(items))
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    argv = sys.argv[1:]
    rounds = 15
    if "--rounds" in argv:
        at = argv.index("--rounds")
        rounds = int(argv[at + 1])
        del argv[at:at + 2]
    if not any(arg.startswith("--tiny-items") for arg in argv):
        argv += ["--tiny-items", "1000000"]
    if "--only" not in argv:
        argv += ["--only", "tiny,sleep,cpu"]
    args = bench.parse_args(argv)
    workloads = build_workloads(args)
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for workload in workloads.values():
            on, off = Rhmapper(workload, args), RhmapperNoMetrics(workload, args)
            for contender in (on, off):
                contender.start()
                contender.warm()
                timed(contender, workload.items)  # a first full run: batch sizes measured
            times: dict[str, list] = {"on": [], "off": []}
            for round_ in range(rounds):
                order = (("on", on), ("off", off)) if round_ % 2 == 0 else (("off", off),
                                                                          ("on", on))
                for name, contender in order:
                    times[name].append(timed(contender, workload.items))
            for contender in (on, off):
                contender.stop()
            wall = {name: [run[0] for run in runs] for name, runs in times.items()}
            cpu = {name: statistics.median(run[1] for run in runs)
                   for name, runs in times.items()}
            ratios = [a / b for a, b in zip(wall["on"], wall["off"])]
            rows.append((workload.name, statistics.median(wall["on"]),
                         statistics.median(wall["off"]), statistics.median(ratios),
                         cpu["on"] / cpu["off"]))
            print(f"{workload.name}: on {rows[-1][1]:.4f} s, off {rows[-1][2]:.4f} s, "
                  f"median per-round ratio {rows[-1][3]:.3f}, driver CPU on / off "
                  f"{rows[-1][4]:.3f}", flush=True)
    finally:
        ray.shutdown()
    print(f"\nmedians of {rounds} alternating rounds, {args.tiny_items:,} tiny items\n")
    print("| workload | metrics on (s) | metrics off (s) | on / off | median per-round on / off "
          "| driver CPU on / off | goal | met |\n|---|---:|---:|---:|---:|---:|---:|---|")
    for name, on_s, off_s, paired, cpu_ratio in rows:
        ratio = on_s / off_s
        print(f"| {name} | {on_s:.4f} | {off_s:.4f} | {ratio:.3f} | {paired:.3f} | "
              f"{cpu_ratio:.3f} | <= 1.02 | {'yes' if ratio <= 1.02 else 'NO'} |")


if __name__ == "__main__":
    main()
