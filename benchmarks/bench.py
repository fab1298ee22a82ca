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
    python benchmarks/bench.py --json results.json

The markdown report goes to stdout; progress goes to stderr. See
docs/benchmarks.md for what each workload and contender is and what is timed.
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
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

# A local cluster started by ray.init() turns token authentication on by default in
# recent Ray; set the mode deliberately (see DESIGN.md, "Test set-up") unless the
# caller chose one.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.util import ActorPool  # noqa: E402
from ray.util.multiprocessing import Pool  # noqa: E402

NUM_ACTORS = 4
ACTOR_CPUS = 0.5
RAY_CPUS = 4

ALL_WORKLOADS = ["tiny", "sleep", "cpu", "skew", "model"]
ALL_CONTENDERS = ["optimum", "per_item", "actorpool", "mp_pool", "rhmapper", "rhmapper_b1"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Workload functions. They live in __main__, so cloudpickle ships them by value.
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


# multiprocessing.Pool has no per-worker object, only initializer(); the usual idiom is a
# module global. Functions defined in __main__ are pickled by value (their globals are
# copies), so the model is parked on a small module registered in sys.modules instead.
def _pool_state():
    mod = sys.modules.get("_rhbench_pool_state")
    if mod is None:
        mod = types.ModuleType("_rhbench_pool_state")
        sys.modules["_rhbench_pool_state"] = mod
    return mod


def pool_init_model(size, reads):
    _pool_state().model = Model(size, reads)


def pool_predict(x):
    return _pool_state().model.predict(x)


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


def build_workloads(args) -> Dict[str, Workload]:
    wls: Dict[str, Workload] = {}
    wanted = args.only

    if "tiny" in wanted:
        xs = list(range(args.tiny_items))
        wls["tiny"] = Workload(
            "tiny", xs, tiny_fn, [x + 1 for x in xs], 1, f"x + 1, {len(xs):,} items"
        )
    if "sleep" in wanted:
        xs = list(range(400))
        wls["sleep"] = Workload(
            "sleep", xs, sleep_fn, [sleep_expected(x) for x in xs], 4,
            "time.sleep(0.02), 400 items, 4 calls in flight per actor",
        )
    if "cpu" in wanted:
        iters = args.cpu_iters or calibrate(lambda n: spin(n, 1), 0.003)
        fn = make_cpu_fn(iters)
        xs = list(range(200))
        t0 = time.perf_counter()
        expected = [fn(x) for x in xs]
        per_item = (time.perf_counter() - t0) / len(xs)
        wls["cpu"] = Workload(
            "cpu", xs, fn, expected, 1,
            f"pure-Python loop of {iters:,} iterations (~{per_item * 1e3:.1f} ms on the driver), 200 items",
            info={"cpu_iters": iters, "driver_ms_per_item": per_item * 1e3},
        )
    if "skew" in wanted:
        xs = list(range(400))
        wls["skew"] = Workload(
            "skew", xs, skew_fn, [skew_expected(x) for x in xs], 1,
            "every 20th item sleeps 100 ms, the rest 5 ms, 400 items",
        )
    if "model" in wanted:
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
        t0 = time.perf_counter()
        expected = [probe.predict(x) for x in xs]
        per_item = (time.perf_counter() - t0) / len(xs)
        del probe
        wls["model"] = Workload(
            "model", xs, None, expected, 1,
            f"Model(size={size:,}) built once per actor (~{build_s:.2f} s on the driver), "
            f"predict() ~{per_item * 1e3:.2f} ms, {len(xs):,} items; actor creation is timed",
            model_args=(size, reads), construct_timed=True,
            info={"model_size": size, "model_reads": reads, "driver_build_s": build_s,
                  "driver_ms_per_item": per_item * 1e3},
        )
    return {name: wls[name] for name in ALL_WORKLOADS if name in wls}


# --------------------------------------------------------------------------------------
# The actor the hand-written contenders use
# --------------------------------------------------------------------------------------


@ray.remote
class Worker:
    """Holds a function, or an instance of a class and the name of its method."""

    def __init__(self, fn=None, cls=None, args=(), method=None):
        if cls is not None:
            self._fn = getattr(cls(*args), method)
        else:
            self._fn = fn

    def ready(self):
        return True

    def f(self, x):
        return self._fn(x)

    def chunk(self, xs):
        fn = self._fn
        return [fn(x) for x in xs]


def make_workers(wl: Workload) -> list:
    opts = dict(num_cpus=ACTOR_CPUS, max_concurrency=wl.concurrency)
    if wl.is_model:
        return [Worker.options(**opts).remote(cls=Model, args=wl.model_args, method="predict")
                for _ in range(NUM_ACTORS)]
    return [Worker.options(**opts).remote(fn=wl.fn) for _ in range(NUM_ACTORS)]


def kill_all(actors) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:
            pass


# --------------------------------------------------------------------------------------
# Contenders
#
# start(): create the pool (actors / Pool / mapper)
# warm():  one small call
# run(xs): the map, returns the list of results in input order
# stop():  kill everything start() created
#
# For ordinary workloads start()+warm() happen once, outside the timed region, and only
# run() is timed (R times on the same actors). For the model workload start()+run() are
# timed together on fresh actors each repeat (construction is what a user pays there).
# --------------------------------------------------------------------------------------


class Contender:
    name = "?"

    def __init__(self, wl: Workload, args):
        self.wl = wl
        self.args = args

    def start(self):
        raise NotImplementedError

    def warm(self):
        self.check(self.run(self.wl.items[:8]), 8)

    def run(self, xs):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def check(self, got, n=None):
        exp = self.wl.expected if n is None else self.wl.expected[:n]
        if not isinstance(got, list):
            got = list(got)
        if got != exp:
            bad = next((i for i, (g, e) in enumerate(zip(got, exp)) if g != e), None)
            raise AssertionError(
                f"{self.name}/{self.wl.name}: wrong result (len {len(got)} vs {len(exp)}, "
                f"first mismatch at index {bad})"
            )


class ActorContender(Contender):
    def start(self):
        self.actors = make_workers(self.wl)
        if not self.wl.construct_timed:
            ray.get([a.ready.remote() for a in self.actors])

    def stop(self):
        kill_all(getattr(self, "actors", []))
        self.actors = []


class Optimum(ActorContender):
    """Static split up front: a few chunks per actor slot, all submitted at once."""

    name = "optimum"

    def run(self, xs):
        slots = NUM_ACTORS * self.wl.concurrency
        k = max(1, min(len(xs), slots * self.args.chunks_per_slot))
        if self.args.optimum_split == "strided":
            chunks = [xs[i::k] for i in range(k)]
        else:  # contiguous
            size, extra = divmod(len(xs), k)
            chunks, pos = [], 0
            for i in range(k):
                n = size + (1 if i < extra else 0)
                chunks.append(xs[pos:pos + n])
                pos += n
        refs = [self.actors[i % NUM_ACTORS].chunk.remote(c) for i, c in enumerate(chunks)]
        outs = ray.get(refs)
        if self.args.optimum_split == "strided":
            res = [None] * len(xs)
            for i, out in enumerate(outs):
                res[i::k] = out
            return res
        return [y for out in outs for y in out]


class PerItem(ActorContender):
    """One actor call per item, round-robin, all submitted, then one ray.get."""

    name = "per_item"

    def run(self, xs):
        actors = self.actors
        n = len(actors)
        return ray.get([actors[i % n].f.remote(x) for i, x in enumerate(xs)])


class ActorPoolContender(ActorContender):
    """ray.util.ActorPool(actors).map(lambda a, v: a.f.remote(v), xs)."""

    name = "actorpool"

    def run(self, xs):
        return list(ActorPool(self.actors).map(lambda a, v: a.f.remote(v), xs))


class MpPool(Contender):
    """ray.util.multiprocessing.Pool(4, ray_remote_args={"num_cpus": 0.5}).map(fn, xs)."""

    name = "mp_pool"

    def start(self):
        kw = dict(processes=NUM_ACTORS, ray_remote_args={"num_cpus": ACTOR_CPUS})
        if self.wl.is_model:
            self.pool = Pool(initializer=pool_init_model, initargs=self.wl.model_args, **kw)
            self.fn = pool_predict
        else:
            self.pool = Pool(**kw)
            self.fn = self.wl.fn

    def run(self, xs):
        return self.pool.map(self.fn, xs)

    def stop(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.terminate()
        self.pool = None


_rhmapper_serial = 0


class Rhmapper(Contender):
    """rhmapper with its defaults (batch_size="auto")."""

    name = "rhmapper"
    map_kwargs: Dict[str, Any] = {}

    def start(self):
        global _rhmapper_serial
        import rhmapper as rm

        _rhmapper_serial += 1
        # A unique Env name per mapper, so that a named replica that is still being torn
        # down can never collide with the next mapper's replica.
        env = rm.Env(name=f"bench_{self.wl.name}_{_rhmapper_serial}", compute={"CPU": ACTOR_CPUS})
        if self.wl.is_model:
            self.m = rm.mapper(rm.module(Model, *self.wl.model_args), method="predict",
                               replicas=NUM_ACTORS, env=env, concurrency=1)
        else:
            self.m = rm.mapper(self.wl.fn, replicas=NUM_ACTORS, env=env,
                               concurrency=self.wl.concurrency)

    def warm(self):
        # One item per call, so that (as for the other contenders) every replica has
        # served a call before the timed runs; auto-batching could put all 8 warm-up
        # items on one replica.
        self.check(self.m.map(self.wl.items[:8], progress=False, batch_size=1), 8)

    def run(self, xs):
        return self.m.map(xs, progress=False, **self.map_kwargs)

    def stop(self):
        m = getattr(self, "m", None)
        if m is not None:
            m.shutdown()
        self.m = None


class RhmapperB1(Rhmapper):
    """rhmapper with batch_size=1: one item per call, like per_item/ActorPool."""

    name = "rhmapper_b1"
    map_kwargs = {"batch_size": 1}


CONTENDER_CLASSES = {c.name: c for c in (Optimum, PerItem, ActorPoolContender, MpPool,
                                         Rhmapper, RhmapperB1)}


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


def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return "—"
    return f"{r:,.0f}"


def short_error(err: str, n: int = 90) -> str:
    err = err.replace("|", "/").replace("\n", " ")
    return err if len(err) <= n else err[: n - 1] + "…"


def report(workloads: Dict[str, Workload], results: List[Dict[str, Any]], args,
           loads: Optional[Dict[str, tuple]] = None) -> str:
    out: List[str] = []
    by = {(r["workload"], r["contender"]): r for r in results}
    out.append(f"Ray {ray.__version__}, Python {platform.python_version()}, "
               f"{os.cpu_count()} host cores, ray.init(num_cpus={RAY_CPUS}), "
               f"{NUM_ACTORS} actors x num_cpus={ACTOR_CPUS}, median of {args.repeats} run(s), "
               f"optimum split: {args.optimum_split}, {args.chunks_per_slot} chunk(s) per actor slot.")
    out.append("")
    for name, wl in workloads.items():
        opt = by.get((name, "optimum"), {}).get("median")
        out.append(f"### {name}: {wl.description}")
        out.append("")
        if loads and name in loads:
            out.append(f"(1-minute load average {loads[name][0]:.1f} before, "
                       f"{loads[name][1]:.1f} after this workload)")
            out.append("")
        out.append("| contender | median s | items/s | ratio to optimum |")
        out.append("|---|---:|---:|---:|")
        for cname in args.contenders:
            r = by.get((name, cname))
            if r is None:
                continue
            if r.get("error") and not r["times"]:
                out.append(f"| {cname} | error | — | {short_error(r['error'])} |")
                continue
            med = r.get("median")
            ratio = f"{med / opt:.2f}" if (opt and med is not None) else "—"
            if r.get("error"):
                ratio += f" (then: {short_error(r['error'], 60)})"
            out.append(f"| {cname} | {fmt_s(med)} | {fmt_rate(r.get('items_per_s'))} | {ratio} |")
        out.append("")

    # The targets
    def ratio(w, c):
        a = by.get((w, c), {}).get("median")
        o = by.get((w, "optimum"), {}).get("median")
        return a / o if (a is not None and o) else None

    targets = [
        ("tiny: rhmapper / optimum", ratio("tiny", "rhmapper"), "<=", 2.0),
        ("sleep: rhmapper / optimum", ratio("sleep", "rhmapper"), "<=", 1.05),
        ("cpu: rhmapper / optimum", ratio("cpu", "rhmapper"), "<=", 1.1),
        ("skew: rhmapper / optimum", ratio("skew", "rhmapper"), "<=", 0.6),
    ]
    b1 = by.get(("tiny", "rhmapper_b1"), {}).get("median")
    ap = by.get(("tiny", "actorpool"), {}).get("median")
    targets.append(("tiny: rhmapper_b1 throughput / actorpool throughput",
                    (ap / b1) if (b1 and ap is not None) else None, ">=", 1.5))
    out.append("### Targets")
    out.append("")
    out.append("| target | measured | goal | result |")
    out.append("|---|---:|---:|---|")
    for label, val, op, goal in targets:
        if val is None:
            verdict, shown = "n/a (not measured)", "—"
        else:
            ok = val <= goal if op == "<=" else val >= goal
            verdict, shown = ("PASS" if ok else "FAIL"), f"{val:.2f}"
        out.append(f"| {label} | {shown} | {op} {goal} | {verdict} |")
    out.append("")
    errors = [r for r in results if r.get("error")]
    if errors:
        out.append("### Errors")
        out.append("")
        for r in errors:
            out.append(f"- {r['workload']}/{r['contender']}: {r['error']}")
        out.append("")
    return "\n".join(out)


def parse_list(value: str, allowed: List[str], what: str) -> List[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return [n for n in allowed if n in names]  # canonical order


def main(argv=None) -> int:
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
    if args.repeats < 1 or args.tiny_items < 1:
        p.error("--repeats and --tiny-items must be >= 1")

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
            if wl.construct_timed:
                results.extend(run_constructing(wl, args.contenders, args))
            else:
                for cname in args.contenders:
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
        payload = {
            "config": {
                "ray_version": ray.__version__, "python": platform.python_version(),
                "host_cores": os.cpu_count(), "ray_num_cpus": RAY_CPUS,
                "num_actors": NUM_ACTORS, "actor_num_cpus": ACTOR_CPUS,
                "repeats": args.repeats, "tiny_items": args.tiny_items,
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
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
