"""The package's structure, drawn from its code: the import graph has no cycle and no upward
import, and no function is longer than 80 lines without saying why in its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusiontree"

# Bottom to top: a module may import its own layer (without a cycle) and the layers below.
LAYERS = [
    ["fusiontree.models.config", "fusiontree.models.splits", "fusiontree.config",
     "fusiontree.host"],  # the config tree, and what the machine gives the process
    ["fusiontree.ops"],
    ["fusiontree.data"],
    ["fusiontree.models"],
    ["fusiontree.parallel"],
    ["fusiontree.inference"],
    ["fusiontree.checkpoint"],
    ["fusiontree.train"],
    ["fusiontree.eval"],
    ["fusiontree.hf"],
    ["fusiontree.ablation"],
    ["fusiontree.cli"],  # the command lines' error policy: imports nothing, imported by entry points only
]
# The exported model's code is copied beside its config.json and loaded by transformers from there
# (trust_remote_code), so it imports its sibling relatively; nothing else in the package does.
REMOTE_CODE = {"fusiontree.hf.modeling_fusiontree": "fusiontree.hf"}
LONG_FUNCTION_LINES = 80
LONG_FUNCTION_REASON = "Why one function:"  # a docstring that keeps a long function whole says why


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions alike."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module
                if node.level:
                    assert node.level == 1 and name in REMOTE_CODE, \
                        f"{name}: relative import; the package imports absolutely"
                    module = f"{REMOTE_CODE[name]}.{module}"
                for a in node.names:  # `from pkg import module` imports the module itself
                    full = f"{module}.{a.name}"
                    targets.add(full if full in modules else module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS in {Path(__file__).name}"
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph(package_modules())
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the graph was actually drawn
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph(package_modules())
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("fusiontree.config") < layer_of("fusiontree.models.hybrid") < layer_of("fusiontree.train.trainer")
    assert layer_of("fusiontree.models.config") == layer_of("fusiontree.config")


def test_long_functions_say_why_they_are_one_function():
    long = []
    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG_FUNCTION_LINES and LONG_FUNCTION_REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions over {LONG_FUNCTION_LINES} lines without '{LONG_FUNCTION_REASON}':\n" + "\n".join(long)
