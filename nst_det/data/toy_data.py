"""Write the toy data sets to disk: a VOC2007-layout detection set and an ImageFolder set.

Both are deterministic: every image has its own generator seeded by (seed, split, index), and
JPEGs are written with fixed settings, so the same arguments give the same bytes. A data set is
written into a temporary folder and renamed into place, so an interrupted run never leaves a
half-written data set at the final path; an inter-process lock makes one process the writer when
several ask for the same set at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from filelock import FileLock
from PIL import Image

from .toy_world import TOY_CLASSES, ToyObject, draw_clutter, draw_object, textured_background

logger = logging.getLogger(__name__)
SPEC_FILE = "toy_spec.json"
# every file of a finished set with its size: a set damaged since (an image deleted or cut
# short, an annotation emptied) is written again instead of failing later in a loader
FILES_FILE = "toy_files.json"
# "train" / "val": the classification set's splits; "minival": the detection set's validation
# split, disjoint from trainval and test (own generator stream, own id prefix). The id is also the
# first digit of a detection image's file id, so the splits' image ids never collide.
_SPLIT_IDS = {"trainval": 0, "test": 1, "train": 2, "val": 3, "minival": 4}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=92, subsampling=0, optimize=False)


def render_detection_image(
    seed: int, split: str, index: int, min_size: int = 128, max_size: int = 224
) -> tuple[np.ndarray, list[ToyObject], list[bool]]:
    """Render one detection image with 2-6 objects of varied sizes.

    Returns:
        (image uint8 (H, W, 3) RGB, objects, difficult flags). An object is `difficult` when it is
        tiny (radius < 7 px) or more than 40% of its box is covered by later objects, as in VOC
        where difficult objects are hard to recognise.
    """
    rng = _rng(seed, split, index)
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    img = textured_background(rng, height, width)
    draw_clutter(rng, img, int(rng.integers(1, 5)))
    objects: list[ToyObject] = []
    masks: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(int(rng.integers(2, 7))):
        r = float(np.exp(rng.uniform(np.log(5), np.log(min(height, width) * 0.3))))
        cx, cy = rng.uniform(r * 0.6, width - r * 0.6), rng.uniform(r * 0.6, height - r * 0.6)
        obj = draw_object(rng, img, int(rng.integers(len(TOY_CLASSES))), cx, cy, r)
        mask = np.zeros((height, width), bool)
        x0, y0, x1, y1 = obj.box
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
        for earlier in masks:
            earlier &= ~mask  # the new object hides what lies under its box
        objects.append(obj)
        masks.append(mask)
        radii.append(r)
    difficult = []
    for obj, mask, r in zip(objects, masks, radii):
        x0, y0, x1, y1 = obj.box
        visible = mask.sum() / max(1, (x1 - x0 + 1) * (y1 - y0 + 1))
        difficult.append(bool(r < 7 or visible < 0.6))
    return img, objects, difficult


def _voc_xml(file_id: str, height: int, width: int, objects, difficult) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for obj, diff in zip(objects, difficult):
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = TOY_CLASSES[obj.label]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = str(int(diff))
        box = ET.SubElement(node, "bndbox")
        # VOC boxes are 1-based and inclusive; detectron2's loader subtracts 1 from xmin/ymin
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ET.SubElement(box, key).text = str(int(value) + 1)
    return ET.tostring(root)


def _write_voc(out: Path, seed: int, num_trainval: int, num_test: int,
               num_minival: int = 0) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = [("trainval", num_trainval), ("test", num_test)]
    if num_minival:
        splits.append(("minival", num_minival))
    for split, count in splits:
        ids = []
        for index in range(count):
            file_id = f"{_SPLIT_IDS[split]}{index:05d}"
            img, objects, difficult = render_detection_image(seed, split, index)
            _save_jpeg(img, out / "JPEGImages" / f"{file_id}.jpg")
            xml = _voc_xml(file_id, img.shape[0], img.shape[1], objects, difficult)
            (out / "Annotations" / f"{file_id}.xml").write_bytes(xml)
            ids.append(file_id)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def render_classification_image(seed: int, split: str, index: int, label: int, size: int):
    """One image whose class is its single large, roughly centred object (uint8 (S, S, 3))."""
    rng = _rng(seed, split, index)
    img = textured_background(rng, size, size)
    draw_clutter(rng, img, int(rng.integers(0, 4)))
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    draw_object(rng, img, label, cx, cy, r)
    return img


def _write_imagefolder(out: Path, seed: int, per_class: dict[str, int], size: int) -> None:
    for split, count in per_class.items():
        for label, name in enumerate(TOY_CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                index = label * count + k
                img = render_classification_image(seed, split, index, label, size)
                _save_jpeg(img, folder / f"{index:05d}.jpg")


def _read_spec(spec_path: Path):
    """The spec a finished set carries, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(spec_path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _file_sizes(folder: Path) -> dict:
    """relative path -> size of each file of a set, its spec and file list aside."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SPEC_FILE
            and not p.name.lstrip(".").startswith(FILES_FILE)}


def _record_files(folder: Path) -> None:
    """Write `FILES_FILE` of a set (through a temporary file: readers see a whole list)."""
    tmp = folder / f".{FILES_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(_file_sizes(folder)))
    os.replace(tmp, folder / FILES_FILE)


def _damage(final: Path) -> str | None:
    """What is wrong with a finished set's files (one stat each), or None when each file it was
    written with is there with its size. Files added since (e.g. a COCO copy) are no damage, and
    a set written before file lists were (no FILES_FILE) is taken as whole."""
    try:
        sizes = json.loads((final / FILES_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"its file list {FILES_FILE} is unreadable ({type(e).__name__})"
    if not isinstance(sizes, dict):
        return f"its file list {FILES_FILE} holds no file list"
    for name, size in sizes.items():
        try:
            found = (final / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes, not the {size} written"
    return None


def _remove_leftovers(final: Path) -> None:
    """Remove temp folders a killed writer left beside `final` (called with the lock held):
    exactly the names `_materialise`'s mkdtemp gives, not another set's (`.VOC2007.v2.x.tmp`
    is VOC2007.v2's, whose own lock we do not hold)."""
    mine = re.compile(re.escape(f".{final.name}.") + r"[a-z0-9_]{8}\.(tmp|old)")
    for stale in final.parent.glob(f".{final.name}.*"):
        if mine.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _materialise(final: Path, spec: dict, writer) -> Path:
    """Write a data set into a temp folder beside `final`, then rename it into place.

    Safe under any concurrency (pipeline stages side by side, DDP ranks, two users of one data
    root): writers take an inter-process file lock beside `final`, and whoever holds it re-reads
    the spec first, so exactly one process writes and every other one reuses its copy. A finished
    set with the same spec and all its files (`_damage`) is never moved or deleted, so no file a
    reader saw disappears. A set with a different spec, or damaged, is replaced only once the new
    one is whole.
    """
    spec_path = final / SPEC_FILE
    if _read_spec(spec_path) == spec and _damage(final) is None:
        if not (final / FILES_FILE).exists():  # written before file lists: give it one
            with contextlib.suppress(OSError):  # (a data root we cannot write: used as before)
                _record_files(final)
        return final  # the common case: no lock, no write access needed
    final.parent.mkdir(parents=True, exist_ok=True)
    # mode 0o666: another user sharing the data root can take the lock too
    with FileLock(str(final.parent / f".{final.name}.lock"), mode=0o666):
        if _read_spec(spec_path) == spec:  # another process wrote it while we waited
            damage = _damage(final)
            if damage is None:
                return final
            logger.warning("toy data set %s is damaged (%s): writing it again", final, damage)
        _remove_leftovers(final)  # what a hard kill of an earlier writer left behind
        if final.exists() and not spec_path.exists():
            raise FileExistsError(
                f"{final} exists but holds no {SPEC_FILE}: it is not a toy data set written by "
                "nst_det. Move it away or point DETECTRON2_DATASETS elsewhere."
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            writer(tmp)
            _record_files(tmp)
            (tmp / SPEC_FILE).write_text(json.dumps(spec, sort_keys=True))
            umask = os.umask(0)  # mkdtemp made it 0700: give the set the usual folder mode,
            os.umask(umask)  # so other users of the data root can read it
            os.chmod(tmp, 0o777 & ~umask)
            if final.exists():
                # a different spec was asked for: move the old set away, the new one in, and
                # only then delete the old (the path is absent only between two renames)
                stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old",
                                              dir=final.parent))
                os.replace(final, stale / "set")
                os.replace(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_toy_voc(root: str | os.PathLike, seed: int = 0, num_trainval: int = 300,
                 num_test: int = 150, num_minival: int = 0) -> Path:
    """Write (or reuse) the toy VOC2007-layout set at `root` (the folder holding Annotations/).

    `num_minival` > 0 adds ImageSets/Main/minival.txt: a validation split for choosing settings
    (e.g. loss weights), disjoint from trainval and test. Unlike real VOC's `val` it is not part
    of trainval. With the default 0 the set (spec and bytes) is what it was without the option.

    Returns:
        the data set folder, usable as the `dirname` of detectron2's `register_pascal_voc`.
    """
    spec = {"kind": "voc2007", "seed": seed, "trainval": num_trainval, "test": num_test,
            "classes": list(TOY_CLASSES)}
    if num_minival:
        spec["minival"] = num_minival
    return _materialise(Path(root), spec,
                        lambda d: _write_voc(d, seed, num_trainval, num_test, num_minival))


def make_toy_imagefolder(root: str | os.PathLike, seed: int = 0, train_per_class: int = 300,
                         val_per_class: int = 100, size: int = 96) -> Path:
    """Write (or reuse) the toy ImageFolder set at `root` ({train,val}/<class>/*.jpg)."""
    per_class = {"train": train_per_class, "val": val_per_class}
    spec = {"kind": "imagefolder", "seed": seed, "per_class": per_class, "size": size,
            "classes": list(TOY_CLASSES)}
    return _materialise(Path(root), spec, lambda d: _write_imagefolder(d, seed, per_class, size))
