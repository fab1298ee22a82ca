"""One replica on Ray: an actor handle that starts calls, broadcasts and probes (its state and
slots are the pool's records, see `rhmapper.pool_state`)."""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future
from typing import Any

import cloudpickle
import ray
from ray.exceptions import RayTaskError

from rhmapper.compiled import CompiledCalls
from rhmapper.module import replica_info, run_call
from rhmapper.pool_setup import put_kwargs
from rhmapper.pool_records import ReplicaRecord
from rhmapper.remote_errors import add_note, remote_error
from rhmapper.sizing import approx_bytes
from rhmapper.wire import BatchReply, CallRequest, CallSpec, Guard, RemoteFailure


class RayReplica(ReplicaRecord):
    """One replica of a pool on Ray: its record (state, slots; see
    `rhmapper.pool_state.ReplicaRecord`) with the actor handle that runs its calls.

    ``requested`` is how many calls the pool may keep in flight on it; ``None`` (your actors,
    by default) means as many as the actor runs at once, its ``max_concurrency``. The pool never
    keeps more than that in flight: `capacity` is known once the replica answered its probe.

    Examples:
        >>> import ray
        >>> handle = ray.remote(dict).remote()
        >>> replica = RayReplica("dict(1)", handle, owned=False, requested=None)
        >>> replica.state
        <ReplicaState.STARTING: 'starting'>
        >>> ray.kill(handle)
    """

    def __init__(self, name: str, handle: Any, owned: bool, requested: int | None,
                 index: int | None = None, cluster: str | None = None) -> None:
        super().__init__(name, owned, requested, index, cluster)
        self.handle = handle
        self.ready_ref = handle.__ray_call__.remote(replica_info)
        self.compiled: CompiledCalls | None = None
        """Its compiled graph, when the pool sends calls over one (``compiled_graphs=True``)."""
        self.broadcasts: set = set()
        """Its `broadcast` calls not answered yet: a mapped call may wait behind them."""

    def __repr__(self) -> str:
        return (f"RayReplica({self.name!r}, {self.state.value}, "
                f"{'auto' if self.owned else 'user'})")

    def probe(self) -> None:
        """Ask the replica again whether it is up (after it failed calls but may come back);
        the pool takes it out of rotation first."""
        self.started_at = time.monotonic()
        self.ready_ref = self.handle.__ray_call__.remote(replica_info)

    def calls_directly(self, call: CallSpec) -> bool:
        """Whether ``call`` goes to the user's method itself (an async method of your actor, not
        batched)."""
        return call.is_async and not self.owned and not call.batched

    def max_items(self, call: CallSpec) -> int | None:
        """One item per call for an async method of your actor (called directly), else any."""
        return 1 if self.calls_directly(call) else None

    def start(self, call: CallSpec, start: int, items: list, budget: float | None = None,
              board: str | None = None, idle: bool = False) -> ray.ObjectRef | Future:
        """Start one call on ``items``; return its ref, or the future of a call over the
        replica's compiled graph (the pool counts the slot it takes). The
        replica starts no item once the map has ended or ``budget`` seconds have passed (see
        `rhmapper.batch_runner.CallGuard`; ``board`` names the end board of the replica's cluster when
        it is not the driver's). ``idle`` says that nothing can be ahead of the call in the
        actor's queue (the pool knows, see `ReplicaPool.submit`): the replica then does not ask
        whether the map ended before it starts, however long the call took to get there.

        Auto replicas run the batch in their own entry point; your actors run `run_call`
        through ``__ray_call__``, except an ``async def`` method, which is called directly (one
        item per call) so that it runs on the actor's event loop as a direct call would.
        """
        if call.batched and call.is_async and not self.owned:
            raise ValueError(
                f"a batched async method cannot run on your actor {self.name}: its calls would "
                "block its event loop. Map the class with auto replicas (rm.mapper(cls, ...)), "
                "or make the method synchronous")
        try:
            if self.calls_directly(call):
                args = items[0] if call.star else (items[0],)
                return getattr(self.handle, call.method).remote(*args, **(call.kwargs or {}))
            now = time.time()
            deadline = None if budget is None else now + budget
            signal_board, key = call.end_signal or (None, None)
            board = board or signal_board  # the end board of this replica's own cluster
            # When the call was sent (``None``: it waits behind nothing); a compiled graph's
            # thread stamps its calls itself (`rhmapper.wire.CallRequest.sent_now`).
            sent_at = None if idle and self.compiled is None else now
            request = CallRequest(call.method, _large_items_by_ref(items, call.star), call.star,
                                  call.kwargs, Guard(board, key, deadline, sent_at), call.batched,
                                  call.digests)
            if not self.owned:
                return self.handle.__ray_call__.remote(run_call, request.to_wire())
            if self.compiled is not None:
                return self.compiled.submit(request, functools.partial(_unpicklable_item, start, items))
            if call.is_async:
                return self.handle._rhmapper_run_async.remote(request.to_wire())
            return self.handle._rhmapper_run.remote(request.to_wire())
        except TypeError as error:
            raise _unpicklable_item(start, items, error) from error

    def broadcast(self, method: str, args: tuple, kwargs: dict) -> ray.ObjectRef | Future:
        """Start ``method(*args, **kwargs)`` on the replica: an actor call, or a call over its
        compiled graph (so that it runs on the thread, and in the turn, of the mapped calls)."""
        if self.compiled is None:
            ref = getattr(self.handle, method).remote(*args, **kwargs)
            self.broadcasts.add(ref)
            ref.future().add_done_callback(lambda _: self.broadcasts.discard(ref))
            return ref
        return self.compiled.submit(CallRequest(method, [args], True, put_kwargs(kwargs) or None),
                                    functools.partial(_unpicklable_item, 0, [args]))

    def answer_of_broadcast(self, method: str, answer: ray.ObjectRef | Future) -> Any:
        """The value the `broadcast` of ``method`` returned (or its error, noted with this
        replica's name, raised)."""
        try:
            if not isinstance(answer, Future):
                return ray.get(answer)
            reply = BatchReply.from_wire(answer.result()).unpacked()
            if reply.failures:
                raise remote_error(reply.failures[0])
            return reply.values[0]
        except Exception as error:  # noted with the replica, then raised as it is
            add_note(error, f"rhmapper: broadcast of {method!r} failed on replica {self.name}")
            raise


