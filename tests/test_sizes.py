"""No module of the package over `MAX_MODULE_LINES` lines, no class over `MAX_CLASS_LINES`
(issue 19, part 4): a room that grows past them gets split by job.

Ray-free: the modules are parsed with `ast`, never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "rhmapper"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


def oversized(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """``path: N lines`` for each module over `MAX_MODULE_LINES` and ``path: Class: N lines``
    for each class over `MAX_CLASS_LINES` (nested classes too)."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        relative = path.relative_to(package_dir.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{relative}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    found.append(f"{relative}: {node.name}: {lines} lines")
    return found


def test_no_module_or_class_is_oversized():
    too_big = oversized()
    assert not too_big, (f"over {MAX_MODULE_LINES} lines a module, {MAX_CLASS_LINES} a class "
                         "(split it by job):\n" + "\n".join(too_big))


def test_the_walk_measures_classes_and_modules(tmp_path):
    package = tmp_path / "rhmapper"
    package.mkdir()
    (package / "small.py").write_text("class Small:\n    x = 1\n")
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_CLASS_LINES))
    (package / "big.py").write_text("class Outer:\n    class Big:\n" + body.replace("    ", "        "))
    (package / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert oversized(package) == [
        f"rhmapper/big.py: Outer: {MAX_CLASS_LINES + 2} lines",
        f"rhmapper/big.py: Big: {MAX_CLASS_LINES + 1} lines",
        f"rhmapper/long.py: {MAX_MODULE_LINES + 1} lines"]
