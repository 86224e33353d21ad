"""The package's layout: its folders are its layers, and modules import downwards only.

Edges come from every ``import`` in a file, function-level ones included (a lazy import hides a
cycle from Python, not from a reader). The layers, bottom up, are ``protocol`` (the wire
format), ``runtime`` (models, caches, the scheduler), ``speculation`` (the maths and the
transport-free cores), ``config`` (the services' settings), ``services`` (the NATS/HTTP shells)
and ``tools`` (stack, bench, distill, capacity…), with ``cli`` on top; each folder's
``__init__`` says the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "picospec"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package import is its ``__init__``)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name) if name.startswith("picospec") else None
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


LAYERS = {
    "picospec": 0,  # the package's own __init__: the version and the CLI's defaults
    "picospec.protocol": 0,
    "picospec.runtime": 1,
    "picospec.speculation": 2,
    "picospec.config": 3,
    "picospec.services": 4,
    "picospec.tools": 5,
    "picospec.cli": 6,
}
MAX_LINES = 650
MAX_LOOSE_MODULES = 6


def layer(module: str) -> int:
    """The layer of ``module``: that of the longest prefix listed in :data:`LAYERS`."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise KeyError(f"{module} is in no layer: add its folder to LAYERS (and say why)")


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if layer(t) > layer(m))


def test_the_cycle_finder_finds_cycles_and_only_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
    graph = import_graph()
    assert "picospec.runtime.kvslots" in graph["picospec.runtime.model"]
    # function-level imports count: the loader asks the draft format lazily
    assert "picospec.runtime.drafts.format" in graph["picospec.runtime.loading"]


def test_no_import_cycle_among_the_packages_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_layer_check_finds_upward_imports() -> None:
    edges = {"picospec.runtime.model": {"picospec.speculation.sampling"}, "picospec.cli": set()}
    assert upward(edges) == ["picospec.runtime.model -> picospec.speculation.sampling"]
    assert upward({"picospec.tools.bench.run": {"picospec.runtime.model"}}) == []


def test_modules_import_only_their_own_layer_and_below() -> None:
    assert upward(import_graph()) == []


def test_every_module_is_in_a_layer_and_few_are_loose() -> None:
    mods = import_graph()
    for m in mods:
        layer(m)
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, loose


def test_no_source_file_is_over_the_size_the_code_keeps() -> None:
    sizes = {
        str(f.relative_to(PACKAGE)): len(f.read_text().splitlines()) for f in PACKAGE.rglob("*.py")
    }
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}
