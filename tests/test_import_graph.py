"""The diffusion process, the conditioners and the converters import one way: no circles, and no import of
the package tucked inside a function where a circle would go unseen. Read from the source (ast), so a circle
that Python happens to tolerate at import time is still found."""

import ast
from pathlib import Path

import pytest

import ldm

ROOT = Path(ldm.__file__).resolve().parent
CHECKED = ("ldm.diffusion", "ldm.conditioning", "ldm.convert")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, modules: set[str], top_level: bool) -> set[str]:
    """The ldm modules a file imports, at module level (top_level) or inside functions (not top_level)."""
    nodes = tree.body if top_level else [
        inner for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
    ]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ldm.a import b` names module ldm.a.b when b is a module, else a name in ldm.a.
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names)
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def sources() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text()) for path in sorted(ROOT.rglob("*.py"))}


def _checked(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in CHECKED)


def test_no_import_cycle_through_the_checked_packages(sources):
    graph = {name: _imports(tree, set(sources), top_level=True) for name, tree in sources.items()}
    cycles = []
    for start in filter(_checked, graph):
        # Depth-first search for a path from `start` back to itself.
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" → ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles
    # The check sees the imports it should: samplers.py does import k_samplers.
    assert "ldm.diffusion.k_samplers" in graph["ldm.diffusion.samplers"]


def test_no_function_level_imports_of_ldm_in_the_checked_packages(sources):
    inside = {name: sorted(_imports(tree, set(sources), top_level=False))
              for name, tree in sources.items() if _checked(name)}
    assert not {name: found for name, found in inside.items() if found}
