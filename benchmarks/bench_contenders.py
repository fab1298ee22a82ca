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

``supports(wl)`` says which workloads a contender runs: the vector workload (a model
called on batches) has its own contenders (``*_chunks``, ``ray_data``, ``rhmapper_batched``)
plus ``rhmapper_b1``; the other workloads run the rest.

bench.py registers this module with cloudpickle as pickle-by-value (like
bench_workloads), so the Worker actor class and the Pool helpers reach the actors by value.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, List

import ray
from ray.util import ActorPool
from ray.util.multiprocessing import Pool

from bench_workloads import Model, VectorModel, Workload

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

    def __init__(self, fn=None, cls=None, args=(), method=None, batch_method=None):
        if cls is not None:
            obj = cls(*args)
            self._fn = getattr(obj, method)
            self._batch_fn = getattr(obj, batch_method) if batch_method else None
        else:
            self._fn = fn

    def ready(self):
        return True

    def f(self, x):
        return self._fn(x)

    def chunk(self, xs):
        fn = self._fn
        return [fn(x) for x in xs]

    def batch(self, xs):
        """The model's own batch method over the list xs (vector workload)."""
        return self._batch_fn(xs)


def make_workers(wl: Workload) -> list:
    opts = dict(num_cpus=ACTOR_CPUS, max_concurrency=wl.concurrency)
    if wl.is_model:
        batch_method = "predict_batch" if wl.vectorized else None
        return [Worker.options(**opts).remote(cls=wl.model_cls, args=wl.model_args,
                                              method="predict", batch_method=batch_method)
                for _ in range(NUM_ACTORS)]
    return [Worker.options(**opts).remote(fn=wl.fn) for _ in range(NUM_ACTORS)]


