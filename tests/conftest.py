"""Shared fixtures: tiny generated data sets, so tests never need real VOC/ImageNet."""

import itertools
import os
import shutil

import pytest

# One OpenMP thread per process (unless set): the test workers and the training processes the
# tests start already fill the cores, and two threads each only added switching (the three
# heaviest end-to-end files: 235 s -> 220 s of wall-clock on 2 cores). Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tests' HTTP servers (downloads) listen on the loopback: never through a proxy the machine
# sets for the outside
for _name in ("no_proxy", "NO_PROXY"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))

_counter = itertools.count()


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """A registered 8-trainval / 4-test toy VOC set: returns (train_name, test_name, dirname)."""
    from nst_det.data import make_toy_voc
    from nst_det.data.datasets import register_toy_voc

    dirname = str(tmp_path_factory.mktemp("tiny_voc") / "VOC2007")
    prefix = f"tiny_voc_{next(_counter)}"
    train, test = register_toy_voc(prefix, dirname, seed=1, num_trainval=8, num_test=4)
    make_toy_voc(dirname, seed=1, num_trainval=8, num_test=4)  # write it now, not on first load
    return train, test, dirname


@pytest.fixture
def voc(tiny_voc, tmp_path):
    """A private copy of the tiny toy VOC set that a test may damage (its VOC2007 folder)."""
    import shutil

    copy = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc[2], copy)
    return copy


@pytest.fixture(scope="module")
def tool_export(tmp_path_factory, tiny_voc):
    """The tiny toy set as a labelling tool's COCO export: {split: (json_file, image_root)}."""
    from _coco_export import labelling_tool_export

    out = tmp_path_factory.mktemp("tool_export")
    return {split: labelling_tool_export(tiny_voc[2], split, out) for split in ("trainval", "test")}


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
    """A folder shared by one test module's tests, deleted after the module when they all passed.

    Module fixtures hold checkpoints of real ResNets (tens of MB each); keeping every module's
    folder until the session ends (pytest's default) piles up gigabytes on CI's disk.
    """
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """End-to-end files first, those with the most end-to-end tests first.

    `make test` hands whole files to the workers in this order (pytest-xdist --dist loadfile
    --no-loadscope-reorder): a long file started last would leave the other core idle until it
    ends, while the many short files even out the end of the run.
    """
    slow = {}
    for item in items:
        if item.get_closest_marker("slow"):
            slow[item.path] = slow.get(item.path, 0) + 1
    order = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow.get(item.path, 0), order[item.path]))
