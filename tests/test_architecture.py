"""The shape of the code: imports point one way, sampling never reaches training, files stay readable.

The import graph is read from the source (every `import` statement, also those inside functions), one node per
module of ldm/ plus the entry points. `python -m pytest tests/test_architecture.py` checks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cli import ROOT

PACKAGE = ROOT / "ldm"
ENTRY_POINTS = ("train.py", "sample.py", "evaluate.py")
MAX_LINES = 420  # "a few hundred lines": a file a reader can hold in mind


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found.update({name.removesuffix(".py"): ROOT / name for name in ENTRY_POINTS})
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports (``from a import b`` counts a.b when it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) - {name} for name, path in found.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle():
    edges = graph()
    assert "ldm.model" in edges["ldm.pipeline"] and "ldm.diffusion.k_samplers" in edges["ldm.diffusion.samplers"]
    assert cycles(edges) == []


def test_no_import_of_ldm_hidden_in_a_function():
    # An import inside a function hides a circle from the reader, and from Python until the function runs.
    hidden = []
    for name, path in modules().items():
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{name}:{node.lineno}" for node in ast.walk(function)
                           if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm")
                           or isinstance(node, ast.Import) and any(a.name.startswith("ldm") for a in node.names)]
    assert not hidden, hidden


def test_sampling_and_editing_never_reach_training():
    edges = graph()
    for start in ("sample", "ldm.pipeline", "ldm.model", *[m for m in edges if m.startswith("ldm.editing")]):
        reached = sorted(m for m in reachable(edges, start) if m.startswith("ldm.training"))
        assert not reached, f"{start} reaches {reached}"


def test_the_model_layer_knows_no_lightning():
    for name in ("ldm/model.py", "ldm/model_parts.py", "ldm/model_io.py", "ldm/pipeline.py"):
        tree = ast.parse((ROOT / name).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(m.startswith(("lightning", "pytorch_lightning")) for m in imported), name


def test_files_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