LARGE_ITEM_BYTES = 2**20
"""An input (or a starmap argument) at least this large travels through the object store on
its own (``ray.put``), not pickled inside the call's payload: one copy fewer each way."""
_LARGE_ITEM_CALL = 16
"""Only calls of at most this many items are searched for large ones (a call is bounded by
``max_call_bytes``, so one of many items holds small items)."""


def _large_items_by_ref(items: list, star: bool) -> list:
    """``items`` with each large item (or large starmap argument) put in the object store; the
    replica fetches it back as it does any ``ObjectRef`` argument."""
    if len(items) > _LARGE_ITEM_CALL:
        return items
    if star:
        return [tuple(_by_ref_if_large(argument) for argument in item) for item in items]
    return [_by_ref_if_large(item) for item in items]


def _by_ref_if_large(value: Any) -> Any:
    return ray.put(value) if approx_bytes(value) >= LARGE_ITEM_BYTES else value


def _unpicklable_item(start: int, items: list, error: TypeError) -> TypeError:
    for position, item in enumerate(items):
        try:
            cloudpickle.dumps(item)
        except Exception as cause:  # the first item that cannot be pickled is the one to name
            return TypeError(
                f"input item {start + position} ({item!r:.80}) cannot be pickled to send it to a "
                f"replica: {cause}. Pass picklable values (or build the object inside the replica)."
            )
    return error



def task_failure(error: RayTaskError) -> RemoteFailure:
    """The user's exception of a direct actor call, as `run_batch` reports one.

    Examples:
        >>> task_failure(RayTaskError("f", "Traceback: ...", ValueError("bad"))).type_name
        'ValueError'
    """
    if isinstance(error.cause, BaseException):
        return RemoteFailure.of(error.cause, str(error))
    return RemoteFailure(error.function_name, str(error), str(error))

