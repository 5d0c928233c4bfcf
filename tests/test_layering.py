"""The package's layering, read from its import graph: every ``import`` statement counts, lazy ones
inside functions included. No module imports itself back through others, no folder does, and no
layer imports from a layer above it (docs/architecture.md)."""

from __future__ import annotations

import ast
import os

import pytest

PKG = "megatron_aligndistil"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", PKG)

# bottom to top: a unit may import only from its own layer's other units or from layers below.
# A "unit" is a top-level module (platform) or a folder (core/). Within a layer, the units still
# may not form cycles (checked separately).
LAYERS = [
    {"platform"},
    {"core"},  # errors, layout + groups, schedule driver, lockstep stage, weights and checkpoint I/O
    {"hub", "config", "models"},
    {"data", "convert"},
    {"loss"},
    {"memory", "generation"},
    {"rollout"},
    {"train"},
    {"eval", "jobs", "testing"},
    {"quickstart"},
]


def modules(root: str = ROOT) -> dict[str, str]:
    """``{dotted module name: file path}`` of the package."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imported(current: str, is_package: bool, node, known) -> list[str]:
    """The package modules an ``import`` / ``from ... import`` statement of ``current`` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = current.split(".") if is_package else current.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # "from pkg import submodule" loads the submodule; "from mod import name" loads mod
        names = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
    found = []
    for name in names:
        if not name.startswith(PKG):
            continue
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != current:
            found.append(name)
    return found


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}``, every import statement anywhere in the file included."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        tree = ast.parse(open(path).read(), path)
        graph[name] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in _imported(name, path.endswith("__init__.py"), node, known)}
    return graph


def unit(module: str) -> str:
    """The layering unit of a module: its folder below the package, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PKG


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for src, targets in graph.items():
        out.setdefault(unit(src), set()).update(unit(t) for t in targets if unit(t) != unit(src))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(units: dict[str, set[str]]) -> list[str]:
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    level[PKG] = 0  # the package's __init__ (warning filters before any Megatron import)
    bad = []
    for src, targets in sorted(units.items()):
        if src not in level:
            bad.append(f"{src}: not placed in a layer (add it to LAYERS)")
            continue
        bad += [f"{src} (layer {level[src]}) imports {t} (layer {level[t]})"
                for t in sorted(targets) if level.get(t, len(LAYERS)) > level[src]]
    return bad


def test_no_module_cycles():
    assert cycles(import_graph()) == []


def test_no_folder_cycles():
    assert cycles(unit_graph(import_graph())) == []


def test_no_layer_imports_from_above():
    assert layer_violations(unit_graph(import_graph())) == []


def test_core_stands_on_the_platform_only():
    """core/ is what train/, rollout/ and eval/ build on: it imports only itself and platform."""
    units = unit_graph(import_graph())
    assert units["core"] <= {"platform"}


def test_the_checks_catch_what_they_claim(tmp_path):
    """The graph counts lazy imports, relative imports of submodules and package re-exports; a
    cycle through a function-level import and an upward import are both reported."""
    pkg = tmp_path / PKG
    (pkg / "core").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "platform.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from ..core.a import f\nfrom .. import platform\n")
    graph = import_graph(str(pkg))
    assert graph[f"{PKG}.core.a"] == {f"{PKG}.train.loop"}
    assert graph[f"{PKG}.train.loop"] == {f"{PKG}.core.a", f"{PKG}.platform"}
    assert cycles(graph) == [[f"{PKG}.core.a", f"{PKG}.train.loop"]]
    units = unit_graph(graph)
    assert cycles(units) == [["core", "train"]]
    assert layer_violations(units) == ["core (layer 1) imports train (layer 7)"]


@pytest.mark.parametrize("name", ["rollout.vllm", "generation", "memory", "eval.policy_eval"])
def test_services_come_from_core(name):
    """The shared services the old layout placed in train/ (schedule, checkpoint weights) are read
    from core/ by the sampler, the planner, the engines and the evaluator."""
    graph = import_graph()
    assert not any(t.startswith(f"{PKG}.train") for t in graph[f"{PKG}.{name}"]), graph[f"{PKG}.{name}"]
