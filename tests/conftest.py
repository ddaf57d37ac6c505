"""Shared fixtures: tiny generated data sets, so tests never need real VOC/ImageNet."""

import itertools

import pytest

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
