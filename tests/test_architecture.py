"""The shape of the code, checked: short functions, one-way imports, a loop that names no task or
strategy, declared contracts instead of probes, and every shipped config valid."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def walk(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (never executed)."""
    for child in ast.iter_child_nodes(tree):
        if _type_checking_only(child):
            continue
        yield child
        yield from walk(child)


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The tunesmith modules `name` imports, at the top or inside functions (lazy imports count)."""
    found = set()
    for node in walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tunesmith"):
            subs = [f"{node.module}.{a.name}" for a in node.names]
            found |= {s for s in subs if s in mods}
            if node.module in mods and not all(s in mods for s in subs):
                found.add(node.module)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, mods) for name, path in mods.items()}


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_the_import_graph_has_no_cycle_lazy_imports_included():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_imports_flow_one_way():
    g = graph()
    for name, deps in g.items():
        if name.startswith(("tunesmith.tasks", "tunesmith.models", "tunesmith.data")):
            assert not {d for d in deps if d.startswith("tunesmith.strategies")}, f"{name} imports a strategy: {deps}"
        if name.startswith(("tunesmith.tasks", "tunesmith.data", "tunesmith.strategies", "tunesmith.models")):
            assert "tunesmith.config" not in deps, f"{name} imports tunesmith.config at run time"
        assert not {d for d in deps if d in ("tunesmith.loop", "tunesmith.cli", "tunesmith.api")} or name in (
            "tunesmith", "tunesmith.api", "tunesmith.experiments", "tunesmith.cli", "tunesmith.demo", "tunesmith.__main__"), name
    assert g["tunesmith.registry"] <= {"tunesmith.errors"}  # built-ins are named, imported when asked for
    assert not any(d.startswith(("tunesmith.tasks.", "tunesmith.strategies.")) for d in g["tunesmith.config"])


def test_no_module_imports_another_modules_private_names():
    private = []
    for name, path in modules().items():
        for node in walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunesmith"):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_the_loop_names_no_task_or_strategy_and_probes_nothing():
    from tunesmith.registry import STRATEGIES, TASKS

    source = (SRC / "loop.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"hasattr", "getattr", "isinstance"}, calls & {"hasattr", "getattr", "isinstance"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    named = strings & (set(TASKS.names()) | set(STRATEGIES.names()))
    assert not named, named


def test_every_builtin_is_declared_and_importable():
    from tunesmith.registry import MODELS, STRATEGIES, TASKS
    from tunesmith.strategies.base import BaseStrategy, StrategyOptions
    from tunesmith.tasks.base import Task

    for name, task in TASKS.items():
        assert issubclass(task, Task) and task.name == name and task.metrics_better, name
        assert set(task.metrics_better.values()) <= {"max", "min"}
    for name, strategy in STRATEGIES.items():
        assert issubclass(strategy, BaseStrategy) and strategy.name == name
        assert issubclass(strategy.Options, StrategyOptions)
    assert {m.task for _, m in MODELS.items()} == {t.model_task or n for n, t in TASKS.items()}  # a packaged model for every task


CONFIGS = sorted((SRC.parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_reads_and_starts_with_its_command(path):
    from tunesmith.config import load_config

    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and "tunesmith train configs/" in text.split("\ntask:")[0]
    cfg = load_config(path)  # keys, values, task and strategy declarations all checked
    assert cfg.task and cfg.strategy.name
