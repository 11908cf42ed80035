"""The design rules the code is held to, read from the code itself: imports flow one way, functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import aidetect

PACKAGE = Path(aidetect.__file__).parent
# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = (
    {"errors", "fileio", "allocator", "preemption", "parallel", "jobmemory", "cuda_builds", "hardware", "options"},
    {"data"},
    {
        "backbones",
        "weights",
        "npr",
        "models",
        "metrics",
        "calibration",
        "intervals",
        "distributed",
        "config",
        "checkpoint",
        "engine",
        "tracking",
        "plots",
        "cluster.profiles",
    },
    {"train", "inference", "audit", "robustness", "doctor", "demo", "features", "probe", "export", "scores"},
    {"cluster", "bench"},
    {"cli"},
)
LONGEST_FUNCTION = 60


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """The aidetect modules a file imports, at any depth of the file (lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aidetect"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("aidetect"))
    return names - {"aidetect"}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported(path) for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """The layer of ``aidetect.X`` or ``aidetect.X.Y``: ``X.Y`` when a layer names it, else ``X``."""
    parts = module.split(".")[1:]
    for name in (".".join(parts[:2]), parts[0] if parts else ""):
        for index, names in enumerate(LAYERS):
            if name in names:
                return index
    raise AssertionError(f"{module}: in no layer of tests/test_structure.py; add it where it belongs")


def test_imports_only_flow_down() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module != "aidetect"
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, upward


def test_no_import_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path[path.index(module) :], module))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_no_long_function() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long


def test_pack_loads_no_torchvision() -> None:
    """pack's worker processes decode with Pillow only: importing pack must not pull in torchvision."""
    code = "import sys, aidetect.data.pack; print(sorted(m for m in sys.modules if m.startswith('torchvision')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
