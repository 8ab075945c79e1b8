"""The layers of ../shared/DESIGN.md, held by parsing every import in src/lite_llm.

Function-level (lazy) imports count like top-level ones: a dependency is a dependency even when
it is deferred.  Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted.  Each layer may import only from layers above it in LAYERS; modules of one
layer may import each other, but no set of modules may import each other in a cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "src" / "lite_llm"

# Top to bottom, as DESIGN.md draws them; a module may import only from its own layer or above.
LAYERS = [
    {"errors", "version"},
    {"config"},
    {"runtime"},  # process tuning (CPU memory, threads) and device choice: no model knowledge
    {"data"},
    {"model"},
    {"checkpoint"},
    {"store"},
    {"grow"},
    {"train"},
    {"dist"},
    {"eval", "plot"},
    {"interop"},
    {"serve", "generate"},
    {"quickstart"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    """The lite_llm modules one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] == "lite_llm"]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != "lite_llm":
            return []
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those inside ``if TYPE_CHECKING:`` blocks."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, path, node):
                if target != module and not (path.name == "__init__.py" and target.startswith(module + ".")):
                    edges[module].add(target)
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    unplaced = sorted({_layer(m) for m in MODULES if _layer(m) and _layer(m) not in RANK})
    assert unplaced == [], f"modules outside every layer of DESIGN.md: {unplaced}"


def test_each_layer_imports_only_from_layers_above_it():
    wrong = []
    for module, targets in _graph().items():
        if module == "lite_llm":  # the package facade re-exports the public API
            continue
        for target in targets:
            a, b = _layer(module), _layer(target)
            if b == "" or (a != b and RANK[b] > RANK[a]):
                wrong.append(f"{module} -> {target}")
    assert sorted(wrong) == []


def test_nothing_imports_the_cli():
    users = sorted(m for m, targets in _graph().items() if _layer(m) != "cli" and any(_layer(t) == "cli" for t in targets))
    assert users == []


def test_no_private_name_crosses_a_module():
    """``from .other import _helper`` means the helper is shared and should say so by its name
    (or live in a module of shared helpers); a private name is one module's own business."""
    crossing = []
    for module, path in MODULES.items():
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and _targets(module, path, node) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    crossing.append(f"{module} imports {', '.join(private)} from {'.' * node.level}{node.module or ''}")
    assert crossing == [], "private names used across modules:\n" + "\n".join(crossing)


def test_no_import_cycles():
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("lower,upper", [("model", "checkpoint"), ("model", "train"), ("model", "grow"), ("grow", "train"), ("config", "model"), ("errors", "config")])
def test_the_rules_the_issue_names_are_among_them(lower: str, upper: str):
    """The table itself keeps the rules stated in the issue (so editing it cannot drop one)."""
    assert RANK[lower] < RANK[upper]
