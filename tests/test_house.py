"""The shape of the house: functions of the library and the stages fit on a screen, the library's modules
import each other without a circle, and each part of `pipeline/` (README "Layout", listed from the bottom
up) imports only parts listed below it. Read from the source with `ast`; nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60  # from `def` to the last line of the body, decorators excluded


def _modules(folder: str) -> list[Path]:
    """Every module under `folder`, subpackages included."""
    return sorted((ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    """`pipeline/cache/store.py` -> `cache.store`; a package's `__init__.py` -> the package (`cache`)."""
    rel = path.relative_to(ROOT / "pipeline").with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage (`cache`), or itself for a top-level module (`params`)."""
    return module.split(".")[0]


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`name (lines)` of every function or method in `path` longer than `limit` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def pipeline_imports(path: Path) -> set[str]:
    """The `pipeline` modules (`cache.store`, `params`) that `path` imports, at any depth of the file (lazy
    imports count too); `from pipeline.cache import store` names `cache.store`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    known = {module_name(m) for m in _modules("pipeline")}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("pipeline."):
                base = node.module.removeprefix("pipeline.")
                found |= ({f"{base}.{a.name}" for a in node.names} & known) or {base}
            elif node.module == "pipeline":
                found |= {a.name for a in node.names if a.name != "__version__"}
    own = module_name(path) if path.is_relative_to(ROOT / "pipeline") else None
    return found - {own}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` (module -> the modules it imports) as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_and_long_functions_see_what_they_should(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    src = tmp_path / "probe.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    src.write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert long_functions(src) == ["probe.py:1 long (62 lines)"]


@pytest.mark.parametrize("folder", ["pipeline", "stages"])
def test_no_function_over_sixty_lines(folder: str) -> None:
    found = [f for path in _modules(folder) for f in long_functions(path)]
    assert not found, "split these functions (about 60 lines each):\n" + "\n".join(found)


def module_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports (the package `pipeline` itself left out: its
    `__init__` resolves the public API's names on first use)."""
    return {module_name(p): pipeline_imports(p) for p in _modules("pipeline") if module_name(p)}


def test_no_import_circle_among_pipeline_modules() -> None:
    graph = module_graph()
    assert "models.registry" in graph["models.checkpoint"]  # the parser sees the library's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def readme_parts() -> list[tuple[str, list[str]]]:
    """README "Layout": the parts of `pipeline/` from the bottom up, each with the modules listed under it."""
    block = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("```\n", 2)[1]
    parts: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        words = line.split()
        if not words:
            continue
        if line.startswith("  ") and not line.startswith("   ") and words[0].endswith(("/", ".py")):
            parts.append((words[0].removesuffix("/").removesuffix(".py"), []))
        elif line.startswith("    ") and not line.startswith("     ") and words[0].endswith(".py") and parts:
            parts[-1][1].append(words[0].removesuffix(".py"))
    return parts


def test_readme_layout_lists_every_module_and_no_part_imports_one_above_it() -> None:
    parts = readme_parts()
    order = [name for name, _ in parts]
    listed = {f"{name}.{m}" for name, mods in parts for m in mods} | {name for name, mods in parts if not mods}
    packages = {module_name(p) for p in _modules("pipeline") if p.name == "__init__.py"}
    modules = set(module_graph()) - packages
    assert modules <= listed, f"README Layout misses {sorted(modules - listed)}"
    assert {part_of(m) for m in modules} == set(order), "README Layout lists a part that is not in pipeline/"
    for module, imports in module_graph().items():
        for imported in imports:
            a, b = part_of(module), part_of(imported)
            assert order.index(b) <= order.index(a), f"{module} (part {a}) imports {imported}, a part above it"


def test_results_never_import_training() -> None:
    graph = module_graph()
    results = [m for m in graph if part_of(m) == "results"]
    assert results
    assert not [(m, i) for m in results for i in graph[m] if part_of(i) in ("train", "teachers")]


def test_ci_runs_the_readme_test_command_with_every_gate() -> None:
    readme = (ROOT / "README.md").read_text()
    command = readme.split("this is exactly what CI runs):\n\n```bash\n", 1)[1].split("\n", 1)[0]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    for gate in ("ruff check", "ruff format --check", "mypy pipeline", "pytest"):
        assert f"&& {gate}" in command, gate
