"""daro-lab's import graph has no cycles: a module can be read (and tested) with only what is below it.

Every `import daro_lab...` counts, the ones deferred into functions too: a deferred import hides a cycle
from Python, not from a reader. Two levels are checked: modules, and the subpackages (config, record,
algorithms, tasks, models, distributed, eval, tracking, trainer, hooks, ablation, ...), so that a layer
never reaches up into one that builds on it.
"""

import ast
from pathlib import Path

import daro_lab

ROOT = Path(daro_lab.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ("daro_lab",) + f.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the daro_lab modules it imports (a module importing its own package is not an edge: the
    package's __init__ imports its modules, which is how a package is assembled)."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("daro_lab"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("daro_lab")]
            else:
                continue
            for n in names:
                t = resolve(n)
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def test_cycle_finder_finds_a_cycle():  # the check below can fail
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_deferred_imports():
    g = import_graph()
    # trainer/memory.py imports trainer/precision.py inside a function
    assert "daro_lab.trainer.precision" in g["daro_lab.trainer.memory"]
    assert "daro_lab.models.warmstart" in g["daro_lab.models.load"]


def test_no_module_cycles():
    assert cycles(import_graph()) == []


def test_no_layer_cycles():
    layers: dict[str, set[str]] = {}
    for mod, targets in import_graph().items():
        layers.setdefault(_layer(mod), set()).update(_layer(t) for t in targets if _layer(t) != _layer(mod))
    layers.pop("daro_lab", None)  # the package's own __init__ imports nothing of its layers
    assert cycles(layers) == []
