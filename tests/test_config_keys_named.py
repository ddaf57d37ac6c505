"""Every config key that nst_det's messages and docs name exists (in get_cfg() + add_nst_config).

Found by scanning the source, not listed by hand: a message added tomorrow is checked too. (An
error once advised `DATALOADER.SKIP_BAD_IMAGES`, a key that never existed.)
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((REPO / "nst_det").rglob("*.py")), *sorted((REPO / "tools").glob("*.py"))]
# UPPER.CASE.KEY with at least one dot, not part of a longer dotted or lower-case name
KEY = re.compile(r"(?<![\w.])([A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)+)(?![\w.]*[a-z(])")
_LOG_CALLS = {"debug", "info", "warning", "warn", "error", "critical", "exception", "print"}


def _all_keys() -> set[str]:
    from detectron2.config import get_cfg

    from nst_det import add_nst_config

    cfg = get_cfg()
    add_nst_config(cfg)
    keys = set()

    def walk(node, prefix):
        for name, value in node.items():
            keys.add(prefix + name)
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")

    walk(cfg, "")
    return keys


def _strings(node) -> list[ast.Constant]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _named_keys(path: Path):
    """(line, key, in_message) for every key-like name in a string of `path`: in_message when the
    string is part of a raise or a log/warn/print call."""
    tree = ast.parse(path.read_text(), filename=str(path))
    message_ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            message_ids.update(id(s) for s in _strings(node.exc))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _LOG_CALLS:
                message_ids.update(id(s) for s in _strings(node))
    for const in _strings(tree):
        for match in KEY.finditer(const.value):
            yield const.lineno, match.group(1), id(const) in message_ids


def test_the_scanner_finds_keys_in_messages(tmp_path):
    # the scanner itself: a raise with a wrong key is found and flagged as a message
    sample = tmp_path / "sample.py"
    sample.write_text('raise RuntimeError(f"x {y}: set DATALOADER.SKIP_BAD_IMAGES True")\n'
                      '"""Docs name RESNETS.DEPTH and model.pth, not README.md or cfg.MODEL."""\n')
    assert sorted(_named_keys(sample)) == [(1, "DATALOADER.SKIP_BAD_IMAGES", True),
                                         (2, "RESNETS.DEPTH", False)]


def test_every_named_config_key_exists():
    keys = _all_keys()
    wrong, found = [], 0
    for path in SOURCES:
        for line, key, in_message in _named_keys(path):
            found += 1
            # a message names the full key; docs may shorten it to a tail ("RESNETS.DEPTH")
            ok = key in keys if in_message else any(k == key or k.endswith("." + key)
                                                    for k in keys)
            if not ok:
                where = "message" if in_message else "text"
                wrong.append(f"{path.relative_to(REPO)}:{line}: {key} ({where})")
    assert found > 50  # the scan sees the source's messages (about 100 names today)
    assert wrong == []
