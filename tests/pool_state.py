"""A stateful class for the named-pool tests' subprocess drivers (importable by the workers)."""

from __future__ import annotations

import os

import ray


class Store:
    """Holds a value loaded once per replica; reports it with where it runs."""

    def __init__(self) -> None:
        self.value = None

    def load(self, value):
        self.value = value
        return os.getpid()

    def get(self, item):
        return {"value": self.value, "item": item, "pid": os.getpid(),
                "actor_id": ray.get_runtime_context().get_actor_id()}
