"""How the package is put together: layers that import one way (dksgraph.LAYERS), no import circle, no import
hidden in a function to dodge one, and every module saying what it exports."""

import ast
from pathlib import Path

import networkx as nx
import pytest

import dksgraph
from conftest import ROOT

PACKAGE = ROOT / "dksgraph"
# The command layer imports the rest lazily so that `dksgraph --help` starts fast; nowhere else.
LAZY_IMPORTS_ALLOWED = {"cli.py", "train/commands.py"}


def _modules() -> dict[str, Path]:
    """``dksgraph.x.y`` -> its file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported dksgraph module, line, inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    known = _modules()
    resolved = []
    for name, line, in_function in found:
        while name and name not in known:  # `from dksgraph.x import name` -> dksgraph.x
            name = name.rpartition(".")[0]
        if name.startswith("dksgraph") and not (top_level_only and in_function):
            resolved.append((name, line, in_function))
    return resolved


def _layer(module: str) -> int:
    """The index in dksgraph.LAYERS of ``dksgraph.<part>...``."""
    part = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(dksgraph.LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no layer of dksgraph.LAYERS")


def test_every_module_and_subpackage_is_in_exactly_one_layer():
    listed = [name for layer in dksgraph.LAYERS for name in layer]
    assert len(listed) == len(set(listed))
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert top == set(listed), top ^ set(listed)


def test_imports_run_one_way_through_the_layers():
    offenders = []
    for module, path in _modules().items():
        if module == "dksgraph":
            continue
        for target, line, _ in _imports(path):
            if target != "dksgraph" and _layer(target) > _layer(module):
                offenders.append(f"{path.relative_to(ROOT)}:{line} {module} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_the_rules_the_issue_names_hold():
    """The core never imports train/ or experiments/; deploy never imports train; models never import fx."""
    order = {name: i for i, layer in enumerate(dksgraph.LAYERS) for name in layer}
    assert order["train"] > max(order[n] for n in ("spec", "fx", "branches", "augmented", "loss", "deploy"))
    assert order["experiments"] > order["train"] > order["deploy"] and order["models"] < order["fx"]


def test_no_import_circle_and_no_import_hidden_in_a_function():
    graph = nx.DiGraph()
    hidden = []
    for module, path in _modules().items():
        relative = str(path.relative_to(PACKAGE))
        for target, line, in_function in _imports(path):
            if target != module:
                graph.add_edge(module, target)
            if in_function and relative not in LAZY_IMPORTS_ALLOWED:
                hidden.append(f"{relative}:{line} imports {target} inside a function")
    # a package's __init__ re-exports its modules; those edges are not a circle of code
    code = graph.copy()
    code.remove_edges_from([(a, b) for a, b in graph.edges if b.startswith(a + ".")])
    assert not hidden, "\n".join(hidden)
    assert list(nx.simple_cycles(code)) == []


def test_the_scan_sees_imports_in_functions_and_circles(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import dksgraph.spec\n\ndef f():\n    from dksgraph.train.engine import evaluate\n")
    assert ("dksgraph.train.engine", 4, True) in _imports(probe)
    assert _layer("dksgraph.train.engine") > _layer("dksgraph.spec")


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "dksgraph.__main__"))
def test_every_module_declares_what_it_exports(module):
    tree = ast.parse(_modules()[module].read_text())
    declared = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                and any(getattr(t, "id", None) == "__all__" for t in
                        (n.targets if isinstance(n, ast.Assign) else [n.target]))]
    public = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    assert declared or not public, f"{module} defines {public[:5]} but no __all__"


def test_ls_dksgraph_reads_like_the_flow_and_the_readme_maps_every_module():
    readme = (ROOT / "README.md").read_text()
    for module, path in _modules().items():
        relative = path.relative_to(ROOT)
        if relative.name != "__init__.py" or relative.parent == PACKAGE:
            assert f"`{relative.name}`" in readme or f"`{relative}`" in readme, f"README does not map {relative}"
    for name in ("fx", "branches", "deploy", "train", "experiments", "models"):
        assert (PACKAGE / name / "__init__.py").is_file()
