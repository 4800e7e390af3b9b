"""The house rule, checked on the code: layers import downwards only, no import cycles, and
no module over 600 lines.

Every ``import`` counts, also one inside a function or under ``TYPE_CHECKING``: a cycle hidden
that way is still a cycle for the reader. Run alone with ``pytest tests/unit/test_layers.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
MAX_LINES = 600

# Top to bottom. A module may import its own layer's package and anything below it; never a
# layer above, and never a peer package on its own layer (server, agent and lab know nothing
# of each other: they meet only over HTTP).
LAYERS: list[list[str]] = [
    ["bench"],
    ["qmotion.__main__"],
    ["qmotion.cli"],
    ["qmotion.server", "qmotion.agent", "qmotion.lab"],
    ["qmotion.drs", "qmotion.hypervisor"],
    ["qmotion.migration", "qmotion.client", "qmotion.image", "qmotion.pki"],
    # The ground floor: wire models and the guest's wire protocol (probe), shared by all.
    [
        "qmotion.api",
        "qmotion.probe",
        "qmotion.errors",
        "qmotion.paths",
        "qmotion.locks",
        "qmotion.logs",
        "qmotion",
    ],
]

# Inside the manager and the agent: rooms, top to bottom. A module not named here is in the
# package's base, which every room may use and which uses no room.
ROOMS: dict[str, list[list[str]]] = {
    "qmotion.server": [
        ["qmotion.server.main"],
        ["qmotion.server.http"],
        ["qmotion.server.console"],
        ["qmotion.server.automation"],
        ["qmotion.server.tasks"],
    ],
    "qmotion.agent": [
        ["qmotion.agent.main"],
        ["qmotion.agent.app"],
        ["qmotion.agent.migration"],
        ["qmotion.agent.disks"],
        ["qmotion.agent.vms"],
        # Host facts and metrics: read by the VMs (their processes) and the API, they read
        # the host network's bridges.
        ["qmotion.agent.facts"],
        ["qmotion.agent.network"],
    ],
}


def module_name(path: Path) -> str:
    if path.is_relative_to(SRC):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*(SRC / "qmotion").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    return {module_name(p): p for p in sorted(files)}


MODULES = sources()


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (the module itself for ``from M import name``
    where name is a module of M, as ``from qmotion.agent import images`` is)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES or m.split(".")[0] in ("qmotion", "bench")}


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def owner(module: str, groups: list[list[str]]) -> int | None:
    """The index of the layer holding ``module`` (the longest matching prefix wins)."""
    best: tuple[int, int] | None = None
    for i, layer in enumerate(groups):
        for prefix in layer:
            # The root package is its __init__ alone: a new top-level package must be placed
            # on a layer by name, not land on the ground floor by default.
            inside = module.startswith(prefix + ".") and prefix != "qmotion"
            if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def package_of(module: str, groups: list[list[str]]) -> str | None:
    hits = [p for layer in groups for p in layer if module == p or module.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def upward_imports() -> list[str]:
    bad = []
    for src, targets in GRAPH.items():
        for dst in sorted(targets):
            a, b = owner(src, LAYERS), owner(dst, LAYERS)
            if a is None or b is None:
                continue
            pa, pb = package_of(src, LAYERS), package_of(dst, LAYERS)
            if b < a or (a == b and pb not in (pa, "qmotion")):
                bad.append(f"{src} -> {dst}")
                continue
            if pa == pb and pa in ROOMS:
                rooms = ROOMS[pa]
                ra, rb = owner(src, rooms), owner(dst, rooms)
                base = len(rooms)
                ra = base if ra is None else ra
                rb = base if rb is None else rb
                same_room = ra == rb and package_of(src, rooms) == package_of(dst, rooms)
                if rb < ra or (ra == rb and ra != base and not same_room):
                    bad.append(f"{src} -> {dst}")
    return bad


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
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
                found.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_every_module_is_on_a_layer() -> None:
    assert [m for m in MODULES if owner(m, LAYERS) is None] == []


def test_layers_import_downwards_only() -> None:
    assert upward_imports() == []


def test_no_import_cycles() -> None:
    assert cycles() == []


TESTS = {module_name(p): p for p in sorted((ROOT / "tests").rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(MODULES.keys() | TESTS.keys()))
def test_no_module_over_600_lines(name: str) -> None:
    """Sources, benchmarks and tests alike (the C guest sources aside)."""
    lines = len({**MODULES, **TESTS}[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_every_package_says_what_lives_there_and_what_it_may_import() -> None:
    for path in (SRC / "qmotion").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc, f"{path.relative_to(ROOT)} has no docstring"
        assert "import" in doc.lower(), f"{path.relative_to(ROOT)} does not say what it may import"


def test_the_checker_sees_an_upward_import_and_a_cycle() -> None:
    """The rule can fail: an API model importing the planner, and two modules importing each
    other, are both reported."""
    saved = {k: set(v) for k, v in GRAPH.items()}
    try:
        GRAPH["qmotion.api.vm"].add("qmotion.drs.planner")
        GRAPH["qmotion.server.inventory"].add("qmotion.server.tasks.runner")
        GRAPH["qmotion.paths"].add("qmotion.locks")
        GRAPH["qmotion.locks"].add("qmotion.paths")
        assert owner("qmotion.web.pages", LAYERS) is None  # a new package is on no layer yet
        assert "qmotion.api.vm -> qmotion.drs.planner" in upward_imports()
        assert "qmotion.server.inventory -> qmotion.server.tasks.runner" in upward_imports()
        assert ["qmotion.locks", "qmotion.paths"] in cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
