"""The layering contract, read from the source (no imports run): who may import whom.

- The core (``histcode`` minus ``histcode.pretrain`` and ``histcode.finetune``) never imports a
  stage; the CLI finds the stages' commands through the ``histcode.commands`` entry points.
- ``histcode.finetune`` never imports ``histcode.pretrain``: the stages talk only through the
  registry and the zarr stores.
- Library modules never import the CLI (``histcode.cli``); only command modules
  (:data:`COMMAND_MODULES`) may.
- No import cycles between modules.

Every ``import`` statement counts, wherever it stands: at module level, inside a function
(a function-local import is still a dependency, only a deferred one, and deferring it is not
a way around the layers), under ``if TYPE_CHECKING:`` and in ``try``/``except``. String
imports count too where they are literal: ``importlib.import_module("histcode.x")`` and the
values of a package's lazy ``_EXPORTS`` table. A ``from package import name`` is an import of
``package.name`` when that is a module, else of ``package``. Importing ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``; those implicit edges are not counted (a package's
``__init__`` here imports nothing of its own package eagerly).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "histcode"
STAGES = ("histcode.pretrain", "histcode.finetune")
CLI = "histcode.cli"

#: Command modules that may import the CLI: the dispatcher itself, and the demo, which runs
#: the other commands through it (``run_captured``). Every other command builds on the
#: command kit (``histcode.commandkit``), which imports no CLI.
COMMAND_MODULES = frozenset({CLI, "histcode.demo"})
KIT = "histcode.commandkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``histcode.x.Y`` → ``histcode.x``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The package modules that one module imports, with the line of each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join([*base, node.module] if node.module else base)
            else:
                parent = node.module or ""
            targets = [f"{parent}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        elif (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            targets = [
                v.value
                for v in node.value.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            ]
        for target in targets:
            found = _resolve(target, known)
            if found is not None and found != name:
                yield found, node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """Module → {imported module: line of its first import}."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, known):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import that breaks the stage rules (core → stage, finetune → pretrain)."""
    found = []
    for module, edges in graph.items():
        in_stage = next((s for s in STAGES if in_package(module, s)), None)
        for target, line in edges.items():
            target_stage = next((s for s in STAGES if in_package(target, s)), None)
            if target_stage is None or target_stage == in_stage:
                continue
            if in_stage is None:
                found.append(f"{module}:{line} imports {target}: the core imports no stage")
            elif in_stage == "histcode.finetune":
                found.append(f"{module}:{line} imports {target}: finetune never imports pretrain")
    return found


def cli_imports(graph: dict[str, dict[str, int]]) -> set[tuple[str, str]]:
    """(module, cli) for every module other than a command module that imports the CLI."""
    return {
        (module, CLI)
        for module, edges in graph.items()
        if CLI in edges and module not in COMMAND_MODULES
    }


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_the_graph_sees_the_package(graph: dict[str, dict[str, int]]) -> None:
    assert {"histcode.cli", "histcode.registry", *STAGES} <= set(graph)
    assert "histcode.pretrain.module" in graph and "histcode.finetune.cv" in graph
    # function-local and relative imports are read
    assert any(graph.values())


def test_core_imports_no_stage_and_finetune_not_pretrain(
    graph: dict[str, dict[str, int]],
) -> None:
    assert layer_violations(graph) == []


def test_library_modules_do_not_import_the_cli(graph: dict[str, dict[str, int]]) -> None:
    found = cli_imports(graph)
    assert found == set(), "library modules import histcode.cli"


def test_the_command_kit_is_ground_floor(graph: dict[str, dict[str, int]]) -> None:
    """The kit imports neither the CLI nor any command or stage: library modules may use it."""
    assert set(graph[KIT]) <= {"histcode", "histcode.errors"}
    assert set(graph["histcode.errors"]) == set()


def test_the_registry_knows_no_zoo_and_no_stage(graph: dict[str, dict[str, int]]) -> None:
    """Cards of any kind: the builders come from the caller (or the package's entry points)."""
    assert set(graph["histcode.registry"]) <= {
        "histcode",
        "histcode.builders",
        "histcode.errors",
        "histcode.inputspec",
        "histcode.lineage",
    }
    assert set(graph["histcode.inputspec"]) == set() == set(graph["histcode.lineage"])
    from histcode.encoders import encoders
    from histcode.registry import declared_builders

    assert declared_builders("encoder") is encoders
    assert declared_builders("mil") is None  # the finetune stage's builders are passed


def test_no_import_cycles(graph: dict[str, dict[str, int]]) -> None:
    assert cycles(graph) == []


def test_the_checks_catch_planted_violations() -> None:
    """Each rule fails on a graph that breaks it (the checks are not vacuous)."""
    planted = {
        "histcode.tiling": {"histcode.finetune.cv": 3, "histcode.cli": 4},
        "histcode.finetune.cv": {"histcode.pretrain.module": 5},
        "histcode.pretrain.module": {"histcode.registry": 6},
        "histcode.registry": {"histcode.encoders": 7},
        "histcode.encoders": {"histcode.registry": 8},
        "histcode.cli": {"histcode.tiling": 9},
    }
    assert len(layer_violations(planted)) == 2
    assert cli_imports(planted) == {("histcode.tiling", CLI)}
    assert cycles(planted) == [
        ["histcode.cli", "histcode.tiling"],
        ["histcode.encoders", "histcode.registry"],
    ]


def test_function_local_and_relative_imports_count(tmp_path: Path) -> None:
    known = {"histcode.a": tmp_path / "a.py", "histcode.b": tmp_path / "b.py"}
    known["histcode.a"].write_text(
        "def f():\n    from . import b\n    import importlib\n"
        "    importlib.import_module('histcode.b')\n"
    )
    assert [t for t, _ in imports_of("histcode.a", known["histcode.a"], known)] == [
        "histcode.b",
        "histcode.b",
    ]
