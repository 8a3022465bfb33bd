"""Imports point down the layers: no package imports one above it, and no two packages
import each other, counting every import (module level and inside functions).

A package is ``kiln.<first part>``: ``kiln.api.routes.jobs`` belongs to ``api``; a
top-level module (``kiln.bundle``, ``kiln.services``) is a package of its own, and
``kiln`` (its ``__init__``) is the public facade. A new package must be placed in
:data:`LAYERS` before it can be imported.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kiln"

# Highest first; a package may import those in its own layer or below, never above.
# It mirrors the layers of ARCHITECTURE.md ("Layers (imports point downward only)"),
# with what the code teaches made explicit: the wiring that assembles processes and
# the application sits above the edges it assembles, and the shared services object
# between the HTTP layer and the SDK.
LAYERS: list[set[str]] = [
    {"kiln"},  # the package __init__: the public API facade; may import anything
    {"cli"},
    {"server", "standalone", "app"},  # wiring: processes and the assembled application
    {"web"},  # the dashboard; may use api's schemas and auth
    {"api"},
    {"services"},  # Services: what the API, the dashboard and the wiring share
    {"client"},  # the Python SDK
    {"jobs", "serve", "monitor", "workflow", "lm_workflow"},  # services; workflow is kiln.fit
    {"store"},
    {"compress"},  # operates on bundles
    {"bundle", "manifest", "lm_bundle", "lm_bundle_files"},
    {"train"},  # train may import evaluate, never the reverse
    {"evaluate"},
    {"runtime"},  # device, precision, backends
    {"data", "models"},
    {"spec"},
    {"settings", "archive"},
    {"errors", "lifecycle"},  # the bottom: they import nothing of ours
]


@dataclass(frozen=True)
class Import:
    """``module`` imports ``name`` (a module, or the ``kiln`` package) at ``line``;
    ``symbols``: the names a ``from name import ...`` takes from it."""

    module: str
    line: int
    name: str
    symbols: tuple[str, ...] = ()

    def __str__(self) -> str:
        what = ", ".join(f"{self.name}.{s}" for s in self.symbols) or self.name
        return f"{self.module}:{self.line} imports {what}"


def module_name(path: Path, root: Path) -> str:
    """``kiln.api.app`` for ``<root>/api/app.py``; ``kiln.api`` for its ``__init__.py``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import of our own package in ``path``, wherever it stands in the file."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: dict[str, tuple[str, ...]]
        if isinstance(node, ast.Import):
            targets = {alias.name: () for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            targets = _from_targets(node, package, root)
        else:
            continue
        found += [
            Import(module, node.lineno, name, symbols)
            for name, symbols in targets.items()
            if _ours(name, root.name)
        ]
    return found


def _from_targets(node: ast.ImportFrom, package: str, root: Path) -> dict[str, tuple[str, ...]]:
    """The modules a ``from ... import`` reaches, each with the names taken from it: a
    relative base is resolved against the importing package, and an imported name
    that is itself a submodule is reached as that module."""
    if node.level:
        base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets: dict[str, tuple[str, ...]] = {}
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if _is_module(sub, root):
            targets.setdefault(sub, ())
        elif base == root.name and alias.name in _own_definitions(root):
            continue  # the facade's own metadata (__version__), not what it re-exports
        else:
            targets[base] = (*targets.get(base, ()), alias.name)
    return targets


def _ours(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def _is_module(name: str, root: Path) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return name.startswith(root.name + ".") and (
        (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()
    )


def _own_definitions(root: Path) -> set[str]:
    """Names the root ``__init__`` assigns itself (``__version__``): importing one runs
    nothing but the root's own imports, which are checked as the root's edges."""
    init = root / "__init__.py"
    if not init.is_file():
        return set()
    tree = ast.parse(init.read_text())
    return {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id.startswith("__") and target.id != "__all__"
    }


def package_of(module: str) -> str:
    """``api`` for ``kiln.api.routes.jobs``; ``kiln`` for the root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def all_imports(root: Path) -> list[Import]:
    return [i for path in sorted(root.rglob("*.py")) for i in imports_of(path, root)]


def packages(root: Path) -> set[str]:
    """Every package of the tree: its subpackages, its top-level modules, and the root."""
    found = {root.name}
    for path in root.iterdir():
        if path.is_dir() and (path / "__init__.py").is_file():
            found.add(path.name)
        elif path.suffix == ".py" and path.name != "__init__.py":
            found.add(path.stem)
    return found


def _between_packages(imports: Iterable[Import]) -> list[tuple[str, str, Import]]:
    edges = [(package_of(i.module), package_of(i.name), i) for i in imports]
    return [(a, b, i) for a, b, i in edges if a != b]


def cycle_violations(imports: Iterable[Import]) -> list[str]:
    """Each import that lies on a cycle of packages (its target reaches back to it)."""
    edges = _between_packages(imports)
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, _ in edges:
        graph[a].add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return sorted(
        f"cycle {a} -> {b}: {i} (and {b} reaches {a})" for a, b, i in edges if reaches(b, a)
    )


def order_violations(imports: Iterable[Import], layers: list[set[str]]) -> list[str]:
    """Each import of a package in a higher layer (or of one no layer holds)."""
    rank = {name: level for level, names in enumerate(layers) for name in names}
    out = []
    for a, b, i in _between_packages(imports):
        if a not in rank or b not in rank:
            out.append(f"unplaced: {i} ({a} -> {b})")
        elif rank[b] < rank[a]:
            out.append(f"upward: {i} ({a}, layer {rank[a]}, -> {b}, layer {rank[b]})")
    return sorted(out)


def test_no_cycle_between_packages() -> None:
    violations = cycle_violations(all_imports(SRC))
    assert not violations, "\n".join(violations)


def test_imports_point_down_the_layers() -> None:
    violations = order_violations(all_imports(SRC), LAYERS)
    assert not violations, "\n".join(violations)


def test_every_package_is_placed_once() -> None:
    placed = [name for layer in LAYERS for name in layer]
    assert len(placed) == len(set(placed)), "a package is in two layers"
    assert set(placed) == packages(SRC), (
        f"not placed: {sorted(packages(SRC) - set(placed))}; "
        f"no such package: {sorted(set(placed) - packages(SRC))}"
    )


# --- the checker itself, on a tiny tree made here -------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``pkg``: ``low`` at the bottom, ``high`` above it; ``low`` imports ``high`` inside
    a function (relative), ``high`` imports ``low`` at the top, and ``pkg`` its version."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": '__version__ = "1"\n',
        "low/__init__.py": "",
        "low/core.py": "def f():\n    from ..high import api\n    return api\n",
        "high/__init__.py": "",
        "high/api.py": "import pkg.low.core\nfrom pkg import __version__\n",
        "high/more.py": "from pkg.low import core\nfrom . import api\n"
        "from ..low.core import f, g\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_parser_finds_in_function_relative_and_submodule_imports(tree: Path) -> None:
    assert set(all_imports(tree)) == {
        Import("pkg.low.core", 2, "pkg.high.api"),
        Import("pkg.high.api", 1, "pkg.low.core"),
        Import("pkg.high.more", 1, "pkg.low.core"),
        Import("pkg.high.more", 2, "pkg.high.api"),
        Import("pkg.high.more", 3, "pkg.low.core", ("f", "g")),
    }
    assert packages(tree) == {"pkg", "low", "high"}


def test_the_checker_fails_on_a_cycle_and_an_upward_import(tree: Path) -> None:
    imports = all_imports(tree)
    cycles = cycle_violations(imports)
    assert len(cycles) == 4 and "pkg.low.core:2 imports pkg.high.api" in cycles[3]
    assert "pkg.high.more:3 imports pkg.low.core.f, pkg.low.core.g" in cycles[2]
    assert order_violations(imports, [{"high"}, {"low"}]) == [
        "upward: pkg.low.core:2 imports pkg.high.api (low, layer 1, -> high, layer 0)"
    ]
    assert order_violations(imports, [{"high"}]) == [
        "unplaced: pkg.high.api:1 imports pkg.low.core (high -> low)",
        "unplaced: pkg.high.more:1 imports pkg.low.core (high -> low)",
        "unplaced: pkg.high.more:3 imports pkg.low.core.f, pkg.low.core.g (high -> low)",
        "unplaced: pkg.low.core:2 imports pkg.high.api (low -> high)",
    ]


def test_the_checker_passes_a_graph_that_points_down(tree: Path) -> None:
    downward = [i for i in all_imports(tree) if not i.module.startswith("pkg.low")]
    assert cycle_violations(downward) == []
    assert order_violations(downward, [{"high"}, {"low"}]) == []
