"""The package's shape: no import cycle anywhere in it (every import form, lazy imports included),
Triton modules on shared helpers only, and importing ``quarot_fx`` imports the compiler alone."""

import ast
import pathlib
import subprocess
import sys

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parent.parent
# where each installed package's files live (pyproject's package-dir)
FOLDERS = {"quarot_fx": ROOT / "quarot_fx", "quarot_fx.passes": ROOT / "passes", "quarot_fx.kernels": ROOT / "kernels"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: pathlib.Path, known: dict) -> set[str]:
    """The package's modules ``path`` imports, in any form: ``import a.b``, ``from a import b``
    (b a module or a name), ``from . import b``, ``from ..c import d``, at any depth of the code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in names:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def import_graph(prefix: str = "quarot_fx") -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    for name, path in known.items():
        if name.startswith(prefix):
            graph.add_node(name)
            graph.add_edges_from((name, t) for t in imported(name, path, known) if t.startswith(prefix))
    return graph


def test_the_import_graph_sees_every_import_form():
    graph = import_graph()
    assert graph.has_edge("quarot_fx.kernels.quantized_linear", "quarot_fx.kernels.int_gemm")  # from . import x
    assert graph.has_edge("quarot_fx.passes.lowering", "quarot_fx.kernels.quantized_linear")  # from a.b import name
    assert graph.has_edge("quarot_fx.kernels.int_gemm", "quarot_fx.kernels.native")  # lazy, inside a function
    assert graph.has_edge("quarot_fx.artifact", "quarot_fx.backend")  # lazy relative


def test_the_package_has_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == [], f"{len(cycles)} cycles, e.g. {' -> '.join(min(cycles, key=len))}"


def test_triton_modules_depend_only_on_shared_helpers():
    graph = import_graph("quarot_fx.kernels")
    for module in (n for n in graph if n.rpartition(".")[2].startswith("triton_")):
        allowed = {f"quarot_fx.kernels.{m}" for m in ("common", "triton_common", "triton_hadamard")}
        assert set(graph.successors(module)) <= allowed, module


def test_importing_the_package_imports_no_tools():
    code = "import sys, quarot_fx; print(sorted(m for m in sys.modules if m.startswith('quarot_fx.tools')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]
