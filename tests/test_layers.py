"""The package's layers: every import inside ``onnx_nf4`` flows downward, and no modules import each other.

The layers (bottom first) are those of the table in ``onnx_nf4/__init__.py``. A module may import modules of its own
layer or of a lower one; function-level (lazy) imports count too. Read with the standard library's ``ast``, so the
check needs none of the optional dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from oracle_vectors import REPO_ROOT

PACKAGE_DIR = REPO_ROOT / "onnx_nf4"

#: The rank of each top-level module or subpackage of ``onnx_nf4``; a module may import ranks <= its own.
LAYERS: dict[str, float] = {
    "version": 0,
    "runtime": 0,
    "codec": 1,
    "op": 2,
    "model": 3,
    "methods": 4,
    "passes": 5,
    "api": 6,
    "torch": 7.0,  # integrations: torch below genai (export-genai reads bitsandbytes layers through it)
    "genai": 7.1,
    "olive": 7.2,
    "cli": 8,
    # The documented import paths of moved modules, and the package's entry points: nothing inside imports them.
    "reference": 9,
    "cupy_backend": 9,
    "__main__": 9,
    "__init__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path, known: set[str]) -> set[str]:
    """The ``onnx_nf4`` modules ``path`` imports, anywhere in the file (``from . import x`` resolved to modules)."""
    name = _module_name(path)
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "onnx_nf4")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "onnx_nf4":
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {target})
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    known = set(files)
    return {name: _imports(path, known) for name, path in files.items()}


def _layer(module: str) -> float:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        pytest.fail(f"{module}: its top-level name {key!r} has no layer in tests/test_layers.py (add it)")
    return LAYERS[key]


def test_every_import_flows_downward():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports():
    """The checker itself: known edges of the package are found (a parser that found nothing would pass)."""
    graph = _graph()
    assert "onnx_nf4.codec.blockwise" in graph["onnx_nf4.codec.layout"]
    assert "onnx_nf4.runtime.library" in graph["onnx_nf4.codec.native"]  # a function-level import
    assert "onnx_nf4.cli.quantize" in graph["onnx_nf4.cli.entry"]  # 'from . import quantize'


def test_every_subpackage_states_its_layer():
    """Each subpackage's docstring says what it owns and what it may import."""
    for init in PACKAGE_DIR.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower() and len(doc) > 120, (
            f"{init.relative_to(REPO_ROOT)}: docstring must state its layer"
        )
