"""Every YAML under configs/ loads into a detectron2 config extended by add_nst_config; every
LazyConfig (.py) under configs/ loads and its `model` instantiates."""

import re
from pathlib import Path

import pytest
from detectron2.config import LazyConfig, get_cfg, instantiate
from torch import nn

from nst_det import add_nst_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))
LAZY_CONFIGS = sorted(ROOT.rglob("*.py"))


def _named_configs() -> set:
    """Every configs/... path the README, docs and the pipeline's plans name."""
    repo = ROOT.parent
    texts = [p.read_text() for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md")),
                                     *sorted((repo / "nst_det" / "pipeline").glob("*.py"))]]
    return {repo / m for text in texts for m in re.findall(r"configs/[\w./-]+\.(?:yaml|py)", text)}


def test_every_config_named_by_the_readme_docs_and_plans_exists_and_is_loaded_here():
    named = _named_configs()
    assert ROOT / "quick_schedules" / "faster_rcnn_R_18_FPN_toy.yaml" in named  # the scan works
    missing = sorted(str(p) for p in named if not p.is_file())
    assert missing == []
    assert named <= set(CONFIGS) | set(LAZY_CONFIGS)  # so each is parametrized below


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads(path):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.freeze()


@pytest.mark.parametrize("path", LAZY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lazy_config_loads(path):
    cfg = LazyConfig.load(str(path))
    assert isinstance(instantiate(cfg.model), nn.Module)
