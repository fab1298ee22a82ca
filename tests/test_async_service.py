"""A real async service over a mapper (issue 24): the Starlette app of examples/async_service.py,
served by uvicorn on loopback in this process, its endpoint awaiting ``m.acall(...)``, hit by
concurrent HTTP clients.

The server runs in a thread with its own event loop (as a service's loop is not its clients'),
on a free port; the clients are ``httpx.AsyncClient`` s on the test's loop. Two apps, each made
once per module: the example's own (two replicas of its ``Model``) for many clients at once, and
the example's app over `SlowModel` (ONE replica, concurrency 1, an ``async def`` method that
sleeps 30 s on a negative input) for clients that leave. `SlowModel` appends one line per start,
finish and cancellation of each input, with its pid, to a file: the tests read what ran there.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

import rhmapper as rm
from examples.async_service import create_app  # examples/ is on the workers' path too

SLEEP_SECONDS = 30.0
"""How long `SlowModel.predict` sleeps on a negative input: far longer than any test waits."""
QUICK_SECONDS = 8.0
"""A request on a free replica is answered within this (start-up excluded): well under the
sleep, so a quick answer proves no sleeping call held the replica."""


class SlowModel:
    """An async model whose calls the tests watch: ``predict(x)`` is ``10 * x + 1``, after
    sleeping `SLEEP_SECONDS` when ``x < 0``; each start, finish and cancellation is a line
    ``"<event> <x> <pid>"`` of the file ``log``."""

    def __init__(self, log: str) -> None:
        self.log = log

    def _record(self, event: str, x: float) -> None:
        with open(self.log, "a") as file:
            file.write(f"{event} {x:g} {os.getpid()}\n")

    async def predict(self, x: float) -> float:
        """``10 * x + 1``, slowly for a negative ``x``."""
        self._record("start", x)
        try:
            if x < 0:
                await asyncio.sleep(SLEEP_SECONDS)
        except asyncio.CancelledError:  # Ray cancels the running call: noted, then raised
            self._record("cancelled", x)
            raise
        self._record("finish", x)
        return 10 * x + 1


def events(log: Path) -> list[tuple[str, str, int]]:
    """The lines of ``log`` as (event, input, pid)."""
    found = []
    for line in log.read_text().splitlines():
        event, x, pid = line.split()
        found.append((event, x, int(pid)))
    return found


def events_of(log: Path, x: str) -> list[str]:
    """The events recorded for the input ``x`` (as ``f"{x:g}"`` spells it), in order."""
    return [event for event, value, _ in events(log) if value == x]


async def until(predicate: Callable[[], bool], seconds: float) -> bool:
    """Whether ``predicate()`` became true within ``seconds`` (polled on the running loop)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class Server:
    """``app`` served by uvicorn on a free loopback port, in a thread with its own event loop
    (the app's lifespan makes its mapper there); `url` is where. Use it with ``with``: it
    stops the server (and so shuts the app's mapper down) and joins its thread, both bounded."""

    START_SECONDS = 180.0
    STOP_SECONDS = 60.0

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._serve, name="uvicorn-test", daemon=True)

    @property
    def mapper(self) -> rm.Mapper:
        """The mapper the app made at start-up."""
        return self.app.state.mapper

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + self.START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn stopped before it served (see its log above)")
            if time.monotonic() > deadline:
                self.__exit__()
                raise TimeoutError(f"uvicorn did not start within {self.START_SECONDS}s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(self.STOP_SECONDS)
        self._socket.close()
        assert not self._thread.is_alive(), f"uvicorn did not stop within {self.STOP_SECONDS}s"


@pytest.fixture(scope="module")
def service(ray_session) -> Iterator[Server]:
    """The example's own app: two replicas of its ``Model``."""
    assert ray_session.is_initialized(), "a multi-node test ran before a local-Ray test"
    with Server(create_app()) as server:
        yield server


@pytest.fixture(scope="module")
def slow_service(ray_session, tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    """The example's app over ONE replica of `SlowModel` (concurrency 1), and its log."""
    assert ray_session.is_initialized(), "a multi-node test ran before a local-Ray test"
    log = tmp_path_factory.mktemp("async_service") / "predict.log"
    log.touch()
    app = create_app(lambda: rm.mapper(rm.module(SlowModel, str(log)), method="predict",
                                       replicas=1, concurrency=1))
    with Server(app) as server:
        yield server, log


async def get_prediction(url: str, x: float, timeout: float = QUICK_SECONDS) -> httpx.Response:
    """``GET /predict?x=...`` from a client of its own, which disconnects after ``timeout``."""
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.get("/predict", params={"x": x}, timeout=timeout)


async def disconnect_after(url: str, x: float, seconds: float) -> None:
    """Ask for ``x`` and disconnect after ``seconds`` without an answer (it must take longer)."""
    with pytest.raises(httpx.ReadTimeout):
        await get_prediction(url, x, timeout=seconds)


def open_maps(mapper: rm.Mapper) -> int:
    """How many maps (here: ``acall`` s) the mapper is running."""
    return len(mapper.stats().maps)


@pytest.mark.timeout(240)
def test_concurrent_clients_each_get_their_own_answer(service):
    """64 clients at once, each with its own input and connection: each gets the model's answer
    for its own input, and the replicas ran one call per request (no more, none lost)."""
    xs = [i - 32 + 0.25 * (i % 4) for i in range(64)]
    assert len(set(xs)) == len(xs)

    async def all_clients() -> list[httpx.Response]:
        return await asyncio.gather(*(get_prediction(service.url, x, timeout=60) for x in xs))

    responses = asyncio.run(all_clients())
    answers = [(response.status_code, response.json()) for response in responses]
    assert answers == [(200, {"x": x, "prediction": 2.0 * x + 0.5}) for x in xs]
    replicas = service.mapper.stats().replicas
    assert sum(replica.items for replica in replicas) == len(xs), replicas
    assert len(replicas) == 2 and all(replica.items > 0 for replica in replicas), \
        "both replicas served the clients"
    assert open_maps(service.mapper) == 0


@pytest.mark.timeout(240)
def test_a_client_that_disconnects_cancels_its_running_call(slow_service):
    """A client that leaves while its call runs (a 30 s sleep) cancels that call in the replica:
    the method gets ``CancelledError`` and never finishes, and the replica (one, concurrency 1)
    answers the next request at once, as the same process."""
    server, log = slow_service

    async def scenario() -> tuple[httpx.Response, float]:
        await disconnect_after(server.url, -1, seconds=1.0)
        started = time.monotonic()
        try:  # it waits behind -1 unless that call was cancelled
            response = await get_prediction(server.url, 5)
        except httpx.ReadTimeout:
            pytest.fail(f"no answer within {QUICK_SECONDS}s: the replica still runs -1 "
                        f"({events(log)})")
        return response, time.monotonic() - started

    response, seconds = asyncio.run(scenario())
    assert (response.status_code, response.json()) == (200, {"x": 5.0, "prediction": 51.0})
    assert seconds < QUICK_SECONDS, f"the replica was free again only after {seconds:.1f}s"
    assert asyncio.run(until(lambda: "cancelled" in events_of(log, "-1"), 20)), events(log)
    assert events_of(log, "-1") == ["start", "cancelled"], "-1 ran once and never finished"
    assert events_of(log, "5") == ["start", "finish"]
    assert len({pid for _, _, pid in events(log)}) == 1, "one replica process throughout"
    assert open_maps(server.mapper) == 0


@pytest.mark.timeout(240)
def test_a_queued_call_whose_client_disconnects_never_runs(slow_service):
    """With the one replica busy on a long call, a second request waits for it; its client
    leaves, which closes its map; then the first client leaves too. The second input never
    starts, though the replica is free afterwards (a later request is answered at once)."""
    server, log = slow_service
    mapper = server.mapper

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as first_client:
            first = asyncio.create_task(first_client.get("/predict", params={"x": -2}))
            assert await until(lambda: "start" in events_of(log, "-2"), 20), events(log)
            second = asyncio.create_task(disconnect_after(server.url, -3, seconds=2.0))
            assert await until(lambda: open_maps(mapper) == 2, 10), \
                "the second request's call waits for the busy replica"
            await second  # its client disconnected
            assert await until(lambda: open_maps(mapper) == 1, 10), \
                "the disconnect closed the second request's map"
            first.cancel()  # the first client leaves as well
            await asyncio.wait({first})
        assert await until(lambda: open_maps(mapper) == 0, 10), "the first one's map closed"
        assert await until(lambda: "cancelled" in events_of(log, "-2"), 20), events(log)
        return await get_prediction(server.url, 7)  # the replica is free: -3 would run now

    response = asyncio.run(scenario())
    assert (response.status_code, response.json()) == (200, {"x": 7.0, "prediction": 71.0})
    assert events_of(log, "-3") == [], "the call queued behind the long one never started"
    assert events_of(log, "-2") == ["start", "cancelled"]
    assert events_of(log, "7") == ["start", "finish"]
    assert len({pid for _, _, pid in events(log)}) == 1, "one replica process throughout"


@pytest.mark.timeout(240)
def test_the_mapper_stays_usable_after_clients_leave(slow_service):
    """Five clients ask for slow inputs at once and all leave: none of those calls finished
    (each either never started or was cancelled while it ran). Then 20 clients at once each get
    their own answer, each input run exactly once, on the same replica, and no map is left
    open.

    The five leave a few milliseconds apart (each client opens its own connection): when the
    first one's call is cancelled, the replica may start the call of one still connected,
    which is then cancelled in turn. The queued case alone is the test above."""
    server, log = slow_service
    leaving = [-10.0 - i for i in range(5)]
    staying = [100.0 + i for i in range(20)]

    async def scenario() -> list[httpx.Response]:
        await asyncio.gather(*(disconnect_after(server.url, x, seconds=1.5) for x in leaving))
        assert await until(lambda: open_maps(server.mapper) == 0, 10), \
            "every leaving client's map closed"
        return await asyncio.gather(*(get_prediction(server.url, x, timeout=30)
                                      for x in staying))

    responses = asyncio.run(scenario())
    answers = [(response.status_code, response.json()) for response in responses]
    assert answers == [(200, {"x": x, "prediction": 10 * x + 1}) for x in staying]
    left = {f"{x:g}": events_of(log, f"{x:g}") for x in leaving}
    assert all(ran in ([], ["start", "cancelled"]) for ran in left.values()), left
    assert ["start", "cancelled"] in left.values(), "a leaving client's call ran first"
    ran = collections.Counter((event, x) for event, x, _ in events(log)
                              if float(x) in staying)
    assert ran == {(event, f"{x:g}"): 1 for x in staying for event in ("start", "finish")}
    assert len({pid for _, _, pid in events(log)}) == 1, "one replica process throughout"
    assert open_maps(server.mapper) == 0
