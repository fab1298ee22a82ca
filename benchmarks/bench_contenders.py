"""The contenders of benchmarks/bench.py: the ways to map that are timed against each other.

A contender is a `Contender` subclass with a ``name``, listed in `CONTENDER_CLASSES`
(whose order is the order of the report and of ``--contenders``):

- start(): create the pool (actors / Pool / mapper)
- warm():  one small call
- run(xs): the map, returns the list of results in input order
- stop():  kill everything start() created

For ordinary workloads start()+warm() happen once, outside the timed region, and only
run() is timed (R times on the same actors). For the model workload start()+run() are
timed together on fresh actors each repeat (construction is what a user pays there).

bench.py registers this module with cloudpickle as pickle-by-value (like
bench_workloads), so the Worker actor class and the Pool helpers reach the actors by value.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict

import ray
from ray.util import ActorPool
from ray.util.multiprocessing import Pool

from bench_workloads import Model, Workload

# The set-up every contender shares (bench.py starts Ray with RAY_CPUS CPUs).
NUM_ACTORS = 4
ACTOR_CPUS = 0.5
RAY_CPUS = 4


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


# multiprocessing.Pool has no per-worker object, only initializer(); the usual idiom is a
# module global. This module's functions are pickled by value (their globals are copies),
# so the model is parked on a small module registered in sys.modules instead.
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
# Contenders
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
    mapper_kwargs: Dict[str, Any] = {}

    def start(self):
        global _rhmapper_serial
        import rhmapper as rm

        _rhmapper_serial += 1
        # A unique Env name per mapper, so that a named replica that is still being torn
        # down can never collide with the next mapper's replica.
        env = rm.Env(name=f"bench_{self.wl.name}_{_rhmapper_serial}", compute={"CPU": ACTOR_CPUS})
        if self.wl.is_model:
            self.m = rm.mapper(rm.module(Model, *self.wl.model_args), method="predict",
                               replicas=NUM_ACTORS, env=env, concurrency=1,
                               **self.mapper_kwargs)
        else:
            self.m = rm.mapper(self.wl.fn, replicas=NUM_ACTORS, env=env,
                               concurrency=self.wl.concurrency, **self.mapper_kwargs)
        if not self.wl.construct_timed:  # as the other contenders' actors: all ready first
            self.m.wait_ready()

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


class RhmapperCompiledB1(RhmapperB1):
    """rhmapper with batch_size=1 over a Ray Compiled Graph per replica (compiled_graphs=True)."""

    name = "rhmapper_compiled_b1"
    mapper_kwargs = {"compiled_graphs": True}


class RhmapperTimeout(Rhmapper):
    """rhmapper with timeout=10 (seconds per item): calls still carry many items."""

    name = "rhmapper_timeout"
    map_kwargs = {"timeout": 10.0}


CONTENDER_CLASSES = {c.name: c for c in (Optimum, PerItem, ActorPoolContender, MpPool,
                                         Rhmapper, RhmapperB1, RhmapperCompiledB1,
                                         RhmapperTimeout)}
"""Contender name -> class, in report order."""

ALL_CONTENDERS = list(CONTENDER_CLASSES)
