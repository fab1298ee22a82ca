"""Item sizes: objects are sized by what they pickle to, so byte-bounded calls see their payloads.

The unit tests need no Ray; the last test maps objects holding megabytes on a real local Ray and
measures each call's payload inside the replica.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys

import numpy as np
import pytest

from rhmapper.sizing import approx_bytes, mean_item_bytes

MIB = 2**20


@dataclasses.dataclass
class Sample:
    """A dataclass holding an array, as a training sample does."""

    label: int
    image: np.ndarray


@dataclasses.dataclass(slots=True)
class SlottedSample:
    label: int
    image: np.ndarray


class Blob:
    """A plain class holding its bytes in an attribute."""

    def __init__(self, index: int, payload: bytes) -> None:
        self.index = index
        self.payload = payload


class Unpicklable:
    def __init__(self) -> None:
        self.payload = b"x" * 1000

    def __reduce__(self):
        raise TypeError("no pickling of Unpicklable")


def _nested(image: np.ndarray) -> dict:
    return {"meta": {"source": "camera"}, "samples": [Sample(1, image), Sample(2, image.copy())]}


@pytest.mark.parametrize("make, expected", [
    (lambda: Sample(1, np.zeros(MIB, dtype=np.uint8)), MIB),
    (lambda: SlottedSample(1, np.zeros(MIB, dtype=np.uint8)), MIB),
    (lambda: Blob(1, b"x" * MIB), MIB),
    (lambda: _nested(np.zeros(MIB // 2, dtype=np.uint8)), MIB),
    (lambda: [Blob(i, b"y" * (MIB // 4)) for i in range(4)], MIB),
    (lambda: np.array([bytes([i]) * (MIB // 4) for i in range(4)], dtype=object), MIB),
], ids=["dataclass with ndarray", "slotted dataclass", "object with bytes", "nested in a dict",
        "list of objects", "object ndarray"])
def test_mean_item_bytes_sees_the_payload_inside_objects(make, expected):
    items = [make() for _ in range(3)]
    estimate = mean_item_bytes(items)
    assert expected <= estimate <= expected + 4096, estimate


def test_mean_item_bytes_is_what_the_item_pickles_to():
    class Local:  # plain pickle refuses a local class: cloudpickle sizes it
        def __init__(self) -> None:
            self.payload = b"q" * 50_000

    with pytest.raises((AttributeError, pickle.PicklingError)):
        pickle.dumps(Local())
    assert 50_000 <= mean_item_bytes([Local()]) <= 52_000
    blob = Blob(3, b"w" * 70_000)
    assert mean_item_bytes([blob]) == len(pickle.dumps(blob, protocol=5))
    record = {"id": 7, "text": "t" * 30_000}
    assert mean_item_bytes([record]) == len(pickle.dumps(record, protocol=5))


def test_an_unpicklable_item_keeps_a_cheap_estimate():
    item = Unpicklable()
    assert mean_item_bytes([item]) == approx_bytes(item) >= 1000


def test_plain_items_are_not_pickled(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain item was pickled")

    from rhmapper import sizing

    monkeypatch.setattr(sizing, "_pickled_bytes", refuse)
    items = [7, 2.5, None, "abc", b"x" * 100, np.zeros(10), (1, "ab", b"cd"), [1.0, 2.0]]
    assert mean_item_bytes(items) == sum(map(approx_bytes, items)) / len(items)


def test_only_a_few_items_of_a_batch_are_pickled(monkeypatch):
    from rhmapper import sizing

    pickled: list = []
    real = sizing._pickled_bytes

    def counting(item):
        pickled.append(item)
        return real(item)

    monkeypatch.setattr(sizing, "_pickled_bytes", counting)
    items = [Blob(i, b"v" * (1000 + i)) for i in range(10_000)]
    estimate = mean_item_bytes(items)
    assert 0 < len(pickled) <= 4
    assert 1000 < estimate < 12_000


def test_approx_bytes_sees_one_level_into_objects():
    """The per-item estimate that sends items of 1 MiB or more by reference: an object holding a
    large array or bytes is as large as they are, without pickling it."""
    image = np.zeros(2 * MIB, dtype=np.uint8)
    assert approx_bytes(Sample(1, image)) >= 2 * MIB
    assert approx_bytes(SlottedSample(1, image)) >= 2 * MIB
    assert approx_bytes(Blob(1, b"x" * (2 * MIB))) >= 2 * MIB
    assert approx_bytes(Blob(1, b"x")) < 1024


def test_object_refs_and_actor_handles_are_never_pickled_to_size_them():
    """Pickling an ObjectRef outside Ray's serialiser pins its object for the driver's life: a
    type from Ray counts as a small stand-in instead."""
    reduced: list = []

    class ObjectRef:  # stands for ray._raylet.ObjectRef: what matters is its module and name
        def __reduce__(self):
            reduced.append(self)
            return (ObjectRef, ())

    ObjectRef.__module__ = "ray._raylet"
    size = mean_item_bytes([ObjectRef(), (ObjectRef(), 1), Blob(1, ObjectRef())])
    assert reduced == [] and 0 < size < 1024


# -- on a real Ray ------------------------------------------------------------------------------

CALL_BOUND = 16 * MIB


def payload_of_its_call(blob: Blob) -> tuple[int, int, int, int]:
    """Run inside a replica: the item's index and first byte, and how many items and bytes of
    payload the call that brought it carried (read from the replica's batch loop)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_call_items":
        frame = frame.f_back
    assert frame is not None, (
        "rhmapper.batch_runner._call_items is not on the stack: update this test")
    items = frame.f_locals["items"]
    return blob.index, blob.payload[0], len(items), sum(len(item.payload) for item in items)


def test_auto_batches_of_objects_holding_megabytes_stay_under_max_call_bytes(ray_local):
    import rhmapper as rm

    blobs = [Blob(index, bytes([index]) * (4 * MIB)) for index in range(24)]
    with rm.mapper(payload_of_its_call, replicas=2, max_call_bytes=CALL_BOUND) as m:
        results = m.map(blobs, batch_size="auto")
    assert [(index, first) for index, first, _, _ in results] == [(i, i) for i in range(24)]
    calls = [(count, size) for _, _, count, size in results]
    assert all(count == 1 or size <= CALL_BOUND for count, size in calls), sorted(set(calls))
    assert max(count for count, _ in calls) > 1, "auto batches never held more than one item"
