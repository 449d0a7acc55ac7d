"""The shape of the house (STYLE.md): functions of the library and the stages fit on a screen, and the
library's modules import each other without a circle. Read from the source with `ast`; nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60  # from `def` to the last line of the body, decorators excluded


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


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
    """The `pipeline` modules that `path` imports, at any depth of the file (lazy imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("pipeline."):
                found.add(node.module.split(".")[1])
            elif node.module == "pipeline":
                found |= {a.name for a in node.names}
    return found - {path.stem}


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
    assert not found, "split these functions (STYLE.md: about 60 lines):\n" + "\n".join(found)


def test_no_import_circle_among_pipeline_modules() -> None:
    graph = {path.stem: pipeline_imports(path) for path in _modules("pipeline")}
    assert "models" in graph["checkpoint"]  # the parser sees the library's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_ci_runs_the_readme_test_command_with_every_gate() -> None:
    readme = (ROOT / "README.md").read_text()
    command = readme.split("this is exactly what CI runs):\n\n```bash\n", 1)[1].split("\n", 1)[0]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    for gate in ("ruff check", "ruff format --check", "mypy pipeline", "pytest"):
        assert f"&& {gate}" in command, gate


def test_readme_layout_lists_every_library_module_below_what_it_imports() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("\n## Layout\n", 1)[1]
    listed = [
        line.split()[0][: -len(".py")] for line in layout.splitlines() if line.startswith("  ") and ".py " in line
    ]
    modules = {path.stem for path in _modules("pipeline")} - {"__init__"}
    assert modules <= set(listed), f"README Layout misses {sorted(modules - set(listed))}"
    for name in modules:
        above = set(listed[: listed.index(name)])
        assert pipeline_imports(ROOT / "pipeline" / f"{name}.py") <= above, f"{name} imports a module listed below it"
