"""The house's floor plan, measured from the project's own imports.

`python tests/test_layers.py` prints the measures docs/design.md reports: each module's floor (0:
imports no paci module; otherwise one above the highest module it imports at the top of the
file), the imports made inside functions that run back up (to a module on the importer's floor or
above, the usual way round a circle), the circles of the whole graph, the biggest modules, and
which modules touch torch.distributed. The tests hold the rules the layout promises.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "paci"

# the only modules that may touch torch.distributed: collectives and groups, point to point
DISTRIBUTED_HOMES = {"paci.runtime.mesh", "paci.runtime.transport"}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(target: str) -> str | None:
    """The paci module an import names (`paci.ir.Action` -> `paci.ir`), or None outside paci."""
    known = modules()
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def imports(module: str) -> tuple[set[str], set[str]]:
    """(paci modules imported at the top of `module`, those imported inside functions); imports
    for type checkers only (`if TYPE_CHECKING:`) are neither."""
    top, lazy = set(), set()
    tree = modules()[module]
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for node in ast.walk(block)}  # never run: not an arrow
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found = {_resolve(name) for name in names} - {None, module}
        if isinstance(node, ast.ImportFrom) and len(found) > 1:
            found.discard(_resolve(node.module))  # `from paci.runtime import stage` names the module itself
        (lazy if id(node) in nested else top).update(found)
    return top, lazy - top


@cache
def floors() -> dict[str, int]:
    graph = {m: imports(m)[0] for m in modules()}
    floor: dict[str, int] = {}

    def visit(m: str, path: tuple[str, ...] = ()) -> int:
        if m in path:
            raise RuntimeError(f"top-level import circle: {' -> '.join(path + (m,))}")
        if m not in floor:
            floor[m] = 1 + max((visit(d, path + (m,)) for d in graph[m]), default=-1)
        return floor[m]

    for m in graph:
        visit(m)
    return floor


def back_up() -> list[tuple[str, str]]:
    """Imports inside functions to a module on the importer's floor or above."""
    floor = floors()
    return sorted((m, d) for m in modules() for d in imports(m)[1] if floor[d] >= floor[m])


def circles() -> list[list[str]]:
    """Strongly connected groups of more than one module, top-level and lazy imports together."""
    graph = {m: set().union(*imports(m)) for m in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(m: str) -> None:  # Tarjan
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in graph[m]:
            if d not in index:
                connect(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == m:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in graph:
        if m not in index:
            connect(m)
    return found


def touches_distributed(module: str) -> bool:
    """Does `module` import torch.distributed (any part of it) or reach it as `torch.distributed`?"""
    for node in ast.walk(modules()[module]):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("torch.distributed")
                or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            return True
        if (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            return True
    return False


def lines(module: str) -> int:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    return len(path.read_text().splitlines())


def test_torch_distributed_has_one_home():
    assert {m for m in modules() if touches_distributed(m)} <= DISTRIBUTED_HOMES


def test_the_probe_sees_torch_distributed():  # so the rule above can fail
    assert touches_distributed("paci.runtime.mesh") and touches_distributed("paci.runtime.transport")
    sample = ast.parse("import torch\nx = torch.distributed.get_rank()\n")
    modules.cache_clear()
    try:
        modules()["paci._probe"] = sample
        assert touches_distributed("paci._probe")
    finally:
        modules.cache_clear()


def test_the_partitioner_is_a_pure_solver_below_the_profiler():
    """partition.py solves over numbers (no torch, no profiling); the profiler measures and calls it."""
    tree = modules()["paci.partition"]
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name == "torch" or name.startswith("torch.") for name in names), names
    assert "paci.profiler" not in imports("paci.partition")[0] | imports("paci.partition")[1]
    assert floors()["paci.partition"] < floors()["paci.profiler"]


def test_no_top_level_circle():
    floors()  # raises on a circle of top-level imports


def report() -> str:
    floor = floors()
    out = [f"floors: {max(floor.values()) + 1} (0 .. {max(floor.values())})"]
    for level in range(max(floor.values()) + 1):
        out.append(f"  {level}: " + ", ".join(sorted(m.removeprefix("paci.") or "paci"
                                                      for m, f in floor.items() if f == level)))
    ups = back_up()
    out.append(f"imports inside functions running back up: {len(ups)}")
    out += [f"  {m} -> {d}" for m, d in ups]
    loops = circles()
    out.append(f"circles (with those imports): {len(loops)}")
    out += ["  " + " <-> ".join(group) for group in loops]
    biggest = sorted(modules(), key=lines, reverse=True)[:5]
    out.append("biggest modules: " + ", ".join(f"{m} ({lines(m)})" for m in biggest))
    out.append("import torch.distributed: " + ", ".join(sorted(m for m in modules() if touches_distributed(m))))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(print(report()))
