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

try:  # only the vector workload needs numpy (pip install -e ".[bench]")
    import numpy as np
except ImportError:  # pragma: no cover - reported when the vector workload is built
    np = None

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


VECTOR_DIM = 512


def int_valued_float32(seed, shape):
    """Random float32 values that are small integers (-8..8): a product of a 512-vector and
    a 512 x 512 matrix of them sums integers below 2**24, so it is exact in float32 whatever
    order BLAS adds in, and every contender's results can be compared exactly."""
    return np.random.default_rng(seed).integers(-8, 9, size=shape).astype(np.float32)


class VectorModel:
    """A vectorizable model, like a classifier's forward pass.

    The constructor builds a seeded 512 x 512 float32 weight matrix (once per actor);
    ``predict_batch(batch)`` stacks a list of 512-float32 vectors, multiplies by the
    weights, pays a fixed 2 ms per call (a framework's dispatch), and returns each row's
    argmax, the predicted class, as a numpy int64 array. ``predict(x)`` is one item as a
    batch of one.
    """

    DISPATCH_S = 0.002

    def __init__(self, seed):
        self.weights = int_valued_float32(seed, (VECTOR_DIM, VECTOR_DIM))

    def predict_array(self, xs):
        """``xs``: an (n, 512) float32 array; returns n class indices."""
        labels = (xs @ self.weights).argmax(axis=1)
        time.sleep(self.DISPATCH_S)
        return labels

    def predict_batch(self, batch):
        return self.predict_array(np.stack(batch))

    def predict(self, x):
        return self.predict_batch([x])[0]


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
    model_args: Optional[tuple] = None  # (size, reads) for model, (seed,) for vector
    construct_timed: bool = False  # actors are created inside the timed region
    info: Dict[str, Any] = field(default_factory=dict)
    model_cls: Optional[type] = None  # the stateful class (Model unless said otherwise)
    batch_size: int = 0  # vectorized workloads: items per call of model_cls.predict_batch
    baseline: str = "optimum"  # the contender the report's ratio column divides by

    def __post_init__(self):
        if self.model_args is not None and self.model_cls is None:
            self.model_cls = Model

    @property
    def is_model(self):
        return self.model_args is not None

    @property
    def vectorized(self):
        """Items go to the model in batches (model_cls.predict_batch): the vector workload."""
        return self.batch_size > 0


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


@workload("vector")
def build_vector(args) -> Workload:
    if np is None:
        raise RuntimeError("the vector workload needs numpy, and its ray_data contender Ray "
                           "Data's dependencies: pip install -e \".[bench]\" (or leave vector "
                           "out of --only)")
    n, seed, batch = args.vector_items, 20, 64
    # one array per item, each its own (not a view of one block)
    items = [x.copy() for x in int_valued_float32(seed + 1, (n, VECTOR_DIM))]
    t0 = time.perf_counter()
    weights = VectorModel(seed).weights
    expected = (np.stack(items) @ weights).argmax(axis=1).tolist()
    driver_s = time.perf_counter() - t0
    return Workload(
        "vector", items, None, expected, 1,
        f"{n:,} float32 vectors of {VECTOR_DIM} times a {VECTOR_DIM} x {VECTOR_DIM} weight "
        f"matrix (argmax), + {VectorModel.DISPATCH_S * 1e3:.0f} ms per call, batches of {batch}",
        model_args=(seed,), model_cls=VectorModel, batch_size=batch,
        baseline="actorpool_chunks",
        info={"vector_dim": VECTOR_DIM, "vector_seed": seed, "batch_size": batch,
              "dispatch_ms": VectorModel.DISPATCH_S * 1e3,
              "driver_matmul_s_all_items": driver_s},
    )


ALL_WORKLOADS = list(WORKLOAD_BUILDERS)


def build_workloads(args) -> Dict[str, Workload]:
    """The workloads named in ``args.only``, built (and calibrated) in registry order."""
    return {name: build(args) for name, build in WORKLOAD_BUILDERS.items() if name in args.only}
