"""Every YAML under configs/ loads into a detectron2 config extended by add_nst_config."""

from pathlib import Path

import pytest
from detectron2.config import get_cfg

from nst_det import add_nst_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) > 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads(path):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.freeze()
