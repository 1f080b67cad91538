"""No import cycles between app's top-level parts (api, cli, service, store, allocation,
simulation, profiler, and the top-level modules), read from the source (every import, also
those inside functions), and no import of the client package or the harness anywhere in app/."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names; relative imports resolved), with lines."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            # `from app import api`: the names may be subpackages
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def part_graph(root: Path) -> dict[str, dict[str, str]]:
    """part -> part it imports -> where (file:line); a part is a top-level subpackage or
    module of the package at ``root``."""
    top = root.name
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root).split(".")
        if len(source) < 2:
            continue  # the package's own __init__
        for module, line in imported_modules(path, root):
            target = module.split(".")
            if len(target) < 2 or target[0] != top or target[1] == source[1]:
                continue
            if (root / target[1]).is_dir() or (root / f"{target[1]}.py").exists():
                graph[source[1]].setdefault(target[1], f"{path.relative_to(root)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle through each edge that lies on one (as part names, first = last)."""
    found = []
    for source, targets in graph.items():
        for target in targets:
            path = _path(graph, target, source)
            if path is not None:
                found.append([source, *path])
    return found


def _path(graph: dict[str, dict[str, str]], start: str, goal: str) -> list[str] | None:
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        if node == goal:
            path = [node]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])  # type: ignore[arg-type]
            return path[::-1]
        for nxt in graph.get(node, {}):
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return None


def test_the_graph_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    pkg = tmp_path / "app"
    for part in ("api", "demo"):
        (pkg / part).mkdir(parents=True)
        (pkg / part / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "api" / "commands.py").write_text("def serve():\n    from app.demo import runner\n")
    (pkg / "demo" / "runner.py").write_text("from ..api import commands\n")
    (pkg / "cli.py").write_text("from app import api\n")
    graph = part_graph(pkg)
    assert graph == {
        "api": {"demo": "api/commands.py:2"},
        "demo": {"api": "demo/runner.py:1"},
        "cli": {"api": "cli.py:1"},
    }
    assert ["api", "demo", "api"] in cycles(graph)


def test_no_import_cycle_between_the_parts_of_app() -> None:
    graph = part_graph(APP)
    assert {"api", "cli", "service", "store", "allocation", "simulation"} <= {
        *graph,
        *(t for targets in graph.values() for t in targets),
    }
    found = cycles(graph)
    where = [" -> ".join(cycle) + f" ({graph[cycle[0]][cycle[1]]})" for cycle in found]
    assert found == [], where


def test_app_never_imports_the_client_package_or_the_harness() -> None:
    offenders = [
        f"{path.relative_to(APP.parent)}:{line} {module}"
        for path in sorted(APP.rglob("*.py"))
        for module, line in imported_modules(path, APP)
        if module.split(".")[0] in ("bprr_client", "bprr_harness")
    ]
    assert offenders == []
