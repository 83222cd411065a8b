"""The layout shows the pipeline (issue 13): stage sub-packages that import one way, no import cycles, small
modules and functions, pure stages free of torch, and Optuna behind the tuning package's storage adapter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("allocator", "probes", "benchmarks")
# data flows one way: a module may import its own stage and those before it, never a later one
STAGES = (
    "errors",
    "compat",
    "reference",
    "discovery",
    "scoring",
    "solver",
    "output",
    "api",
    "integrations",
    "tuning",
    "commands",
)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _runtime_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports at run time (module level or in functions; not under
    TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known}


GRAPH = {name: _runtime_imports(path, MODULES) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_walk_finds_the_stages_and_their_imports():
    assert {"allocator.discovery.components", "allocator.solver.solve", "allocator.tuning.run"} <= set(
        MODULES
    )
    assert "allocator.scoring.utility" in GRAPH["allocator.solver.solve"]  # imports are really read


def test_no_runtime_import_cycles():
    assert _cycles() == []


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "allocator" or len(parts) < 2:
        return None
    return STAGES.index(parts[1]) if parts[1] in STAGES else None


def test_stages_import_one_way():
    backwards = [
        f"{m} -> {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if _stage(m) is not None and _stage(d) is not None and _stage(d) > _stage(m)
    ]
    assert backwards == []


def test_probes_never_imports_allocator():
    assert [
        f"{m} -> {d}"
        for m, deps in GRAPH.items()
        if m.startswith("probes")
        for d in deps
        if d.startswith("allocator")
    ] == []


def test_only_the_storage_adapter_and_the_worker_import_optuna():
    users = sorted(
        name
        for name, path in MODULES.items()
        if name.startswith("allocator")
        and any(
            isinstance(n, (ast.Import, ast.ImportFrom)) and "optuna" in ast.unparse(n)
            for n in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users == ["allocator.tuning.run", "allocator.tuning.storage"]


def test_pure_stages_and_the_cli_shell_load_without_torch_or_optuna():
    pure = sorted(m for m in MODULES if m.startswith(("allocator.scoring", "allocator.solver"))) + [
        "allocator.discovery.component",
        "allocator.tuning",
        "allocator.tuning.settings",
        "allocator.tuning.search",
        "allocator.commands.cli",
        "probes.settings",
        "probes.folders",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in pure)
        + ("print(sorted(m for m in ('torch', 'transformers', 'optuna', 'peft') if m in sys.modules))")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.startswith("benchmarks")))
def test_modules_and_functions_stay_small(name):
    source = MODULES[name].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({lines} lines)")
    assert long == []
