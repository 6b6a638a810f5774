"""The house rules a newcomer relies on, checked on the tracked tree: files and functions of a readable
size, no history narrated in tracked files, no private names used across modules, no import circles."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("model", "training", "pipelines", "benchmarks")
PACKAGES = ("model", "training", "pipelines")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    """Dotted module name -> (path, tree) for every tracked Python file of the shipped code."""
    found = {}
    for path in _tracked(*(f"{top}/*.py" for top in SHIPPED)):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


def test_files_and_functions_stay_readable():
    long_files, long_functions = [], []
    for name, (path, tree) in _sources().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def test_tracked_files_describe_the_project_not_its_history():
    diary = re.compile(r"\bsessions? [0-9]+|\bsession-[0-9]+|experiment of[ ]mine", re.IGNORECASE)
    hits = []
    for path in _tracked("*"):
        if path.suffix in {".safetensors", ".parquet", ".png", ".gif", ".mp4", ".npz"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if diary.search(line)]
    assert not hits, hits


def _project_imports(name: str, tree: ast.Module, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import in the module, function-level too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PACKAGES:
                names = [a.name for a in node.names]
                subs = [n for n in names if f"{node.module}.{n}" in modules]
                found.append((node.module, [n for n in names if n not in subs]))
                found += [(f"{node.module}.{n}", []) for n in subs]
    return found


def test_no_private_names_imported_across_modules():
    sources = _sources()
    crossing = [f"{name} imports {n} from {target}"
                for name, (_, tree) in sources.items()
                for target, names in _project_imports(name, tree, set(sources))
                for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossing, crossing


def test_no_import_circles():
    """Function-level imports count: a circle hidden behind one is still a circle. A package's
    __init__ re-exporting its own modules is not a circle."""
    sources = _sources()
    graph = {name: set() for name in sources}
    for name, (_, tree) in sources.items():
        for target, _names in _project_imports(name, tree, set(sources)):
            while target not in sources and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in sources and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles
