"""The dependency rules of the tree, checked on the source: no import cycles anywhere in the package, store never
imports torch/transformers, probes never import the generator or the report, the report never the generator, only
the pipeline chains them, grading stands alone, only the CLI imports click, and each sampling engine imports
neither the other engines nor the generate module that picks them."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tribunal"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PKG.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (lazy imports count: they run too).
    `from .x import y` names x, and x.y too where y is a module of its own."""
    names = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            submodules = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
            # `from . import x` of a module x imports x alone; `from .x import y` runs x (its __init__) first
            if node.module or len(submodules) < len(node.names):
                names.add(mod)
            names |= submodules
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (outside libraries left out)."""
    return {name: {n for n in imports(path) if n in MODULES and n != name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_back_through_any_chain():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_direct_and_chained_cycles():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_counts_lazy_and_from_package_imports():
    graph = import_graph()
    assert "tribunal.store.format" in graph["tribunal.store.verify"]  # from . import format as fmt
    assert "tribunal.traces.stop" in graph["tribunal.__main__"]  # inside main()


def test_each_engine_imports_neither_the_other_engines_nor_generate():
    graph = import_graph()
    engines = {name for name in MODULES if name.startswith("tribunal.traces.engines.")}
    assert len(engines) >= 2, engines
    for engine in engines:
        found = graph[engine]
        assert "tribunal.traces.generate" not in found, f"{engine} imports generate"
        assert not found & (engines - {engine}), f"{engine} imports {sorted(found & (engines - {engine}))}"


def test_dependencies_point_one_way():
    for path in PKG.rglob("*.py"):
        found = imports(path)
        rel = path.relative_to(PKG).as_posix()
        if rel != "cli.py":
            assert not any(n.split(".")[0] == "click" for n in found), rel
        if rel.startswith("store/"):
            assert not any(n.split(".")[0] in ("torch", "transformers", "accelerate") for n in found), rel
        if rel.startswith("probes/"):  # probes return results; the report draws them
            assert not any(n.startswith(("tribunal.traces", "tribunal.report", "tribunal.pipeline")) for n in found), rel
        if rel.startswith("report/"):  # the report reads probe results, never the generator
            assert not any(n.startswith(("tribunal.traces", "tribunal.pipeline")) for n in found), rel
        if rel.startswith("store/"):  # the store is upstream of everything but problems
            assert not any(n.startswith(("tribunal.traces", "tribunal.probes", "tribunal.report")) for n in found), rel
        chains = {"tribunal.traces", "tribunal.probes"} <= {".".join(n.split(".")[:2]) for n in found}
        # the pipeline chains generation and probes; so does steer (its arms sample along the probes' direction);
        # the live monitor reads the probes' results while sampling
        assert not chains or rel in ("pipeline.py", "steer.py", "cli.py", "traces/monitor.py"), \
            f"{rel}: only the pipeline, steer (and the live monitor) chain generation and probes"
        if rel == "grading.py":
            assert not any(n.startswith("tribunal") for n in found), rel
