"""The workloads of benchmarks/bench.py: what is mapped, over which items, with which result.

A workload is one builder function registered with ``@workload("name")``: it gets the
parsed command line and returns a `Workload` (the items, the function or model, the
expected results). The registry's order is the order of the report and of ``--only``.

bench.py registers this module with cloudpickle as pickle-by-value, so Ray ships the
functions and the Model class to the actors by value: benchmarks/ need not be importable
where they run.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

# --------------------------------------------------------------------------------------
# Workload functions
# --------------------------------------------------------------------------------------


def tiny_fn(x):
    return x + 1


def sleep_fn(x):
    time.sleep(0.02)
    return x * 2


def sleep_expected(x):
    return x * 2


def skew_fn(x):
    time.sleep(0.1 if x % 20 == 0 else 0.005)
    return x * 3


def skew_expected(x):
    return x * 3


def spin(n, seed):
    """Pure-Python busy loop: n iterations of integer arithmetic."""
    acc = seed
    for i in range(n):
        acc = (acc * 31 + i) % 1000003
    return acc


def make_cpu_fn(iters):
    def cpu_fn(x):
        return spin(iters, x)

    return cpu_fn


class Model:
    """A model-like stateful class: a costly constructor and a cheap-ish predict().

    ``__init__`` folds ``size`` pseudo-random numbers into a 64 Ki-entry "weights"
    table in pure Python (~0.5 s by default, calibrated on the driver); ``predict(x)``
    reads ``reads`` entries of it (~1 ms by default, calibrated). The table is small
    (64 Ki ints), so the cost is CPU time, not memory traffic or pickling.
    """

    TABLE = 1 << 16

    def __init__(self, size, reads):
        mask = self.TABLE - 1
        table = [0] * self.TABLE
        for i in range(size):
            table[i & mask] += (i * 2654435761) % 1000
        self.weights = table
        self.reads = reads

    def predict(self, x):
        w = self.weights
        mask = len(w) - 1
        acc = 0
        for k in range(self.reads):
            acc += w[(x * 7919 + k * 104729) & mask]
        return acc


# --------------------------------------------------------------------------------------
# Calibration (on the driver, before any actor exists)
# --------------------------------------------------------------------------------------


def calibrate(run: Callable[[int], Any], target_s: float, start: int = 1000) -> int:
    """Smallest-effort search for n such that run(n) takes about target_s seconds."""
    n = start
    while True:
        t0 = time.perf_counter()
        run(n)
        dt = time.perf_counter() - t0
        if dt > 0.02 or n > 10**9:
            break
        n *= 4
    est = int(n * target_s / dt)
    # refine with the fastest of a few runs (the least disturbed by other work)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run(est)
        times.append(time.perf_counter() - t0)
    return max(1, int(est * target_s / min(times)))


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    items: List[int]
    fn: Optional[Callable]  # the function mapped (None for the model workload)
    expected: List[Any]
    concurrency: int  # calls in flight per actor (actor max_concurrency / rhmapper concurrency)
    description: str
    model_args: Optional[tuple] = None  # (size, reads) for the model workload
    construct_timed: bool = False  # actors are created inside the timed region
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_model(self):
        return self.model_args is not None


WORKLOAD_BUILDERS: Dict[str, Callable[[Any], Workload]] = {}
"""Workload name -> builder(args) -> Workload, in report order."""


def workload(name: str):
    """Register the decorated builder(args) as the workload ``name``."""
    def register(builder: Callable[[Any], Workload]) -> Callable[[Any], Workload]:
        WORKLOAD_BUILDERS[name] = builder
        return builder

    return register


def _timed_expected(fn: Callable[[int], Any], xs: List[int]):
    """fn over xs on the driver: the expected results and the seconds per item."""
    t0 = time.perf_counter()
    expected = [fn(x) for x in xs]
    return expected, (time.perf_counter() - t0) / len(xs)


def _plain(name: str, n: int, fn: Callable, expected: Callable, concurrency: int,
           description: str) -> Workload:
    """A workload that maps fn over range(n), with expected(x) as each result."""
    xs = list(range(n))
    return Workload(name, xs, fn, [expected(x) for x in xs], concurrency, description)


@workload("tiny")
def build_tiny(args) -> Workload:
    return _plain("tiny", args.tiny_items, tiny_fn, tiny_fn, 1,
                  f"x + 1, {args.tiny_items:,} items")


@workload("sleep")
def build_sleep(args) -> Workload:
    return _plain("sleep", 400, sleep_fn, sleep_expected, 4,
                  "time.sleep(0.02), 400 items, 4 calls in flight per actor")


@workload("cpu")
def build_cpu(args) -> Workload:
    iters = args.cpu_iters or calibrate(lambda n: spin(n, 1), 0.003)
    fn = make_cpu_fn(iters)
    xs = list(range(200))
    expected, per_item = _timed_expected(fn, xs)
    return Workload(
        "cpu", xs, fn, expected, 1,
        f"pure-Python loop of {iters:,} iterations (~{per_item * 1e3:.1f} ms on the driver), 200 items",
        info={"cpu_iters": iters, "driver_ms_per_item": per_item * 1e3},
    )


@workload("skew")
def build_skew(args) -> Workload:
    return _plain("skew", 400, skew_fn, skew_expected, 1,
                  "every 20th item sleeps 100 ms, the rest 5 ms, 400 items")


@workload("model")
def build_model(args) -> Workload:
    if args.model_size:
        size = args.model_size
    else:
        size = calibrate(lambda n: Model(n, 1), 0.5, start=10000)
    t0 = time.perf_counter()
    probe = Model(size, 1)
    build_s = time.perf_counter() - t0
    reads = args.model_reads or calibrate(lambda n: Model.predict(
        types.SimpleNamespace(weights=probe.weights, reads=n), 12345), 0.001)
    probe.reads = reads
    xs = list(range(args.model_items))
    expected, per_item = _timed_expected(probe.predict, xs)
    return Workload(
        "model", xs, None, expected, 1,
        f"Model(size={size:,}) built once per actor (~{build_s:.2f} s on the driver), "
        f"predict() ~{per_item * 1e3:.2f} ms, {len(xs):,} items; actor creation is timed",
        model_args=(size, reads), construct_timed=True,
        info={"model_size": size, "model_reads": reads, "driver_build_s": build_s,
              "driver_ms_per_item": per_item * 1e3},
    )


ALL_WORKLOADS = list(WORKLOAD_BUILDERS)


def build_workloads(args) -> Dict[str, Workload]:
    """The workloads named in ``args.only``, built (and calibrated) in registry order."""
    return {name: build(args) for name, build in WORKLOAD_BUILDERS.items() if name in args.only}
