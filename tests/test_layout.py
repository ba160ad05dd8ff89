"""The repository layout DESIGN.md section 2 promises: one flat subpackage per component, no import cycles inside one."""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def module_imports(package: str, folder: Path) -> dict[str, set[str]]:
    """Each module of a package -> the sibling modules it imports, at module level or inside functions."""
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    target = node.module
                elif node.level == 0 and node.module and node.module.startswith(package + "."):
                    target = node.module[len(package) + 1:]
                else:
                    continue
                found.update(a.name for a in node.names) if target is None else found.add(target.split(".")[0])
        graph[name] = found & names
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


@pytest.mark.parametrize("package", sorted(PACKAGE_DIRS))
def test_no_import_cycle_inside_a_component(package):
    cycle = find_cycle(module_imports(package, ROOT / PACKAGE_DIRS[package]))
    assert cycle is None, f"{package}: import cycle {' -> '.join(cycle)}"


def test_find_cycle_sees_a_cycle_through_a_function_level_import():
    assert find_cycle({"build": {"engine_dir"}, "engine_dir": {"build"}, "manifest": set()}) == \
        ["build", "engine_dir", "build"]


def test_serving_is_its_own_component():
    assert PACKAGE_DIRS["ddpm_engine.serve"] == "serve"
    serving = {"serve_http", "oip", "batcher", "serve_ray", "cli_serve"}
    assert serving <= {p.stem for p in (ROOT / "serve").glob("*.py")}
    assert not serving & {p.stem for p in (ROOT / "engine").glob("*.py")}