def chunked(xs: list, size: int) -> List[list]:
    """xs cut by hand into lists of ``size`` items (the last one shorter)."""
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def flatten(outs) -> list:
    """Per-chunk results (lists or arrays) back into one list, in order."""
    return [y for out in outs for y in out]


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

    @classmethod
    def supports(cls, wl: Workload) -> bool:
        """Whether this contender runs on ``wl``: by default every workload but vector."""
        return not wl.vectorized

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
    method = "predict"  # the model's method mapped (model and vector workloads)

    def start(self):
        global _rhmapper_serial
        import rhmapper as rm

        _rhmapper_serial += 1
        # A unique Env name per mapper, so that a named replica that is still being torn
        # down can never collide with the next mapper's replica.
        env = rm.Env(name=f"bench_{self.wl.name}_{_rhmapper_serial}", compute={"CPU": ACTOR_CPUS})
        if self.wl.is_model:
            self.m = rm.mapper(rm.module(self.wl.model_cls, *self.wl.model_args),
                               method=self.method, replicas=NUM_ACTORS, env=env, concurrency=1,
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


class RhmapperNoMetrics(Rhmapper):
    """rhmapper with metrics=False: what the Ray metrics cost (issue 23: within 2 %)."""

    name = "rhmapper_no_metrics"
    mapper_kwargs = {"metrics": False}


class RhmapperB1(Rhmapper):
    """rhmapper with batch_size=1: one item per call, like per_item/ActorPool."""

    name = "rhmapper_b1"
    map_kwargs = {"batch_size": 1}

    @classmethod
    def supports(cls, wl: Workload) -> bool:
        return True  # on vector: VectorModel.predict(x), i.e. predict_batch([x])[0]


class RhmapperCompiledB1(RhmapperB1):
    """rhmapper with batch_size=1 over a Ray Compiled Graph per replica (compiled_graphs=True)."""

    name = "rhmapper_compiled_b1"
    mapper_kwargs = {"compiled_graphs": True}

    @classmethod
    def supports(cls, wl: Workload) -> bool:
        return not wl.vectorized


class RhmapperTimeout(Rhmapper):
    """rhmapper with timeout=10 (seconds per item): calls still carry many items."""

    name = "rhmapper_timeout"
    map_kwargs = {"timeout": 10.0}


# --------------------------------------------------------------------------------------
# The vector workload: a model whose predict_batch(list) costs about as much for 64 items
# as for one. Chunks of wl.batch_size items; warm-ups send chunks of one item, one per
# call, so that every actor has served a call before the timed runs.
# --------------------------------------------------------------------------------------


class VectorContender(Contender):
    @classmethod
    def supports(cls, wl: Workload) -> bool:
        return wl.vectorized

    def warm(self):
        self.check(self.run(self.wl.items[:8], chunk=1), 8)


class ActorPoolChunks(VectorContender, ActorContender):
    """Chunks of 64 cut by hand, ActorPool(actors).map(lambda a, c: a.batch.remote(c), chunks)."""

    name = "actorpool_chunks"

    def run(self, xs, chunk=None):
        chunks = chunked(xs, chunk or self.wl.batch_size)
        return flatten(ActorPool(self.actors).map(lambda a, c: a.batch.remote(c), chunks))


class RhmapperChunks(VectorContender, Rhmapper):
    """Chunks of 64 cut by hand, mapped with batch_size=1 over method="predict_batch"."""

    name = "rhmapper_chunks"
    method = "predict_batch"

    def run(self, xs, chunk=None):
        chunks = chunked(xs, chunk or self.wl.batch_size)
        return flatten(self.m.map(chunks, progress=False, batch_size=1))


class RhmapperBatched(VectorContender, Rhmapper):
    """rm.mapper(rm.module(VectorModel, seed), method="predict_batch",
    batched=rm.Batched(max_size=64)): rhmapper forms the batches (issue 20)."""

    name = "rhmapper_batched"
    method = "predict_batch"

    def start(self):
        import rhmapper as rm

        if not hasattr(rm, "Batched"):
            raise RuntimeError("this rhmapper has no rm.Batched: batched mappers (issue 20, "
                               "part 1) have not landed yet")
        self.mapper_kwargs = {"batched": rm.Batched(max_size=self.wl.batch_size)}
        super().start()

    def warm(self):
        # the same call as the timed runs: whether batch_size=1 means anything on a batched
        # mapper is the batched API's business, not this benchmark's
        self.check(self.m.map(self.wl.items[:8], progress=False), 8)

    def run(self, xs):
        return self.m.map(xs, progress=False)


class VectorPredictor:
    """Ray Data's callable class for map_batches: a VectorModel per actor, numpy batches."""

    def __init__(self, seed):
        self.model = VectorModel(seed)

    def __call__(self, batch):
        return {"id": batch["id"], "label": self.model.predict_array(batch["x"])}


class RayData(VectorContender):
    """ray.data.from_items([{"id": i, "x": x}]) then map_batches(VectorPredictor, an actor
    pool of 4 at num_cpus=0.5, batch_size=64), results put back in input order by id.

    Ray Data's actor pool is started inside each run (and ended when the run's dataset is
    consumed): that is how map_batches works, so its start-up is part of its time.
    ``compute=ActorPoolStrategy(size=4)`` is what ``concurrency=4`` means for a class
    (``concurrency`` is deprecated since Ray 2.51).
    """

    name = "ray_data"

    def start(self):
        try:
            import ray.data  # noqa: F401 - needs pandas and pyarrow
        except ImportError as e:
            raise RuntimeError(f"Ray Data cannot be imported ({e}): pip install -e "
                               f"\".[bench]\" installs its dependencies") from e
        # rhmapper runs with progress=False: no progress bars here either
        ray.data.DataContext.get_current().enable_progress_bars = False

    def run(self, xs, chunk=None):
        import numpy as np

        ds = ray.data.from_items([{"id": i, "x": x} for i, x in enumerate(xs)])
        out = ds.map_batches(VectorPredictor, fn_constructor_args=self.wl.model_args,
                             compute=ray.data.ActorPoolStrategy(size=NUM_ACTORS),
                             num_cpus=ACTOR_CPUS, batch_size=chunk or self.wl.batch_size,
                             batch_format="numpy")
        labels = np.empty(len(xs), dtype=np.int64)
        seen = 0
        # Ray Data does not keep input order (preserve_order is off by default): by id
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            labels[b["id"]] = b["label"]
            seen += len(b["id"])
        if seen != len(xs):
            raise AssertionError(f"ray_data returned {seen} rows for {len(xs)} items")
        return labels.tolist()

    def stop(self):
        pass  # Ray Data ends its actor pool when the run's dataset is consumed


CONTENDER_CLASSES = {c.name: c for c in (Optimum, PerItem, ActorPoolContender, MpPool,
                                         Rhmapper, RhmapperNoMetrics, RhmapperB1,
                                         RhmapperCompiledB1,
                                         RhmapperTimeout, RhmapperChunks, ActorPoolChunks,
                                         RayData, RhmapperBatched)}
"""Contender name -> class, in report order."""

ALL_CONTENDERS = list(CONTENDER_CLASSES)
