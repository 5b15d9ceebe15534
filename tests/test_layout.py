"""The repository's shape: modules of one job, no import circles, scripts as entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sd_endpoint", "model_tools", "benchmarks")
# A module past this many lines is doing more than one job (tests are exempt: one test file
# covers one behaviour area, however many cases that takes).
MAX_LINES = 500


def first_party_modules() -> dict[str, Path]:
    modules = {"handler": ROOT / "handler.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = first_party_modules()


def imported(name: str, path: Path) -> set[str]:
    """The first-party modules that ``name`` imports, anywhere in it (lazy imports count:
    they close a circle as surely at run time)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports the module; `from module import name`
            # imports the module.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_every_module_is_found():
    assert {"handler", "sd_endpoint.engine", "sd_endpoint.schema"} <= MODULES.keys()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_does_one_job_in_at_most_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines"


def test_no_module_imports_itself_through_others():
    graph = {name: imported(name, path) for name, path in MODULES.items()}
    # A package's __init__ importing its own modules is how packages re-export; a module
    # importing its package is then no circle of jobs, so those edges are left out.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_thin_entry_points(path):
    tree = ast.parse(path.read_text())
    defined = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert not defined, f"{path.name} defines {defined}: library code belongs in a package"
    assert len(path.read_text().splitlines()) <= 30


def test_docs_layout_names_every_module():
    text = (ROOT / "docs" / "layout.md").read_text()
    # A package's __main__ is named by its package (`python -m package`).
    modules = [name for name in MODULES if name.count(".") and not name.endswith(".__main__")]
    missing = [name for name in modules if f"`{name.rsplit('.', 1)[-1]}" not in text]
    assert not missing, f"docs/layout.md does not name {missing}"
