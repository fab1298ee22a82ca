"""Env: where and how replicas run, as a validated model that turns into Ray actor options.

This module is pure: it imports no Ray and makes no Ray call.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rhmapper.names import replica_name

_MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_memory(value: int | float | str) -> int:
    """Return a memory amount in bytes, from a number of bytes or a string such as "2GiB".

    Examples:
        >>> parse_memory("2GiB"), parse_memory("512MB"), parse_memory(1024)
        (2147483648, 512000000, 1024)
    """
    if isinstance(value, bool):
        raise ValueError(f"memory must be bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        amount = float(value)
    else:
        match = _MEMORY_PATTERN.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _MEMORY_UNITS:
            raise ValueError(
                f"cannot read memory {value!r}: use bytes or a number with a unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '2GiB'"
            )
        amount = float(match.group(1)) * _MEMORY_UNITS[unit]
    if amount < 0:
        raise ValueError(f"memory must not be negative, got {value!r}")
    return int(amount)


class Env(BaseModel):
    """Where and how a mapper's replicas run: a Ray ``runtime_env`` plus a resource request.

    Args:
        name: Auto replicas are Ray named actors ``<name>_replica_<i>`` in namespace
            ``rhmapper``. ``None`` lets the mapper name the env after the function or class.
        reqs: pip requirements installed for the replicas (``runtime_env["pip"]``, or
            ``runtime_env["uv"]`` with ``installer="uv"``). Replicas of one env share them.
        installer: ``"pip"`` or ``"uv"``.
        env_vars: environment variables set in each replica process.
        working_dir: a local folder (or URI) uploaded and used as each replica's working dir.
        py_modules: local modules or packages shipped to the replicas.
        compute: resources per replica: ``CPU``, ``GPU``, ``memory`` (bytes, or a string
            such as ``"2GiB"``); any other key is a custom Ray resource.
        runtime_env: a raw Ray ``runtime_env`` dict merged last (the escape hatch).
        detached: keep replicas alive after the driver exits (Ray ``lifetime="detached"``),
            so a later driver attaches to them by name instead of creating new ones.

    Examples:
        >>> env = Env(name="embed", reqs=["numpy"], compute={"CPU": 0.5, "memory": "1GiB"})
        >>> env.runtime_env()
        {'pip': ['numpy']}
        >>> env.actor_options()["num_cpus"], env.actor_options()["memory"]
        (0.5, 1073741824)
        >>> env.replica(3).name
        'embed_replica_3'
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str | None = None
    reqs: list[str] = Field(default_factory=list)
    installer: Literal["pip", "uv"] = "pip"
    env_vars: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    py_modules: list[str] | None = None
    compute: dict[str, float | int | str] = Field(default_factory=dict)
    raw_runtime_env: dict[str, Any] | None = Field(default=None, alias="runtime_env")
    detached: bool = False

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and not _NAME_PATTERN.match(name):
            raise ValueError(
                f"env name {name!r} must start with a letter or digit and contain only "
                "letters, digits, '_', '.' or '-'"
            )
        return name

    @field_validator("reqs", mode="before")
    @classmethod
    def _check_reqs(cls, reqs: Any) -> Any:
        if isinstance(reqs, str):
            raise ValueError(f"reqs must be a list of requirement strings, e.g. [{reqs!r}]")
        for req in reqs or []:
            if not isinstance(req, str) or not req.strip():
                raise ValueError(f"each requirement must be a non-empty string, got {req!r}")
        return reqs

    @field_validator("compute")
    @classmethod
    def _check_compute(cls, compute: dict[str, float | int | str]) -> dict[str, float | int | str]:
        checked: dict[str, float | int | str] = {}
        for key, amount in compute.items():
            for known in ("CPU", "GPU", "memory"):
                if key != known and key.lower() == known.lower():
                    raise ValueError(f"compute[{key!r}]: resource names are case-sensitive; "
                                     f"did you mean {known!r}?")
            if key == "memory":
                checked[key] = parse_memory(amount)
                continue
            if isinstance(amount, str) or isinstance(amount, bool):
                raise ValueError(f"compute[{key!r}] must be a number, got {amount!r}")
            if amount < 0:
                raise ValueError(f"compute[{key!r}] must not be negative, got {amount!r}")
            checked[key] = amount
        return checked

    def runtime_env(self) -> dict[str, Any]:
        """The Ray ``runtime_env`` dict of this env (the raw ``runtime_env`` merged last).

        Examples:
            >>> Env(reqs=["tqdm"], installer="uv", env_vars={"K": "V"}).runtime_env()
            {'uv': ['tqdm'], 'env_vars': {'K': 'V'}}
        """
        runtime_env: dict[str, Any] = {}
        if self.reqs:
            runtime_env[self.installer] = list(self.reqs)
        if self.env_vars:
            runtime_env["env_vars"] = dict(self.env_vars)
        if self.working_dir is not None:
            runtime_env["working_dir"] = self.working_dir
        if self.py_modules is not None:
            runtime_env["py_modules"] = list(self.py_modules)
        runtime_env.update(self.raw_runtime_env or {})
        return runtime_env

    def actor_options(self) -> dict[str, Any]:
        """Options for ``ActorClass.options()``: resources and runtime_env (and detached lifetime).

        Examples:
            >>> Env(compute={"CPU": 1, "GPU": 0, "disk_ssd": 2}).actor_options()
            {'num_cpus': 1, 'num_gpus': 0, 'resources': {'disk_ssd': 2}}
        """
        options: dict[str, Any] = {}
        resources: dict[str, float] = {}
        for key, amount in self.compute.items():
            if key == "CPU":
                options["num_cpus"] = amount
            elif key == "GPU":
                options["num_gpus"] = amount
            elif key == "memory":
                options["memory"] = amount
            else:
                resources[key] = amount
        if resources:
            options["resources"] = resources
        runtime_env = self.runtime_env()
        if runtime_env:
            options["runtime_env"] = runtime_env
        if self.detached:
            options["lifetime"] = "detached"
        return options

    def resource_request(self) -> dict[str, float]:
        """The resources one replica needs, in Ray's resource names (``CPU``, ``GPU``, ``memory``, …).

        Examples:
            >>> Env(compute={"CPU": 0.5, "memory": "1KiB"}).resource_request()
            {'CPU': 0.5, 'memory': 1024}
        """
        return {key: amount for key, amount in self.compute.items() if amount}

    def replica(self, index: int) -> "Env":
        """The same env, named for its replica ``index``: ``<name>_replica_<index>``.

        Examples:
            >>> Env(name="embed").replica(0).name
            'embed_replica_0'
        """
        if self.name is None:
            raise ValueError("Env.replica() needs a named env: pass Env(name=...)")
        return self.model_copy(update={"name": replica_name(self.name, index)})

    def named(self, name: str) -> "Env":
        """The same env under another name (used to name an env after its function or class).

        Examples:
            >>> Env(compute={"CPU": 1}).named("double").name
            'double'
        """
        return self.model_validate({**self.model_dump(by_alias=True), "name": name})
