"""The layout rules of docs/architecture.md: packages import one way (module-level and function-level imports both),
no product file over 500 lines, the target side torch-free."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("targets", "latency_models", "toolchain")
#: a package may import itself and packages of a lower rank only (DESIGN.md: targets <- core <- onnx <-
#: latency_models <- pipeline <- cli); search and ship sit beside latency_models and know nothing of each other
RANK = {"targets": 0, "toolchain.core": 1, "toolchain.onnx": 2, "latency_models": 3, "toolchain.search": 3,
        "toolchain.ship": 3, "toolchain": 4}
MAX_LINES = 500
TORCH_FREE = ("targets", "latency_models/bundle_runner.py")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """Every project module ``path`` imports, anywhere in the file, with its line."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, node.lineno) for n in names if n.split(".")[0] in PACKAGES]
    return out


def package_of(module: str, root: Path) -> str:
    """The node a module belongs to: a top-level package, or one of toolchain's sub-packages."""
    parts = module.split(".")
    if len(parts) > 1 and (root / parts[0] / parts[1]).is_dir():
        return ".".join(parts[:2])
    return parts[0]


def package_graph(root: Path) -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> ``file:line`` of each import that makes the edge."""
    graph: dict[str, dict[str, list[str]]] = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            src = package_of(_module_name(path, root), root)
            graph.setdefault(src, {})
            for name, line in _imports(path, root):
                dst = package_of(name, root)
                if dst != src:
                    graph[src].setdefault(dst, []).append(f"{path.relative_to(root)}:{line}")
    return graph


def cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter({k: set(v) for k, v in graph.items()}).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def upward_imports(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    return [f"{src} -> {dst} ({', '.join(where)})" for src, edges in graph.items() for dst, where in edges.items()
            if RANK.get(dst, 99) >= RANK.get(src, -1)]


def test_packages_import_one_way():
    graph = package_graph(ROOT)
    assert set(graph) <= set(RANK), f"a package without a place in RANK: {set(graph) - set(RANK)}"
    assert cycle(graph) is None, f"import cycle between packages: {' -> '.join(cycle(graph))}"
    assert upward_imports(graph) == []


def test_the_checks_see_a_cycle_even_inside_a_function(tmp_path):
    """The checker itself: a function-level import that closes a loop is found."""
    for pkg, body in {"targets": "", "toolchain": "", "toolchain/core": "def f():\n    from toolchain import cli\n",
                      "latency_models": ""}.items():
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text(body)
    (tmp_path / "toolchain" / "cli.py").write_text("from toolchain.core import f\n")
    graph = package_graph(tmp_path)
    assert sorted(cycle(graph)[:2]) == ["toolchain", "toolchain.core"]
    assert upward_imports(graph) == ["toolchain.core -> toolchain (toolchain/core/__init__.py:2)"]


@pytest.mark.parametrize("top", PACKAGES)
def test_no_product_file_over_500_lines(top):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_target_side_is_torch_free():
    """targets/ and the bundle runner run on devices with only numpy + onnxruntime."""
    heavy = ("torch", "transformers", "toolchain")
    found = []
    for entry in TORCH_FREE:
        for path in [ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in heavy]
    assert found == []
