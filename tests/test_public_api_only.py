"""nst_det and tools/ use only public detectron2 / fvcore / submitit API, and importing nst_det
only adds: detectron2's data sets already registered keep their loaders and metadata, and
matplotlib's backend and pyplot are left alone.

The source scan is an ast walk, so it sees what a grep would miss (an alias of an imported
module, a private attribute reached through `self` in a subclass of a library class) and nothing
in comments or strings. Each rule is also checked against the private uses nst_det once had, so
the scan cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("detectron2", "fvcore", "submitit")
# submitit documents its top-level names and `submitit.helpers`; core/local/slurm are internals
PUBLIC_SUBMITIT_MODULES = {"submitit", "submitit.helpers"}
# (file, private name): each kept for a reason no public API serves
ALLOWED = {
    # whether detectron2 was built with its compiled extension: the module's file is the answer
    ("nst_det/evaluation/by_dataset.py", "detectron2._C"),
    ("tools/gpu_check_lib/parts.py", "detectron2._C"),
    # the GPU check runs detectron2's own multi-GPU worker once, so one GPU exercises the path
    # launch() takes with several; launch() itself runs main in-process for one GPU
    ("tools/gpu_check_lib/nccl_launch.py", "detectron2.engine.launch._distributed_worker"),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_private(module: str) -> bool:
    parts = module.split(".")
    if any(_private(p) for p in parts):
        return True
    return parts[0] == "submitit" and len(parts) > 1 and ".".join(parts[:2]) \
        not in PUBLIC_SUBMITIT_MODULES


def _is_library(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in LIBRARIES


class _Scan(ast.NodeVisitor):
    """Collects private library names a module's source uses: `found` holds dotted names."""

    def __init__(self):
        self.found: set[str] = set()
        self.bound: dict[str, str] = {}  # local name -> the library object it is bound to
        self.classes: list[tuple[list, set]] = []  # (library bases, names the class defines)

    def visit_Import(self, node):
        for alias in node.names:
            if _is_library(alias.name):
                if _module_private(alias.name):
                    self.found.add(alias.name)
                local = alias.asname or alias.name.split(".")[0]
                self.bound[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node):
        if not _is_library(node.module) or node.level:
            return
        if _module_private(node.module):
            self.found.add(node.module)
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            if _private(alias.name) or _module_private(full) and _is_module(full):
                self.found.add(full)
            self.bound[alias.asname or alias.name] = full

    def visit_Attribute(self, node):
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.bound:
            prefix = self.bound[base.id]
            for attr in chain:
                full = f"{prefix}.{attr}"
                if _private(attr) or prefix == "submitit" and _is_module(full) \
                        and _module_private(full):
                    self.found.add(full)
                    break
                prefix = full
        elif self.classes and _private(node.attr) and _self_or_super(node.value):
            bases, own = self.classes[-1]
            if node.attr not in own and any(_library_defines(b, node.attr) for b in bases):
                self.found.add(f"<library base class>.{node.attr}")  # e.g. Registry._do_register
        self.generic_visit(node)

    def visit_Call(self, node):
        # getattr(comm, "_LOCAL_PROCESS_GROUP"), setattr(...): the name as a string
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) \
                and node.args[0].id in self.bound and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value):
            self.found.add(f"{self.bound[node.args[0].id]}.{node.args[1].value}")
        self.generic_visit(node)

    def visit_ClassDef(self, node):
        library_bases = [self._dotted(b) for b in node.bases]
        library_bases = [b for b in library_bases if b]
        # what the class itself defines: methods, class attributes, attributes it assigns
        own = {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node)
                if isinstance(n, (ast.Attribute, ast.Name)) and isinstance(n.ctx, ast.Store)}
        self.classes.append((library_bases, own))
        self.generic_visit(node)
        self.classes.pop()


    def _dotted(self, node) -> str | None:
        """The library object a base-class expression names (`comm.X` -> detectron2...X)."""
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.bound:
            return ".".join([self.bound[node.id], *chain])
        return None


def _library_defines(dotted: str, attr: str) -> bool:
    """Whether the library class `dotted` (or a class it derives from) has or sets `attr`: a
    method or class attribute, or `self.<attr>` in its source (instance attributes)."""
    import importlib
    import inspect

    module, _, name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return True  # cannot be resolved: the private name may well be the library's
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        if not _is_library(klass.__module__):  # e.g. torch's nn.Module: not this test's scope
            continue
        if attr in vars(klass):
            return True
        try:
            if f"self.{attr}" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            continue
    return False


