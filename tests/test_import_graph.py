"""Specification of the package structure: one direction between the three packages, no cycles.

``cachebind`` is the library and the runtime, ``indexing`` builds indexes, ``jobs`` holds the Ray
job entry points. The flow runs one way: ``jobs`` may import ``indexing`` and ``cachebind``,
``indexing`` may import ``cachebind``, and a ``cachebind`` library module imports neither
(what the runtime reads of the builders' output is ``cachebind.published``). Only the
composition roots (the CLI, the demo, ``python -m cachebind``) see all three.

Every ``import`` counts, including those inside functions (a lazy import hides a dependency,
it does not remove it), and so does every module reached through another.
``from pkg import sub`` depends on the submodule ``sub`` when there is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_files(package: str) -> dict[str, Path]:
    files = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


PACKAGES = ("cachebind", "indexing", "jobs")
ROOTS = ("cachebind.cli", "cachebind.demo", "cachebind.__main__")
"""The composition roots: the only ``cachebind`` modules that may see ``indexing`` and ``jobs``."""


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def distribution_graph() -> dict[str, set[str]]:
    """Every first-party module of the three packages -> the first-party modules it imports."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        files |= module_files(package)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or through others -> the module importing it."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph[node]:
            if nxt not in via and nxt != start:
                via[nxt] = node
                todo.append(nxt)
    return via


def chain(via: dict[str, str], start: str, end: str) -> list[str]:
    path = [end]
    while path[-1] != start:
        path.append(via[path[-1]])
    return path[::-1]


def forbidden_imports(
    graph: dict[str, set[str]], importers: list[str], forbidden: tuple[str, ...]
) -> list[list[str]]:
    """For each importer reaching a module of a ``forbidden`` package, one import chain."""
    found = []
    for start in importers:
        via = reachable(graph, start)
        for module in sorted(via):
            if any(in_package(module, package) for package in forbidden):
                found.append(chain(via, start, module))
                break
    return found


def library_modules(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        name
        for name in graph
        if in_package(name, "cachebind") and not any(in_package(name, r) for r in ROOTS)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle_it_finds():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("package", ["cachebind", "indexing", "jobs"])
def test_package_has_no_import_cycle(package):
    files = module_files(package)
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert len(graph) > 5  # the walk found the package
    assert find_cycle(graph) is None


def test_the_graph_sees_lazy_imports_and_reports_an_indirect_chain(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    if True:\n        from indexing.steps.build import x\n")
    assert imports_of("cachebind.lazy", lazy, {"indexing.steps.build"}) == {"indexing.steps.build"}
    graph = {"cachebind.a": {"cachebind.b"}, "cachebind.b": {"indexing.c"}, "indexing.c": set()}
    assert forbidden_imports(graph, ["cachebind.a"], ("indexing",)) == [
        ["cachebind.a", "cachebind.b", "indexing.c"]
    ]


def test_cachebind_library_modules_never_import_indexing_or_jobs_at_any_depth():
    graph = distribution_graph()
    library = library_modules(graph)
    assert "cachebind.serve.runtime" in library and "cachebind.published.load" in library
    assert not any(in_package(m, "cachebind.cli") for m in library)
    assert forbidden_imports(graph, library, ("indexing", "jobs")) == []


def test_indexing_never_imports_jobs():
    graph = distribution_graph()
    builders = sorted(name for name in graph if in_package(name, "indexing"))
    assert forbidden_imports(graph, builders, ("jobs",)) == []


def test_the_whole_distribution_has_no_import_cycle():
    graph = distribution_graph()
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert find_cycle(graph) is None


ROOMS = {
    "indexing.mechanics": (),
    "indexing.quality": ("indexing.mechanics",),
    "indexing.versions": (),
    "indexing.steps": ("indexing.mechanics", "indexing.quality", "indexing.versions"),
}
"""The rooms of ``indexing`` -> the rooms each may use. FAISS mechanics know no other room; the
quality loop uses only the mechanics; the published versions' writing side uses neither the
quality loop nor the steps; the build steps use them all. No room imports the package's doors
(``indexing`` itself), which import the steps."""


def room_of(module: str) -> str | None:
    return next((room for room in ROOMS if in_package(module, room)), None)


def out_of_bounds(module: str, allowed: set[str | None]) -> bool:
    """The doors, or a module of a room not in ``allowed``."""
    return module == "indexing" or (
        in_package(module, "indexing") and room_of(module) not in allowed
    )


def room_violations(graph: dict[str, set[str]]) -> list[list[str]]:
    """For each module reaching a room it may not use (or the doors), one import chain."""
    found = []
    for start in sorted(graph):
        room = room_of(start)
        if room is None:
            continue
        allowed: set[str | None] = {room, *ROOMS[room]}
        via = reachable(graph, start)
        for module in sorted(via):
            if out_of_bounds(module, allowed):
                path = chain(via, start, module)
                # Up to the first step out of bounds: that import is the one to remove.
                first = next(i for i, m in enumerate(path) if out_of_bounds(m, allowed))
                found.append(path[: first + 1])
                break
    return found


def test_every_indexing_module_lives_in_exactly_one_room():
    modules = [m for m in distribution_graph() if in_package(m, "indexing") and m != "indexing"]
    assert len(modules) > 20  # the walk found the rooms' modules
    assert [m for m in modules if sum(in_package(m, room) for room in ROOMS) != 1] == []


def test_the_rooms_of_indexing_import_each_other_in_one_direction():
    assert room_violations(distribution_graph()) == []


def test_a_room_importing_against_the_direction_is_reported():
    graph = {
        "indexing": {"indexing.steps.build"},
        "indexing.steps.build": {"indexing.versions.publishing"},
        "indexing.versions.publishing": {"indexing.quality.tune"},
        "indexing.quality.tune": {"indexing.mechanics.fit"},
        "indexing.mechanics.fit": set(),
        "indexing.mechanics.ondisk": {"indexing"},
    }
    assert room_violations(graph) == [
        ["indexing.mechanics.ondisk", "indexing"],
        ["indexing.versions.publishing", "indexing.quality.tune"],
    ]
