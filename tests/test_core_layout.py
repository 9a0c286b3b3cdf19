"""Where code lives: the pure core imports no engine, and serving code imports no dev tool.

Read from the sources (``ast``), so a misplaced import fails here even when nothing runs it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "vllm_v2drop"


def imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


#: What the core may build on: itself only (settings, overrides and the request views build on it).
CORE_MAY_IMPORT = ("vllm_v2drop.core",)


@pytest.mark.parametrize("path", sorted((PKG / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_engine(path):
    mods = imports(path)
    assert not any(m == "vllm" or m.startswith("vllm.") for m in mods)
    assert all(m.startswith(CORE_MAY_IMPORT) for m in mods if m.startswith("vllm_v2drop"))


@pytest.mark.parametrize("module", ["counts", "request_plan", "step_plan", "batch_planner"])
def test_planning_is_numpy_only(module):
    """Every process plans with these, the API server included: no torch."""
    assert not any(m.split(".")[0] == "torch" for m in imports(PKG / "core" / f"{module}.py"))


def test_serving_code_imports_no_dev_tool():
    """``vllm_v2drop/dev/`` is for tests, benchmarks and the demo; only the CLI reaches into it
    (``make-model``)."""
    offenders = {
        str(path.relative_to(PKG)): sorted(m for m in imports(path) if m.startswith("vllm_v2drop.dev"))
        for path in PKG.rglob("*.py")
        if "dev" not in path.relative_to(PKG).parts[:1] and path.name != "cli.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}
