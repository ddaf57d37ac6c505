"""The lower packages import nothing above them: `utils/` (atomic writes, processes) and
`checkpoint/` (weights files, downloads) sit below the models, so neither imports nst_det's
models, engine or pipeline (a conversion to detectron2 names lives in nst_det/modeling/)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nst_det"
BELOW = {"utils": {"utils"}, "checkpoint": {"checkpoint", "utils"}}


def _nst_det_imports(source: str, package: tuple) -> set:
    """The nst_det sub-packages that `source`, a module of nst_det's sub-package `package`
    (e.g. ("checkpoint",)), imports: relative or absolute, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            target = base + (node.module.split(".") if node.module else [])
            names = [target] if target else [[a.name] for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            names = [m.split(".")[1:] for m in modules if m.split(".")[0] == "nst_det"]
        else:
            continue
        found.update(n[0] for n in names if n)
    return found


def test_lower_packages_import_nothing_above_them():
    wrong = {}
    for package, allowed in BELOW.items():
        for path in sorted((PACKAGE / package).rglob("*.py")):
            inside = path.relative_to(PACKAGE).parts[:-1]
            above = _nst_det_imports(path.read_text(), inside) - allowed
            if above:
                wrong[str(path.relative_to(PACKAGE))] = sorted(above)
    assert wrong == {}


def test_the_scan_sees_relative_absolute_and_nested_imports():
    source = ("from ..modeling import x\nimport nst_det.engine\nfrom .remote import y\n"
              "def f():\n    from .. import pipeline\n")
    assert _nst_det_imports(source, ("checkpoint",)) == {"modeling", "engine", "pipeline",
                                                        "checkpoint"}
