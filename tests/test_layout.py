"""The package's shape: no import cycles inside ``kernels/`` (lazy imports included)."""

import ast
import pathlib

import networkx as nx

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "kernels"


def import_graph(folder: pathlib.Path) -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in folder.glob("*.py"):
        graph.add_node(path.stem)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                graph.add_edge(path.stem, node.module.split(".")[0])
    return graph


def test_kernels_have_no_import_cycles():
    graph = import_graph(KERNELS)
    assert list(nx.simple_cycles(graph)) == []


def test_triton_modules_depend_only_on_shared_helpers():
    graph = import_graph(KERNELS)
    for module in (n for n in graph if n.startswith("triton_")):
        assert set(graph.successors(module)) <= {"common", "triton_common", "triton_hadamard"}, module
