"""The package's layering, checked on its import graph (every import, function-level ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smpp_ray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement except those under ``if TYPE_CHECKING:`` (no import at run time)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imported(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules an import statement in module ``name`` loads: ``from pkg import sub`` loads the
    submodule ``pkg.sub`` when there is one, else ``pkg`` itself."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}".rstrip(".")
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        imports = set().union(*(_imported(name, n) for n in _runtime_imports(ast.parse(path.read_text()))))
        graph[name] = imports
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph[v] & graph.keys():
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_model_package_imports_no_ray():
    """What extraction, scoring and serving load (model, checkpoint, prototypes bank) runs without
    Ray: Ray jobs sit above it, in the stage modules."""
    graph = _graph()
    offenders = {name: sorted(m for m in imports if m == "ray" or m.startswith("ray."))
                 for name, imports in graph.items() if name.startswith("smpp_ray.model")}
    assert not {k: v for k, v in offenders.items() if v}
    assert "smpp_ray.model.checkpoint" in graph   # the checkpoint format lives in model/


def test_resolving_a_checkpoint_loads_no_torch():
    """The checkpoint module's promise: naming and resolving a checkpoint (what the CLI, the stage
    runner and the report do) costs no torch import; only saving and loading one does."""
    import subprocess
    import sys

    probe = ("import sys, smpp_ray.model.checkpoint as c; "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_only_the_trainer_reaches_into_train():
    """Shared artifacts (checkpoint format, backbone spec, kept ids) live below their users: nothing
    outside ``train/`` imports it except the stage table that runs it."""
    graph = _graph()
    users = sorted(name for name, imports in graph.items() if not name.startswith("smpp_ray.train")
                   and any(m == "smpp_ray.train" or m.startswith("smpp_ray.train.") for m in imports))
    assert users == ["smpp_ray.stage_table"]
