"""An async web service over rhmapper replicas: each request awaits ``m.acall(...)``.

Run it with ``python examples/async_service.py`` (needs ``pip install starlette uvicorn``): with
no Ray cluster around, the mapper starts a local Ray itself. It serves on 127.0.0.1:8000:

    curl 'http://127.0.0.1:8000/predict?x=3'
    {"x":3.0,"prediction":6.5}

What it shows:
  * the mapper is made once, when the app starts (Starlette's ``lifespan``), and shut down when
    the server stops; every request shares its two replicas, each of which built its `Model` once;
  * a handler awaits ``m.acall(x)``: the event loop never blocks, so many requests can wait for
    the replicas at once (one thread of rhmapper drives all their calls, whatever their number);
  * a client that disconnects cancels its call (`cancel_on_disconnect`). Starlette does not
    cancel a handler whose client went away, so the helper races the call against the
    ``http.disconnect`` message and cancels the call if the client leaves first: a call still
    waiting for a replica never runs, and a running call of an ``async def`` method is cancelled
    in Ray (a running plain ``def`` method finishes its item, as Ray cannot interrupt it, and
    its answer is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import rhmapper as rm

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left before its answer (nginx's code)."""


class Model:
    """A toy model: slow to load (once per replica), quick to predict."""

    def __init__(self, weight: float = 2.0, bias: float = 0.5) -> None:
        time.sleep(0.5)  # stands in for loading weights
        self.weight, self.bias = weight, bias

    def predict(self, x: float) -> float:
        """The model's answer for ``x``."""
        time.sleep(0.01)  # stands in for the real work
        return self.weight * x + self.bias


def make_mapper() -> rm.Mapper:
    """The service's mapper: two replicas of `Model`, each with its own copy of the model."""
    return rm.mapper(Model, method="predict", replicas=2)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its call was cancelled."""


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client of ``request`` has disconnected (the ASGI ``http.disconnect``
    message; call it only once the request's body was read, as it reads the messages)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass  # more of the body: this endpoint reads none


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (e.g. ``m.acall(x)``) unless the client of ``request`` disconnects first:
    then cancel it, wait until it is cancelled (for an ``acall``: until its Ray call is), and
    raise `ClientDisconnected`. If the handler itself is cancelled, ``work`` is too."""
    call = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (call, gone):
            task.cancel()  # nothing, for the one that finished
        await asyncio.wait({call, gone})  # an acall returns once its map has closed
    if call.cancelled():
        raise ClientDisconnected(f"the client of {request.url.path} disconnected")
    return call.result()  # its value, or the exception it raised


async def predict(request: Request) -> Response:
    """``GET /predict?x=3``: the model's prediction for ``x``, from one of the replicas."""
    try:
        x = float(request.query_params["x"])
    except (KeyError, ValueError):
        return JSONResponse({"error": "pass a number: /predict?x=3"}, status_code=400)
    mapper: rm.Mapper = request.app.state.mapper
    try:
        prediction = await cancel_on_disconnect(request, mapper.acall(x))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: the client is gone
    return JSONResponse({"x": x, "prediction": prediction})


def create_app(make: Callable[[], rm.Mapper] = make_mapper) -> Starlette:
    """The service: ``GET /predict?x=...`` answered by a mapper made by ``make`` when the app
    starts (its replicas ready before the first request) and shut down when it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        mapper = make()  # in the loop's thread: a Ray it starts gets the main thread's signals
        try:
            await asyncio.to_thread(mapper.wait_ready, 300)
            app.state.mapper = mapper
            yield
        finally:
            await asyncio.to_thread(mapper.shutdown)

    return Starlette(routes=[Route("/predict", predict)], lifespan=lifespan)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(), host="127.0.0.1", port=8000)
