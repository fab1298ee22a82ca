"""The user docs build cleanly with MkDocs, and every public name documents an example."""

from __future__ import annotations

import html
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rhmapper as rm

REPO_DIR = Path(__file__).resolve().parent.parent

_EXAMPLE_SECTION = re.compile(r"^\s*Examples?(\s*\([^)]*\))?:\s*$", re.MULTILINE)
"""A Google-style ``Example:`` / ``Examples:`` section header (``Example (inside a replica):`` too)."""

# The API reference must render these objects from their docstrings.
API_OBJECTS = {
    "rhmapper.Mapper.map": rm.Mapper.map,
    "rhmapper.Mapper.imap_unordered": rm.Mapper.imap_unordered,
    "rhmapper.Env": rm.Env,
    "rhmapper.Retries": rm.Retries,
}

MAPPER_MEMBERS = [
    "map", "starmap", "imap", "imap_unordered", "call", "broadcast", "add_replicas",
    "drop_replicas", "wait_ready", "replicas", "replica_names", "num_replicas", "concurrency",
    "spawn_map", "cancel", "stats", "diagnose", "shutdown", "connection",
]


def _page_text(page: Path) -> str:
    """The visible text of an HTML page, tags removed and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def _plain_words(docstring: str) -> str:
    """The longest run of up to four plain words of a docstring's summary line (no markup)."""
    summary = docstring.strip().splitlines()[0]
    runs, run = [], []
    for word in summary.split():
        if re.fullmatch(r"[A-Za-z][A-Za-z,'-]*", word):
            run.append(word)
        else:
            runs.append(run)
            run = []
    runs.append(run)
    best = max(runs, key=len)
    return " ".join(best[:4]).rstrip(",")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO_DIR / "mkdocs.yml"), "--site-dir", str(site_dir)],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return site_dir


def test_docs_build_strict_with_every_page(site: Path) -> None:
    for page in ["index", "getting-started", "concepts", "failure-model", "cluster", "benchmarks",
                 "api"]:
        path = site / "index.html" if page == "index" else site / page / "index.html"
        assert path.is_file(), f"the docs have no page {page}"


def test_api_page_is_rendered_from_docstrings(site: Path) -> None:
    raw = (site / "api" / "index.html").read_text(encoding="utf-8")
    text = _page_text(site / "api" / "index.html")
    assert "Like builtin" in text, "Mapper.map's docstring is missing from the API page"
    for identifier, obj in API_OBJECTS.items():
        assert f'id="{identifier}"' in raw, f"{identifier} has no entry in the API page"
        words = _plain_words(inspect.getdoc(obj) or "")
        assert words and words in text, f"{identifier}'s docstring ({words!r}) is not rendered"
    for member in MAPPER_MEMBERS:
        assert f'id="rhmapper.Mapper.{member}"' in raw, f"Mapper.{member} is not in the API page"
    for name in ["mapper", "module"]:
        assert f'id="rhmapper.{name}.{name}"' in raw, f"rm.{name}() is not in the API page"
    for error in ["RhmapperError", "NoReplicasError", "ReplicaLostError", "UnschedulableError",
                  "MapCancelledError"]:
        assert f'id="rhmapper.{error}"' in raw, f"{error} is not in the API page"


def test_getting_started_includes_the_quickstart_script(site: Path) -> None:
    text = _page_text(site / "getting-started" / "index.html")
    assert "def slow_square" in text and "if __name__ ==" in text


@pytest.mark.parametrize("name", rm.__all__)
def test_every_public_name_has_a_docstring_with_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(rm, name))
    assert doc, f"rhmapper.{name} has no docstring"
    assert _EXAMPLE_SECTION.search(doc) and ">>>" in doc, (
        f"rhmapper.{name}'s docstring has no Example section with a >>> example")


@pytest.mark.parametrize("member", MAPPER_MEMBERS)
def test_every_mapper_verb_has_a_docstring_with_an_example(member: str) -> None:
    doc = inspect.getdoc(getattr(rm.Mapper, member))
    assert doc, f"Mapper.{member} has no docstring"
    assert _EXAMPLE_SECTION.search(doc) and ">>>" in doc, (
        f"Mapper.{member}'s docstring has no Example section with a >>> example")
