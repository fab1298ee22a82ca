"""Per-Env environments on the session's local Ray: pip and uv requirements, env_vars, working_dir.

Installs are slow, so the tests share as few envs as they can: one pip env (also carrying
env_vars) for three tests, and one uv env, both installing side by side from the module's first
test on, while the tests before theirs run; working_dir / py_modules get an env without reqs.
Each env pins a different version of ``tabulate``, a tiny pure-Python package the driver's venv
does not have, so a replica can only import it from the environment its own Env installed.
"""

from __future__ import annotations

import importlib.util
import os
import textwrap

import pytest

import rhmapper as rm

pytestmark = pytest.mark.usefixtures("ray_local")

PACKAGE = "tabulate"
PIP_VERSION = "0.9.0"
UV_VERSION = "0.8.10"


class Probe:
    """What a replica sees of its environment."""

    def installed(self, _item):
        import importlib.metadata
        import sys

        import tabulate

        return {
            "version": tabulate.__version__,
            "dist_version": importlib.metadata.version("tabulate"),
            "file": tabulate.__file__,
            "prefix": sys.prefix,
            "pid": os.getpid(),
        }

    def env_var(self, name):
        return os.environ.get(name)

    def read(self, relative_path):
        with open(relative_path) as handle:
            return handle.read()

    def helper(self, x):
        import rhm_wd_helper  # a module of the working_dir, importable by name

        return rhm_wd_helper.triple(x)

    def shipped(self, x):
        import rhm_shipped  # a package shipped with py_modules

        return rhm_shipped.negate(x)


UV_ENV = rm.Env(name="rte_uv", reqs=[f"{PACKAGE}=={UV_VERSION}"], installer="uv",
                compute={"CPU": 0.5})


def installing(env: rm.Env, replicas: int):
    """A mapper of `Probe` over ``env`` (not waited for: Ray installs the env meanwhile), shut
    down after the module's tests."""
    m = rm.mapper(rm.module(Probe), method="installed", replicas=replicas, env=env)
    try:
        yield m
    finally:
        m.shutdown()


@pytest.fixture(scope="module", autouse=True)
def pip_mapper(ray_session):
    """The pip env's mapper, made as the module's first test starts: Ray installs its env and
    the uv one (the slowest set-ups here, each a copy of the driver's venv and an install) side
    by side, while the tests before theirs run (the pip ones are last in the module)."""
    env = rm.Env(name="rte_pip", reqs=[f"{PACKAGE}=={PIP_VERSION}"],
                 env_vars={"RHM_GREETING": "hello from the env"}, compute={"CPU": 0.5})
    yield from installing(env, replicas=2)


@pytest.fixture(scope="module", autouse=True)
def uv_mapper(ray_session):
    """The uv env's mapper, made as the module's first test starts (see `pip_mapper`)."""
    yield from installing(UV_ENV, replicas=1)


@pytest.fixture(scope="module")
def pip_pool(pip_mapper):
    pip_mapper.wait_ready(timeout=240)
    return pip_mapper


def test_driver_lacks_the_package():
    assert importlib.util.find_spec(PACKAGE) is None, (
        f"{PACKAGE} is installed in the driver's venv: pick a package the driver lacks")


@pytest.fixture
def local_dirs(tmp_path):
    working_dir = tmp_path / "working_dir"
    working_dir.mkdir()
    (working_dir / "data.txt").write_text("payload from the working_dir\n")
    (working_dir / "rhm_wd_helper.py").write_text(textwrap.dedent("""
        def triple(x):
            return 3 * x
    """))
    package = tmp_path / "modules" / "rhm_shipped"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def negate(x):\n    return -x\n")
    return str(working_dir), str(package)


def test_working_dir_given_as_a_node_local_uri_reaches_the_replicas(local_dirs):
    # local://<absolute path>: a folder that exists at that path on every node (no upload).
    working_dir, _ = local_dirs
    env = rm.Env(name="rte_wd_uri", working_dir=f"local://{working_dir}", compute={"CPU": 0.5})
    with rm.mapper(rm.module(Probe), method="helper", replicas=2, env=env) as m:
        assert m.broadcast("read", "data.txt") == ["payload from the working_dir\n"] * 2
        assert m.map(range(5)) == [0, 3, 6, 9, 12]


def test_local_working_dir_and_py_modules_reach_the_replicas(local_dirs):
    working_dir, package = local_dirs
    env = rm.Env(name="rte_wd", working_dir=working_dir, py_modules=[package],
                 compute={"CPU": 0.5})
    with rm.mapper(rm.module(Probe), method="helper", replicas=2, env=env) as m:
        assert m.broadcast("read", "data.txt") == ["payload from the working_dir\n"] * 2
        assert m.map(range(5)) == [0, 3, 6, 9, 12]
        assert m.map(range(3), method="shipped") == [0, -1, -2]


def test_reqs_are_installed_with_uv(uv_mapper):
    assert UV_ENV.runtime_env() == {"uv": [f"{PACKAGE}=={UV_VERSION}"]}
    reports = uv_mapper.wait_ready(timeout=240).map(range(3))
    assert {r["version"] for r in reports} == {UV_VERSION}
    assert {r["dist_version"] for r in reports} == {UV_VERSION}


def test_reqs_are_installed_per_env_with_pip(pip_pool):
    reports = pip_pool.map(range(8), batch_size=1)
    assert {r["version"] for r in reports} == {PIP_VERSION}
    assert {r["dist_version"] for r in reports} == {PIP_VERSION}
    # Installed into the env's own virtualenv, not the driver's.
    assert all(not r["file"].startswith(os.path.realpath(os.sys.prefix)) for r in reports)


def test_replicas_of_one_env_share_one_installed_environment(pip_pool):
    reports = pip_pool.broadcast("installed", None)
    assert len({r["pid"] for r in reports}) == 2, "two replicas, two processes"
    assert len({r["prefix"] for r in reports}) == 1, reports
    assert len({os.path.dirname(r["file"]) for r in reports}) == 1, reports
    # Ray caches the installed environment by its requirements: a later mapper reuses it.
    again = rm.Env(name="rte_pip_again", reqs=[f"{PACKAGE}=={PIP_VERSION}"], compute={"CPU": 0.5})
    with rm.mapper(rm.module(Probe), method="installed", replicas=1, env=again) as m:
        (report,) = m.broadcast("installed", None)
    assert report["prefix"] == reports[0]["prefix"]


def test_env_vars_reach_the_replicas(pip_pool):
    assert pip_pool.map(["RHM_GREETING"] * 4, method="env_var", batch_size=1) == [
        "hello from the env"] * 4
    # The session's runtime_env env_vars are merged in, not replaced.
    assert all(pip_pool.broadcast("env_var", "PYTHONPATH"))
