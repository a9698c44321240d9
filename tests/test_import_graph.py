"""The package's import graph: no cycles, and the layers point one way.

The graph is read from the source with :mod:`ast` (nothing is imported). Every ``import``
statement is an edge: at module level, inside functions, and under ``if TYPE_CHECKING:``.
A lazy import inside a function only hides a cycle from Python's import machinery; the two
modules still need each other, which is what a reader of the code (and of this test)
should not have to untangle. An edge goes to the module named, or, for
``from package import name``, to the submodule ``package.name`` where there is one, else
to the package's ``__init__``. Importing a submodule also runs its parents' ``__init__``;
that is not counted as an edge (the top-level ``__init__`` re-exports everything, so every
module would otherwise sit in one cycle with it).

Layers, lowest first: ``core`` <- ``experiments`` <- ``widget`` <- ``magic``. A module may
import its own layer and those below; ``core`` imports no front-end library.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import landscape_widget

PACKAGE = "landscape_widget"
ROOT = Path(landscape_widget.__file__).parent

LAYERS = {"core": 0, "experiments": 1, "widget": 2, "magic": 3}
"""Layer of each part of the package (the first component below it); others are unranked."""

FRONT_END = ("ipywidgets", "anywidget", "traitlets", "IPython")
"""Libraries of the notebook front end, which ``core`` must not import."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of ``from <module> import ...`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a module's ``.`` is its package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """``{imported name: line}`` of every import statement in ``path`` (any depth)."""
    tree = ast.parse(path.read_text(), str(path))
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.setdefault(sub if sub in known else base, node.lineno)
    return out


def graph() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """``(edges within the package, all imports)``, both ``{module: {target: line}}``."""
    mods = modules()
    known = set(mods)
    everything = {name: imports_of(name, path, known) for name, path in mods.items()}
    inner = {}
    for name, targets in everything.items():
        inner[name] = {}
        for target, line in targets.items():
            # ``import landscape_widget.core.grid`` names the module itself; the longest
            # known prefix is the module a dotted attribute path ends in.
            while target and target not in known and target.startswith(PACKAGE):
                target = target.rpartition(".")[0]
            if target in known and target != name:
                inner[name][target] = line
    return inner, everything


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~70)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _a_cycle(comp: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """One closed path inside ``comp`` from its first module back to it (breadth first)."""
    members, start = set(comp), comp[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def describe(comp: list[str], edges: dict[str, dict[str, int]]) -> str:
    """One closed path of ``comp`` with the line of each import, and all its modules."""
    cycle = _a_cycle(comp, edges)
    short = [c.removeprefix(PACKAGE + ".") for c in cycle]
    steps = [f"{a} (line {edges[x][y]})"
             for a, (x, y) in zip(short[:-1], itertools.pairwise(cycle), strict=True)]
    members = ", ".join(c.removeprefix(PACKAGE + ".") for c in comp)
    return " -> ".join([*steps, short[-1]]) + f"   [{len(comp)} modules in one cycle: {members}]"


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_the_graph_is_read():
    """The reader finds known edges (of every kind), so an empty cycle list means something."""
    edges, everything = graph()
    assert len(edges) >= 50
    assert "landscape_widget.core.compute" in edges["landscape_widget.core.landscape"]
    # a relative ``from . import x`` to a submodule, and a function-level import
    assert "landscape_widget.datasets" in edges["landscape_widget.demo"]
    assert "landscape_widget.widget" in edges["landscape_widget.magic"]
    assert "torch" in everything["landscape_widget.core.evaluate"]


def test_find_cycles_finds_a_planted_cycle():
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert _a_cycle(["a", "b", "c"], edges) == ["a", "b", "c", "a"]
    assert describe(["x.a", "x.b"], {"x.a": {"x.b": 7}, "x.b": {"x.a": 9}}).startswith(
        "x.a (line 7) -> x.b (line 9) -> x.a")


def test_no_import_cycles():
    edges, _ = graph()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles (module (line of the import) -> ...):\n" + "\n".join(
        describe(c, edges) for c in cycles)


@pytest.mark.parametrize("part", ["core", "experiments", "widget"])
def test_layers_point_down(part):
    edges, everything = graph()
    mine = LAYERS[part]
    bad = []
    for name, targets in edges.items():
        if layer(name) != mine:
            continue
        for target, line in targets.items():
            if (layer(target) or 0) > mine:
                bad.append(f"{name}:{line} imports {target}")
        if part == "core":
            for target, line in everything[name].items():
                if target.split(".")[0] in FRONT_END:
                    bad.append(f"{name}:{line} imports {target} (a front-end library)")
    assert not bad, f"{part} reaches up the layers:\n" + "\n".join(bad)
