"""The package's import graph: no cycle, and the numerical layer (qsm/) never imports the app layers.

Every module of ``metaqsm_bids`` is parsed with ``ast`` (nothing is imported), relative imports are
resolved, and imports at module level and inside functions both count. Importing ``a.b.c`` runs
``a/__init__`` and ``a/b/__init__`` too, so it is an arrow to each of those packages as well (except
the importer's own packages, which Python has already started).
"""
import ast
from pathlib import Path

import pytest

import metaqsm_bids

PACKAGE_DIR = Path(metaqsm_bids.__file__).resolve().parent
ROOT = "metaqsm_bids"


def _modules():
    """Dotted module name -> (path, is_package) for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = (ROOT, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(tree, name, is_package):
    """Absolute names of what a module's ``import`` statements ask for (modules or attributes of them)."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"


def import_graph():
    """Module -> set of package modules it imports (with the packages whose ``__init__`` that runs)."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        targets = set()
        for imported in _imported_names(tree, name, is_package):
            if imported not in modules:  # an attribute (function, class) of a module, or not ours
                continue
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target not in own:
                    targets.add(target)
        graph[name] = targets
    return graph


def _find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_the_known_imports():
    graph = import_graph()
    assert "metaqsm_bids.qsm.inversion.tkd" in graph["metaqsm_bids.qsm.network.deepqsm"]
    assert "metaqsm_bids.qsm.inversion" in graph["metaqsm_bids.qsm.network.deepqsm"]  # its __init__ runs
    assert "metaqsm_bids.qsm.background.resharp" in graph["metaqsm_bids.qsm.background.registry"]
    # a function-level import counts
    assert "metaqsm_bids.qsm.network.deepqsm" in graph["metaqsm_bids.qsm.inversion.metaqsm"]
    assert "metaqsm_bids.qsm.core.physics" in graph["metaqsm_bids.interfaces.qsm"]


def test_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", ["qsm", "steps"])
def test_numerical_layers_do_not_import_the_app_layers(layer):
    """qsm/ (the numerics) and steps/ (array functions the interfaces and benchmarks share) stay below nipype."""
    upper = [f"{ROOT}.{name}" for name in ("interfaces", "workflows", "cli")]
    bad = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                 if module == f"{ROOT}.{layer}" or module.startswith(f"{ROOT}.{layer}.") for target in targets
                 if any(target == u or target.startswith(u + ".") for u in upper))
    assert not bad, bad


def test_no_algorithm_imports_its_registry():
    graph = import_graph()
    for stage in ("background", "inversion"):
        registry = f"{ROOT}.qsm.{stage}.registry"
        users = sorted(m for m, targets in graph.items() if registry in targets and m.startswith(f"{ROOT}.qsm."))
        assert not users, f"{registry} is imported by {users}"


def test_core_imports_no_stage():
    core = f"{ROOT}.qsm.core"
    bad = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if m.startswith(core)
                 for t in targets if t.startswith(f"{ROOT}.qsm.") and not t.startswith(core))
    assert not bad, bad