def _self_or_super(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "self" or isinstance(node, ast.Call) \
        and isinstance(node.func, ast.Name) and node.func.id == "super"


def _is_module(dotted: str) -> bool:
    """Whether `dotted` names a module (a submitit sub-package) rather than a class or function."""
    import importlib.util

    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def private_uses(source: str) -> set:
    """The private detectron2 / fvcore / submitit names `source` uses (dotted)."""
    scan = _Scan()
    scan.visit(ast.parse(source))
    return scan.found


def _sources():
    for folder in ("nst_det", "tools"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_sources_use_only_public_library_api():
    found = {}
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        names = {n for n in private_uses(path.read_text()) if (rel, n) not in ALLOWED}
        if names:
            found[rel] = sorted(names)
    assert not found, f"private detectron2/fvcore/submitit API used: {found}"


# the private uses nst_det had (and close variants), each of which the scan must report
ONCE_USED = [
    ("detectron2.utils.comm._LOCAL_PROCESS_GROUP", """
        from detectron2.utils import comm
        comm._LOCAL_PROCESS_GROUP = group
    """),
    ("detectron2.utils.comm._LOCAL_PROCESS_GROUP", """
        import detectron2.utils.comm
        detectron2.utils.comm._LOCAL_PROCESS_GROUP = group
    """),
    ("<library base class>._do_register", """
        from fvcore.common.registry import Registry
        class Named(Registry):
            def register(self, obj, name):
                self._do_register(name, obj)
    """),
    ("submitit.core", """
        import submitit
        paths = submitit.core.utils.JobPaths(folder, job_id="1", task_id=0)
    """),
    ("submitit.core.utils", """
        from submitit.core.utils import JobPaths
    """),
    ("detectron2.data.catalog._DatasetCatalog", """
        from detectron2.data.catalog import _DatasetCatalog
    """),
    ("fvcore.common.registry.Registry._obj_map", """
        from fvcore.common.registry import Registry as R
        names = getattr(R, "_obj_map")
    """),
]


@pytest.mark.parametrize("name, source", ONCE_USED, ids=[f"{i}-{n}" for i, (n, _) in
                                                        enumerate(ONCE_USED)])
def test_the_scan_reports_private_uses(name, source):
    assert name in private_uses(textwrap.dedent(source))


def test_the_scan_accepts_public_api_and_own_private_names():
    source = """
        import submitit
        from detectron2.utils import comm
        from fvcore.common.registry import Registry
        class Named(Registry):
            def __init__(self):
                self._mine = 1
            def _helper(self):
                return self._mine + comm.get_rank()
        env = submitit.JobEnvironment()
        submitit.helpers.Checkpointable
        _x = comm.__name__
    """
    assert private_uses(textwrap.dedent(source)) == set()


_IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys

import matplotlib
from detectron2.data import DatasetCatalog, MetadataCatalog

before = {name: DatasetCatalog[name] for name in DatasetCatalog.list()}
meta = {name: repr(sorted(MetadataCatalog.get(name).as_dict().items())) for name in before}
import nst_det
for module in pkgutil.walk_packages(nst_det.__path__, "nst_det."):
    importlib.import_module(module.name)
print(json.dumps({
    "replaced": sorted(n for n, fn in before.items() if DatasetCatalog.list().count(n) != 1
                       or DatasetCatalog[n] is not fn),
    "metadata_changed": sorted(n for n in before if meta[n] != repr(
        sorted(MetadataCatalog.get(n).as_dict().items()))),
    "kept": len(before),
    "added": sorted(set(DatasetCatalog.list()) - set(before)),
    "backend": matplotlib.get_backend(),
    "pyplot": "matplotlib.pyplot" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def import_effects():
    """What importing every nst_det module does, in a fresh interpreter with the pdf backend."""
    env = {**os.environ, "MPLBACKEND": "pdf"}
    run = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_importing_nst_det_keeps_detectron2_datasets(import_effects):
    assert import_effects["kept"] > 0  # detectron2's built-in sets (voc_*, coco_*) were there
    assert import_effects["replaced"] == []
    assert import_effects["metadata_changed"] == []
    assert "toy_voc_2007_trainval" in import_effects["added"]  # nst_det's own sets are new names


def test_importing_nst_det_leaves_matplotlib_alone(import_effects):
    assert import_effects["backend"].lower() == "pdf"
    assert not import_effects["pyplot"]
