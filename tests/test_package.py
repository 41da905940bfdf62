"""How the package is put together: the core stays independent of the training code."""

import ast

from conftest import ROOT

# The layers above the core, which may use train/: the grid runner, its report, and the command line
# (which registers `train` and `eval`).
ABOVE_THE_CORE = {"grid.py", "report.py", "cli.py"}


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_the_core_never_imports_train():
    package = ROOT / "dksgraph"
    core = [p for p in package.rglob("*.py")
            if "train" not in p.relative_to(package).parts[:-1] and p.name not in ABOVE_THE_CORE]
    assert len(core) > 15
    offenders = {str(p.relative_to(ROOT)): name for p in core for name in _imports(p)
                 if name == "dksgraph.train" or name.startswith("dksgraph.train.")}
    assert not offenders


def test_the_scan_sees_an_import_of_train(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dksgraph.train.engine import evaluate\n")
    assert "dksgraph.train.engine" in set(_imports(probe))
