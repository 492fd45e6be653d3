"""The package's import graph has no circle: every nbcore module's imports of other nbcore modules
(top-level or inside a function, read with ast) form a DAG, so lower layers never import higher ones."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nbcore"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """nbcore module -> the nbcore modules it imports (anywhere in the file, ``__main__`` shims aside)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        shim = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        skip = {id(x) for n in shim for x in ast.walk(n)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert "nbcore.model" in graph and graph["nbcore.model"] <= {"nbcore.attention", "nbcore.model_folder", "nbcore.utils"}
    assert cycles(graph) == []


def test_library_modules_do_not_import_the_cli():
    graph = import_graph()
    for name, deps in graph.items():
        if not name.startswith("nbcore.cli"):
            assert not any(d.startswith("nbcore.cli") for d in deps), name


# docs/DESIGN.md's layers, bottom first: a module imports only modules of its own layer or below.
LAYERS = [
    ["utils", "attention", "stats", "tar_reader", "codec", "preemption"],
    ["data", "checkpoint", "model_folder"],
    ["model", "sizes"],
    ["shapes", "sample", "flow", "metrics", "viz"],
    ["train_config", "stream", "ema", "train_log", "distributed", "tracking", "train"],
    ["encoders", "pretrained", "validate", "analysis", "checks", "demo", "experiment", "report", "notebooks", "runner", "bench",
     "pipeline", "compare"],
    ["cli.train", "cli.data", "cli.shapes", "cli.validate", "cli.encoders", "cli.pretrained", "cli.bench", "cli.generate"],
]


def test_imports_point_down_the_layers():
    rank = {f"nbcore.{m}": i for i, layer in enumerate(LAYERS) for m in layer}
    graph = import_graph()
    modules = {m for m in graph if m not in ("nbcore", "nbcore.cli")}
    assert modules == set(rank), f"modules missing from LAYERS: {sorted(modules - set(rank))}"
    up = [(m, d) for m in modules for d in graph[m] if d in rank and rank[d] > rank[m]]
    assert not up, f"imports that point up a layer: {sorted(up)}"
