"""The package's floors (docs/architecture.md), checked on the source: no module imports from a higher floor
(function-level imports included), and no two modules import each other in a circle when they are loaded.

FLOORS is the one place the floors are declared, lowest first. An entry is a module under lorakit
("layers.core"), a package's __init__ ("quant"), or every module of a package ("train.*"). A module
missing from the table fails the test: give it a floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "version", "atomic", "module_tree", "config")),
    ("quantization", ("quant.codes", "quant.steps", "quant.pages", "quant.compiled", "quant.blockwise",
                      "quant.tensor", "quant.linear4bit", "quant.keep", "quant.embedding", "quant.model",
                      "quant.hf_folder")),
    ("base models and assets", ("assets", "models")),
    ("layers", ("layers", "layers.*")),
    ("model state", ("state", "loralib")),
    ("adapter operations", ("adapters", "pissa", "inject", "adapter_files", "adapter_files.*", "adapter_report",
                            "quant.merge")),
    ("adapter arithmetic, analysis and export", ("arithmetic", "arithmetic.*", "analysis", "analysis.*",
                                                 "export", "export.*")),
    ("library API", ("lorakit", "nn", "optim", "quant", "integrations")),
    ("training", ("train", "train.*")),
    ("serving", ("serve", "serve.*")),
    ("command line", ("cli", "__main__")),
]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name ("lorakit.layers.core"; a package by its own name)."""
    found = {}
    for path in sorted((SOURCE / "lorakit").rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _floor(module: str) -> int:
    short = module.removeprefix("lorakit.") if module != "lorakit" else "lorakit"
    for level, (_, entries) in enumerate(FLOORS):
        if short in entries:
            return level
    for level, (_, entries) in enumerate(FLOORS):
        if any(e.endswith(".*") and short.startswith(e[:-1]) for e in entries):
            return level
    raise AssertionError(f"{module} has no floor: add it to FLOORS in tests/test_architecture.py "
                         "(and to docs/architecture.md)")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(lorakit modules imported when `module` loads, lorakit modules imported anywhere in it); imports
    under `if TYPE_CHECKING:` are for type checkers only and count for neither."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    at_load, anywhere = set(), set()

    def visit(node: ast.AST, loading: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            targets = _targets(child, package) if isinstance(child, (ast.Import, ast.ImportFrom)) else set()
            anywhere.update(targets)
            if loading:
                at_load.update(targets)
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, loading and not nested)

    visit(ast.parse(path.read_text()), True)
    at_load.discard(module)
    anywhere.discard(module)
    return at_load, anywhere


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> set[str]:
    """The lorakit modules an import statement loads (`from . import x` loads the module x)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "lorakit"}
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "lorakit":
        return set()
    found = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    if len(found) < len(node.names):
        found.add(base)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_floor():
    for module in MODULES:
        _floor(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_floor(module):
    own = _floor(module)
    upward = sorted(t for t in GRAPH[module][1] if _floor(t) > own)
    assert not upward, (f"{module} ({FLOORS[own][0]}) imports {upward} from higher floors "
                        f"{sorted({FLOORS[_floor(t)][0] for t in upward})}; move the shared code down or the module up")


def test_no_import_cycle_at_load_time():
    """Tarjan's strongly connected components over the imports that run when modules load."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node][0]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            connect(module)
    assert not cycles, f"modules importing each other when loaded: {cycles}"


def test_the_check_sees_imports():
    """The parser finds what the layer core is known to import, so an empty graph cannot pass silently."""
    at_load, _ = GRAPH["lorakit.layers.core"]
    assert {"lorakit.config", "lorakit.errors", "lorakit.layers.variant"} <= at_load
    assert "lorakit.layers.dora" in GRAPH["lorakit.layers"][0]
