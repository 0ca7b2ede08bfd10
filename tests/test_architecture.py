"""The shape of the package: dependencies point one way, the CLI starts without torch, modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgedistill"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body (function-level imports included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the importing package
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}".rstrip(".")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            # importing a submodule runs its package's __init__ first, but the package itself is no edge target
            graph[mod] |= {n for n in names if n in mods and n != mod and n != "edgedistill" and not mod.startswith(n + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert graph["edgedistill.pipeline.stages"], "the walker sees imports"
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"


#: capability packages by floor: a module may import its own package and packages on lower floors only, so that
#: two packages on one floor (distill and deploy, say) know nothing of each other
FLOORS = {"base": 0, "data": 1, "budget": 1, "models": 2, "distill": 3, "deploy": 3, "recipe": 4, "pipeline": 5, "cli": 6, "__main__": 7}


def package_of(module: str) -> str:
    return module.split(".")[1] if module != "edgedistill" else ""


def test_every_module_lives_in_a_package_on_a_floor():
    assert {package_of(m) for m in import_graph() if m != "edgedistill"} == set(FLOORS)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a → b' for every import of a package on the importer's floor or above it (its own package aside)."""
    return sorted(f"{m} → {n}" for m, deps in graph.items() if m != "edgedistill" for n in deps
                  if package_of(n) != package_of(m) and FLOORS[package_of(n)] >= FLOORS[package_of(m)])


def test_the_floor_rule_finds_upward_and_sideways_imports():
    graph = {"edgedistill.base.errors": {"edgedistill.pipeline.run"}, "edgedistill.distill.train": {"edgedistill.deploy.pick"},
             "edgedistill.pipeline.run": {"edgedistill.base.errors", "edgedistill.pipeline.stages"}}
    assert upward_imports(graph) == ["edgedistill.base.errors → edgedistill.pipeline.run", "edgedistill.distill.train → edgedistill.deploy.pick"]


def test_packages_import_only_their_own_floor_or_lower():
    assert upward_imports(import_graph()) == []


def test_every_package_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower() and len(doc.split()) > 20, f"{init.parent.name}/__init__.py: say what it owns and what it may import"


def test_the_cli_imports_without_torch():
    code = "import sys, edgedistill.cli; print(sorted(m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_no_module_is_over_the_size_limit():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_the_size_limit():
    long = {}
    for m, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{m}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}
