#!/usr/bin/env python
"""Side-by-side benchmark: rhmapper against the Ray-native ways to map.

Every contender runs every workload in ONE process on ONE local Ray instance
(``ray.init(address="local", num_cpus=4)``), on 4 actors that each ask for
``num_cpus=0.5``. Each (workload, contender) pair is run ``--repeats`` times and
the median wall-clock time is reported, together with items/s and the ratio to
the hand-written optimum measured in the same run. Every result list is checked
against the expected list; a wrong result is an error for that contender.

    python benchmarks/bench.py                       # everything, full size
    python benchmarks/bench.py --tiny-items 10000 --repeats 1
    python benchmarks/bench.py --only sleep,skew --contenders optimum,rhmapper
    python benchmarks/bench.py --only vector   # batched model inference (needs ".[bench]")
    python benchmarks/bench.py --json results.json

The markdown report goes to stdout; progress goes to stderr. See
docs/benchmarks.md for what each workload and contender is and what is timed.

This file is the command line and the harness (timeouts, settling between contenders,
JSON); the workloads are in bench_workloads.py, the contenders in bench_contenders.py,
the report in bench_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

# A local cluster started by ray.init() turns token authentication on by default in
# recent Ray; set the mode deliberately (see DESIGN.md, "Test set-up") unless the
# caller chose one.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

import bench_contenders  # noqa: E402
import bench_workloads  # noqa: E402
from bench_contenders import (  # noqa: E402
    ACTOR_CPUS, ALL_CONTENDERS, CONTENDER_CLASSES, NUM_ACTORS, RAY_CPUS, Contender,
)
from bench_report import report  # noqa: E402
from bench_workloads import ALL_WORKLOADS, Workload, build_workloads  # noqa: E402

# Ship these modules' functions and classes to the workers by value (as when they lived in
# __main__), so that no worker has to import them from a path that may lack benchmarks/.
cloudpickle.register_pickle_by_value(bench_workloads)
cloudpickle.register_pickle_by_value(bench_contenders)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------


class RunTimeout(Exception):
    pass


def call_with_timeout(fn: Callable[[], Any], timeout: float):
    """Run fn() in a daemon thread; return (value, seconds) measured inside the thread."""
    box: Dict[str, Any] = {}

    def target():
        try:
            t0 = time.perf_counter()
            box["value"] = fn()
            box["seconds"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="bench-run")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise RunTimeout(f"no result after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"], box["seconds"]


def wait_for_cpus(timeout: float = 30.0) -> None:
    """Wait until every CPU of the cluster is free again (killed actors release theirs)."""
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= total - 1e-6:
            return
        time.sleep(0.1)
    log(f"  (warning: CPUs still in use after {timeout:.0f} s: "
        f"{ray.available_resources().get('CPU', 0)}/{total} free)")


def _host_busy_fraction(window: float) -> Optional[float]:
    """Share of all host cores busy over ``window`` seconds (/proc/stat), None off Linux."""
    def sample():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except OSError:
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1e-9)


def wait_for_quiet_host(max_busy: float, timeout: float) -> None:
    """Wait until the host is nearly idle: the previous contender's aftermath (Ray still
    processing 100,000 finished calls, worker processes exiting) must not slow the next one."""
    if max_busy >= 1.0:
        return
    deadline = time.time() + timeout
    busy = _host_busy_fraction(0.5)
    while busy is not None and busy > max_busy and time.time() < deadline:
        busy = _host_busy_fraction(0.5)
    if busy is not None and busy > max_busy:
        log(f"  (warning: host still {busy:.0%} busy after {timeout:.0f} s of waiting)")


def settle(args) -> None:
    """Between contenders: every Ray CPU free again, then a quiet host."""
    wait_for_cpus()
    wait_for_quiet_host(args.quiet_host, args.quiet_timeout)


def _new_record(wl: Workload, cname: str) -> Dict[str, Any]:
    return {"workload": wl.name, "contender": cname, "items": len(wl.items),
            "times": [], "error": None}


def _fail(rec: Dict[str, Any], e: BaseException, args) -> None:
    if isinstance(e, KeyboardInterrupt):
        raise e
    rec["error"] = f"{type(e).__name__}: {e}"
    rec["traceback"] = traceback.format_exc()
    log(f"  {rec['workload']:6s} {rec['contender']:12s} FAILED: {rec['error']}")
    if args.verbose:
        log(rec["traceback"])


def _safe_stop(c: Optional[Contender]) -> None:
    if c is None:
        return
    try:
        c.stop()
    except Exception as e:  # noqa: BLE001
        log(f"  ({c.name} stop failed: {type(e).__name__}: {e})")


def _finish(rec: Dict[str, Any]) -> Dict[str, Any]:
    if rec["times"]:
        rec["median"] = statistics.median(rec["times"])
        rec["items_per_s"] = rec["items"] / rec["median"] if rec["median"] > 0 else float("inf")
    return rec


def run_pair(wl: Workload, cname: str, args) -> Dict[str, Any]:
    """Pool created once, outside the timed region; args.repeats timed maps on it.

    Never raises: a failure is recorded on the result and the run goes on.
    """
    rec = _new_record(wl, cname)
    c = None
    try:
        c = CONTENDER_CLASSES[cname](wl, args)
        call_with_timeout(c.start, args.timeout)
        call_with_timeout(c.warm, args.timeout)
        for r in range(args.repeats):
            res, secs = call_with_timeout(lambda: c.run(wl.items), args.timeout)
            c.check(res)
            rec["times"].append(secs)
            log(f"  {wl.name:6s} {cname:12s} run {r + 1}/{args.repeats}: {secs:.3f} s")
    except BaseException as e:  # noqa: BLE001 - one contender's failure must not end the run
        _fail(rec, e, args)
    finally:
        _safe_stop(c)
        settle(args)
    return _finish(rec)


def run_constructing(wl: Workload, cnames: List[str], args) -> List[Dict[str, Any]]:
    """For workloads whose construction is timed: each timed run creates the pool.

    Every contender first does one untimed warm-up cycle (start, a small map, stop),
    which exports its classes to the cluster. Then the repeats are interleaved
    (repeat 1 of every contender, then repeat 2, ...), so that drift in the cost of
    starting worker processes does not favour whoever runs first. A contender that
    fails is dropped from the later rounds.
    """
    recs = {n: _new_record(wl, n) for n in cnames}
    alive = list(cnames)

    def cycle(cname: str, n: Optional[int]):
        c = CONTENDER_CLASSES[cname](wl, args)
        try:
            if n is None:
                res, secs = call_with_timeout(lambda: (c.start(), c.run(wl.items))[1], args.timeout)
                c.check(res)
            else:
                res, secs = call_with_timeout(lambda: (c.start(), c.run(wl.items[:n]))[1],
                                              args.timeout)
                c.check(res, n)
            return secs
        finally:
            _safe_stop(c)
            settle(args)

    for cname in list(alive):
        log(f"{wl.name} / {cname} (warm-up cycle)")
        try:
            cycle(cname, 8)
        except BaseException as e:  # noqa: BLE001
            _fail(recs[cname], e, args)
            alive.remove(cname)
    for r in range(args.repeats):
        for cname in list(alive):
            try:
                secs = cycle(cname, None)
            except BaseException as e:  # noqa: BLE001
                _fail(recs[cname], e, args)
                alive.remove(cname)
                continue
            recs[cname]["times"].append(secs)
            log(f"  {wl.name:6s} {cname:12s} run {r + 1}/{args.repeats}: {secs:.3f} s")
    return [_finish(recs[n]) for n in cnames]


def parse_list(value: str, allowed: List[str], what: str) -> List[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return [n for n in allowed if n in names]  # canonical order


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny-items", type=int, default=100_000,
                   help="items in the tiny workload, for every contender (default 100000)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (workload, contender); "
                   "the median is reported (default 3)")
    p.add_argument("--only", default=",".join(ALL_WORKLOADS),
                   type=lambda v: parse_list(v, ALL_WORKLOADS, "workload"),
                   help=f"comma-separated workloads (default: {','.join(ALL_WORKLOADS)})")
    p.add_argument("--contenders", default=",".join(ALL_CONTENDERS),
                   type=lambda v: parse_list(v, ALL_CONTENDERS, "contender"),
                   help=f"comma-separated contenders (default: {','.join(ALL_CONTENDERS)})")
    p.add_argument("--json", metavar="PATH", help="write the raw results as JSON to PATH")
    p.add_argument("--markdown", metavar="PATH",
                   help="also write the markdown report to PATH (stdout can carry Ray's own "
                   "warnings, e.g. about pending actor tasks)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed for one timed run (or start/warm-up) before the "
                   "contender is reported as failed (default 600)")
    p.add_argument("--chunks-per-slot", type=int, default=2,
                   help="optimum: chunks per actor slot (actors x concurrency) (default 2)")
    p.add_argument("--optimum-split", choices=["strided", "contiguous"], default="strided",
                   help="optimum: chunk i is xs[i::k] (strided, default) or the i-th "
                   "contiguous slice; chunk i goes to actor i %% 4")
    p.add_argument("--model-items", type=int, default=2000, help="items in the model workload")
    p.add_argument("--vector-items", type=int, default=20_000,
                   help="items (512-float32 vectors) in the vector workload (default 20000)")
    p.add_argument("--model-size", type=int, default=0,
                   help="model weights-table size (default: calibrated to ~0.5 s)")
    p.add_argument("--model-reads", type=int, default=0,
                   help="table reads per predict() (default: calibrated to ~1 ms)")
    p.add_argument("--cpu-iters", type=int, default=0,
                   help="loop iterations per cpu item (default: calibrated to ~3 ms)")
    p.add_argument("--quiet-host", type=float, default=0.25,
                   help="before each contender, wait until at most this share of the host's "
                        "cores is busy (1 turns the wait off)")
    p.add_argument("--quiet-timeout", type=float, default=60.0,
                   help="seconds to wait for a quiet host before going on with a warning")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tiny_items < 1 or args.vector_items < 1:
        p.error("--repeats, --tiny-items and --vector-items must be >= 1")
    return args


def json_payload(workloads: Dict[str, Workload], results: List[Dict[str, Any]], args,
                 loads: Dict[str, tuple], t_start: float) -> Dict[str, Any]:
    """What --json writes: the set-up, the calibrated workloads, load averages, results."""
    return {
        "config": {
            "ray_version": ray.__version__, "python": platform.python_version(),
            "host_cores": os.cpu_count(), "ray_num_cpus": RAY_CPUS,
            "num_actors": NUM_ACTORS, "actor_num_cpus": ACTOR_CPUS,
            "repeats": args.repeats, "tiny_items": args.tiny_items,
            "vector_items": args.vector_items,
            "optimum_split": args.optimum_split, "chunks_per_slot": args.chunks_per_slot,
            "contenders": args.contenders, "workloads": list(workloads),
            "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        },
        "workloads": {n: {"description": w.description, "items": len(w.items),
                          "concurrency": w.concurrency, "construct_timed": w.construct_timed,
                          **w.info} for n, w in workloads.items()},
        "load_average_1min": {n: {"before": b, "after": a} for n, (b, a) in loads.items()},
        "results": results,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    log("calibrating workloads on the driver …")
    workloads = build_workloads(args)
    for wl in workloads.values():
        log(f"  {wl.name}: {wl.description}")

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False,
             log_to_driver=False)
    wait_for_quiet_host(args.quiet_host, args.quiet_timeout)
    results: List[Dict[str, Any]] = []
    loads: Dict[str, tuple] = {}
    t_start = time.time()
    load0 = os.getloadavg()[0]
    if load0 > 1.0:
        log(f"warning: 1-minute load average is {load0:.1f} before the run; other work on "
            f"this machine will distort the timings")
    try:
        for wl in workloads.values():
            load_before = os.getloadavg()[0]
            cnames = [c for c in args.contenders if CONTENDER_CLASSES[c].supports(wl)]
            skipped = [c for c in args.contenders if c not in cnames]
            if skipped:
                log(f"{wl.name}: not for this workload: {', '.join(skipped)}")
            if wl.construct_timed:
                results.extend(run_constructing(wl, cnames, args))
            else:
                for cname in cnames:
                    log(f"{wl.name} / {cname}")
                    results.append(run_pair(wl, cname, args))
            loads[wl.name] = (load_before, os.getloadavg()[0])
        text = report(workloads, results, args, loads)
    finally:
        ray.shutdown()
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
        log(f"wrote {args.markdown}")
    log(f"total wall time {time.time() - t_start:.0f} s")

    if args.json:
        payload = json_payload(workloads, results, args, loads, t_start)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
