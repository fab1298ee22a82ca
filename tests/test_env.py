"""Env validation and conversion to Ray options: pure, no Ray."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import rhmapper as rm
from rhmapper.env import parse_memory


def test_runtime_env_from_fields() -> None:
    env = rm.Env(name="embed", reqs=["numpy==2.0"], env_vars={"K": "V"}, working_dir="/src",
                 py_modules=["/lib/mod"], runtime_env={"env_vars": {"K": "W"}, "config": {"x": 1}})
    assert env.runtime_env() == {
        "pip": ["numpy==2.0"], "env_vars": {"K": "W"}, "working_dir": "/src",
        "py_modules": ["/lib/mod"], "config": {"x": 1},
    }
    assert rm.Env(reqs=["tqdm"], installer="uv").runtime_env() == {"uv": ["tqdm"]}
    assert rm.Env().runtime_env() == {}


def test_actor_options_map_compute_keys() -> None:
    env = rm.Env(name="e", compute={"CPU": 0.5, "GPU": 1, "memory": "2GiB", "my_resource": 1},
                 reqs=["x"])
    assert env.actor_options() == {
        "num_cpus": 0.5, "num_gpus": 1, "memory": 2 * 2**30,
        "resources": {"my_resource": 1}, "runtime_env": {"pip": ["x"]},
    }
    assert rm.Env(detached=True).actor_options() == {"lifetime": "detached"}


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5 KiB", 1536), ("100", 100), (1024, 1024),
    ("3g", 3 * 10**9),
])
def test_memory_units(text, expected) -> None:
    assert parse_memory(text) == expected


def test_replica_naming() -> None:
    env = rm.Env(name="embed", compute={"CPU": 1})
    assert env.replica(3).name == "embed_replica_3"
    assert env.replica(3).compute == env.compute
    with pytest.raises(ValueError, match="named env"):
        rm.Env().replica(0)


@pytest.mark.parametrize("fields, field_name, words", [
    ({"nmae": "x"}, "nmae", "Extra inputs are not permitted"),
    ({"compute": {"CPU": -1}}, "compute", "must not be negative"),
    ({"compute": {"memory": "lots"}}, "compute", "cannot read memory 'lots'"),
    ({"compute": {"memory": "-2GiB"}}, "compute", "cannot read memory"),
    ({"compute": {"GPU": "one"}}, "compute", "must be a number"),
    ({"reqs": ["numpy", 3]}, "reqs", "non-empty string"),
    ({"reqs": "numpy"}, "reqs", "must be a list"),
    ({"installer": "conda"}, "installer", "'pip' or 'uv'"),
    ({"name": "bad name!"}, "name", "must start with a letter or digit"),
    ({"env_vars": {"K": 1}}, "env_vars", "valid string"),
])
def test_invalid_env_names_the_field(fields, field_name, words) -> None:
    with pytest.raises(ValidationError) as raised:
        rm.Env(**fields)
    message = str(raised.value)
    assert field_name in message
    assert words in message


def test_env_is_immutable_and_renamable() -> None:
    env = rm.Env(compute={"CPU": 1}, runtime_env={"pip": ["a"]})
    with pytest.raises(ValidationError):
        env.name = "other"
    named = env.named("fn")
    assert named.name == "fn" and named.runtime_env() == {"pip": ["a"]}
