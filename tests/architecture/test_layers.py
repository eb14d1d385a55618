"""The package's shape, enforced: layers import downwards only, no cycles, no private names across
modules, no imports of our own modules hidden in functions, no oversized module.

Layers, lowest first (README "Architecture"); a module may import its own layer package and any
lower layer, never a higher one nor a sibling on the same level:

    core -> config -> payload | failover | services -> wire -> node -> agent | sync -> health -> cli
    -> the face (configd, __main__);   halab (dev/: lab, demo) sits above everything and ships apart.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.paths import DEV_ROOT, PACKAGE_ROOT

LAYERS: dict[str, int] = {
    "hasync.core": 0,
    "hasync.config": 1,
    "hasync.payload": 2,
    "hasync.failover": 2,
    "hasync.services": 2,
    "hasync.wire": 3,
    "hasync.node": 4,
    "hasync.agent": 5,
    "hasync.sync": 5,
    "hasync.health": 6,
    "hasync.cli": 7,
    "hasync.configd": 8,
    "hasync.__main__": 8,
    "halab": 9,
}
FACE = {"hasync", "hasync.__main__", "hasync.configd"}  # all the package's top may hold
# In-function imports of our own modules that are deliberate, each with its reason.
LATE_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    ("hasync.failover.factory", "hasync.failover.freebsd"): "OS-specific backend, loaded only on its OS",
    ("hasync.failover.factory", "hasync.failover.linux"): "OS-specific backend, loaded only on its OS",
    ("hasync.cli.commands.common", "hasync.failover.factory"): "the failover layer, only for commands that use it",
}
MAX_LINES = 700


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a module
    names: tuple[str, ...]  # names taken from it (empty for `import x`)
    line: int
    in_function: bool
    type_checking: bool


def module_name(path: Path) -> str:
    root = PACKAGE_ROOT if path.is_relative_to(PACKAGE_ROOT) else DEV_ROOT
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_files() -> list[Path]:
    return sorted([*(PACKAGE_ROOT / "hasync").rglob("*.py"), *(DEV_ROOT / "halab").rglob("*.py")])


MODULES = {module_name(path): path for path in our_files()}


def ours(name: str) -> bool:
    return name.split(".")[0] in {"hasync", "halab"}


def resolve(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, source: str | None = None) -> Iterator[Import]:
    importer = module_name(path)
    tree = ast.parse(source if source is not None else path.read_text(), str(path))

    def walk(node: ast.AST, in_function: bool, type_checking: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if ours(alias.name):
                        yield Import(importer, alias.name, (), child.lineno, in_function, type_checking)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(importer, path, child)
                if not ours(base):
                    continue
                for alias in child.names:  # `from pkg import module` imports the module
                    full = f"{base}.{alias.name}"
                    if full in MODULES:
                        yield Import(importer, full, (), child.lineno, in_function, type_checking)
                    else:
                        yield Import(importer, base, (alias.name,), child.lineno, in_function, type_checking)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, True, type_checking)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from walk(child, in_function, True)
            else:
                yield from walk(child, in_function, type_checking)

    yield from walk(tree, False, False)


def layer_of(module: str) -> tuple[str, int] | None:
    for prefix, rank in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    return None


def layer_violation(edge: Import) -> str | None:
    """Why `edge` points the wrong way (None when it is allowed)."""
    if edge.imported == "hasync":  # the package's face: __version__
        return None
    importer, imported = layer_of(edge.importer), layer_of(edge.imported)
    if importer is None:
        return f"{edge.importer} belongs to no layer (add it to LAYERS or move it into one)"
    if imported is None:
        return f"{edge.imported} belongs to no layer"
    if importer[0] == imported[0]:
        return None
    if imported[1] < importer[1]:
        return None
    kind = "sideways" if imported[1] == importer[1] else "upwards"
    return f"{edge.importer}:{edge.line} imports {edge.imported} {kind} ({importer[0]} -> {imported[0]})"


def all_imports() -> list[Import]:
    return [edge for path in MODULES.values() for edge in imports_of(path)]


def find_cycle(edges: list[Import]) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.type_checking and edge.imported != edge.importer:
            graph.setdefault(edge.importer, set()).add(edge.imported)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def private_crossings(path: Path, source: str | None = None) -> list[str]:
    """Private names (`_x`, not dunders) one of our modules takes from another."""
    found = []
    importer = module_name(path)
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    module_aliases = set()
    for edge in imports_of(path, source):
        for name in edge.names:
            if name.startswith("_") and not name.startswith("__") and edge.imported != importer:
                found.append(f"{importer}:{edge.line} imports {edge.imported}.{name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                base = resolve(importer, path, node) if isinstance(node, ast.ImportFrom) else ""
                full = f"{base}.{alias.name}" if base else alias.name
                if full in MODULES:
                    module_aliases.add(alias.asname or alias.name.split(".")[-1])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{importer}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


# --- the rules ------------------------------------------------------------------------------------


def test_every_module_belongs_to_a_layer_and_the_top_holds_only_the_face() -> None:
    homeless = [name for name in MODULES if name not in FACE and layer_of(name) is None]
    assert not homeless, f"modules outside every layer: {homeless}"
    top = sorted(name for name in MODULES if name.startswith("hasync.") and name.count(".") == 1
                 and MODULES[name].name != "__init__.py")
    assert set(top) <= FACE, f"the package's top holds more than its face: {sorted(set(top) - FACE)}"


def test_imports_point_down_only() -> None:
    violations = [why for edge in all_imports() if (why := layer_violation(edge))]
    assert not violations, "\n".join(violations)


def test_no_import_cycle() -> None:
    assert find_cycle(all_imports()) is None


def test_no_imports_of_our_modules_inside_functions_beyond_the_allowlist() -> None:
    late = [edge for edge in all_imports() if edge.in_function]
    unexpected = [f"{e.importer}:{e.line} imports {e.imported} inside a function" for e in late
                  if (e.importer, e.imported) not in LATE_IMPORTS_ALLOWED]
    assert not unexpected, "\n".join(unexpected)
    assert len(LATE_IMPORTS_ALLOWED) <= 3


def test_no_private_name_crosses_a_module() -> None:
    crossings = [line for path in MODULES.values() for line in private_crossings(path)]
    assert not crossings, "\n".join(crossings)


def test_the_product_never_imports_the_dev_tools_nor_pyroute2() -> None:
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("hasync"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offenders += [f"{name}:{node.lineno} {n}" for n in names if n.split(".")[0] in {"halab", "pyroute2"}]
    assert not offenders


def test_no_module_is_oversized() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {name: size for name, size in sizes.items() if size > MAX_LINES}


# --- controls: each rule catches what it exists for -----------------------------------------------


def _fake(module: str, source: str) -> Path:
    path = PACKAGE_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    MODULES.setdefault(module, path)
    return path


@pytest.mark.parametrize(("importer", "statement", "expected"), [
    ("hasync.config.store", "from hasync.sync.run import SyncRun", "upwards"),
    ("hasync.payload.merge", "from hasync.failover.base import VipSpec", "sideways"),
    ("hasync.core.errors", "from ..wire import xmlrpc", "upwards"),
    ("hasync.health.diff", "from hasync.payload import merge", None),
])
def test_control_an_upward_or_sideways_import_is_caught(importer: str, statement: str, expected: str | None) -> None:
    path = PACKAGE_ROOT.joinpath(*importer.split(".")).with_suffix(".py")
    reasons = [layer_violation(edge) for edge in imports_of(path, statement + "\n")]
    if expected is None:
        assert reasons == [None]
    else:
        assert reasons and all(reason and expected in reason for reason in reasons), reasons


def test_control_a_cycle_is_caught() -> None:
    edges = [Import("hasync.a", "hasync.b", (), 1, False, False), Import("hasync.b", "hasync.c", (), 1, True, False),
             Import("hasync.c", "hasync.a", (), 1, False, False)]
    assert find_cycle(edges) == ["hasync.a", "hasync.b", "hasync.c", "hasync.a"]
    assert find_cycle(edges[:2]) is None


def test_control_late_imports_and_private_names_are_caught() -> None:
    path = PACKAGE_ROOT / "hasync" / "sync" / "run.py"
    source = "from hasync.payload import build\nfrom hasync.payload.build import _vip_section\n\n\n" \
             "def f():\n    from hasync.payload import digest\n    return build._copy_section, digest\n"
    late = [edge for edge in imports_of(path, source) if edge.in_function]
    assert [(e.imported, e.in_function) for e in late] == [("hasync.payload.digest", True)]
    assert private_crossings(path, source) == ["hasync.sync.run:2 imports hasync.payload.build._vip_section",
                                               "hasync.sync.run:7 uses build._copy_section"]
