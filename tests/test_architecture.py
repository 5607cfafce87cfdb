"""The import graph of src/mhpo: layers point down only, no cycles, a torch-only objective library.

Every ``import`` and ``from ... import`` counts, those inside functions too: a lazy import still
couples two modules. A module's layer is its package's (the first name under ``mhpo``; a top-level
module is its own package), with no per-module exceptions. Bottom to top (docs/architecture.md):

    0 objectives, errors, rules   the objective library TRL and verl import (torch, numpy)
    1 files, seeding, progress    atomic files and JSONL, seeds, the progress bar
    2 models, tasks, rewards      devices and precision, model sources and loading, tasks, verifiers
    3 generation                  prompt encoding, the decode loop, the policy loader
    4 evaluation                  held-out evaluation and the benchmark protocol
    5 trainer                     config, setup, the RL step, the loop, run directories, checkpoints
    6 compare                     compare, sweep and report
    7 integrations                TRL and verl (which import the objective library only)
    8 engines                     an mhpo config run by another engine (`mhpo train --engine trl`)
    9 cli                         argument parsing and the commands
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    0: ["", "objectives", "errors", "rules"],  # "": the package mhpo itself (mhpo/__init__.py)
    1: ["files", "seeding", "progress"],
    2: ["models", "tasks", "rewards"],
    3: ["generation"],
    4: ["evaluation"],
    5: ["trainer"],
    6: ["compare"],
    7: ["integrations"],
    8: ["engines"],
    9: ["cli"],
}
INTEGRATIONS = 7
# What the objective library may import besides itself and the standard library: torch, and numpy
# (a declared dependency: the diagnostics count bool entries of CPU tensors with it, ~50x torch's speed).
LIBRARY_THIRD_PARTY = {"torch", "numpy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "mhpo").rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` imports: mhpo modules by name, others by their top-level package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs  # `from . import rollout` imports the module mhpo.generation.rollout ...
            if len(subs) < len(node.names):  # ... and `from .rollout import pack` the module it names
                found.add(target)
    out = set()
    for target in found:
        if target.split(".")[0] != "mhpo":
            out.add(target.split(".")[0])
            continue
        while target not in known:  # `mhpo.objectives.registry.X` -> the module that defines X
            target = target.rpartition(".")[0]
        if target != name:
            out.add(target)
    return out


def layer_of(name: str) -> int:
    package = name.split(".")[1] if "." in name else ""
    for layer, packages in LAYERS.items():
        if package in packages:
            return layer
    raise AssertionError(f"package mhpo.{package} ({name}) is in no layer: add it to LAYERS (and docs/architecture.md)")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {t for t in imports(name, path, set(mods)) if t in mods} for name, path in mods.items()}


def test_every_module_has_a_layer_and_imports_point_down(graph):
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, deps in graph.items()
        for b in sorted(deps)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any with more than one module is a cycle."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_objective_library_needs_only_torch():
    mods = modules()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name, path in mods.items():
        if layer_of(name) != 0:
            continue
        third_party = {t for t in imports(name, path, set(mods)) if not t.startswith("mhpo")} - stdlib
        assert third_party <= LIBRARY_THIRD_PARTY, f"{name} imports {sorted(third_party - LIBRARY_THIRD_PARTY)}"


def test_integrations_import_only_the_objective_library(graph):
    for name, deps in graph.items():
        if layer_of(name) == INTEGRATIONS:
            assert {layer_of(d) for d in deps} <= {0, INTEGRATIONS}, f"{name} imports {sorted(deps)}"


def test_the_checker_sees_a_violation(tmp_path):
    """The graph walk itself: an upward and a cyclic import in a scratch package are found."""
    pkg = tmp_path / "mhpo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\nimport torch\n")
    known = {"mhpo", "mhpo.a", "mhpo.b"}
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        assert imports("mhpo.a", pkg / "a.py", known) == {"mhpo.b"}
        assert imports("mhpo.b", pkg / "b.py", known) == {"mhpo.a", "torch"}
    finally:
        SRC = saved
