"""Data sets named in the config (DATASETS.COCO, DATASETS.VOC): registered without code.

`register_datasets_from_config(cfg)` runs wherever a config is loaded (`nst_det.config.
load_config`; a teacher's config excepted), so every entry point (training, evaluation, the
pipeline's stage processes, tools/predict.py, tools/export_model.py) can name these sets in
DATASETS.TRAIN / DATASETS.TEST:

    DATASETS.COCO: [[name, json_file, image_root], ...]
        detectron2's `register_coco_instances`, its loader swapped for `load_coco_checked`
        (clear errors); evaluated with detectron2's COCOEvaluator.
    DATASETS.VOC: [[name, dirname, split], [name, dirname, split, classes, year], ...]
        a VOC-layout folder (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt) read by the
        checked VOC loader. `classes`: a list or a comma-separated string; empty or absent: the
        sorted class names found in all of dirname/Annotations/*.xml (the same list for every
        split of the folder). `year`: 2007 evaluates with the VOC07 11-point AP; absent: 2007
        when the folder is named VOC2007, else 2012 (area under the PR curve).

Registration is lazy (the files are read and checked when the data set is first loaded), except
for a VOC set without a class list, whose annotations are scanned for class names at once.
Registering the same name again with the same spec is a no-op; with another spec it is an error.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from xml.etree import ElementTree as ET

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .coco_checked import load_coco_checked
from .voc_checked import VOCDataError, load_voc_checked

__all__ = ["configured_classes", "register_coco", "register_datasets_from_config", "register_voc",
           "thing_classes", "voc_classes_found"]

logger = logging.getLogger(__name__)

# name -> spec of every data set registered here (to make repeated registration a no-op)
_REGISTERED: dict[str, tuple] = {}


def _claim(name: str, spec: tuple) -> bool:
    """True if `name` must be registered now; False if it already is, with this spec."""
    if _REGISTERED.get(name) == spec:
        return False
    if name in _REGISTERED:
        raise ValueError(f"data set {name!r} is already registered as {_REGISTERED[name]}; "
                         f"cannot register it again as {spec}. Give it another name")
    if name in DatasetCatalog.list():
        raise ValueError(f"data set name {name!r} is taken (a built-in data set of detectron2 or "
                         "nst_det); give DATASETS.COCO / DATASETS.VOC entries other names")
    return True


def register_coco(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format detection set (evaluator_type "coco") under `name`."""
    spec = ("coco", json_file, image_root)
    if not _claim(name, spec):
        return
    register_coco_instances(name, {}, json_file, image_root)
    # same records and metadata as detectron2's loader, after checks naming file and entry
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_checked(json_file, image_root, name))
    _REGISTERED[name] = spec


def voc_classes_found(dirname: str) -> list[str]:
    """The sorted class names used in dirname/Annotations/*.xml.

    Raises:
        VOCDataError: no such folder, no annotation folder or files, an unreadable file, or no
            object at all.
    """
    if not os.path.isdir(dirname):
        raise VOCDataError(f"VOC folder {dirname} does not exist (working directory "
                           f"{os.getcwd()}). Check the path")
    folder = os.path.join(dirname, "Annotations")
    files = sorted(glob.glob(os.path.join(folder, "*.xml")))
    if not files:
        raise VOCDataError(f"{folder} holds no .xml annotations: cannot find the class names. "
                           "Give them in the DATASETS.VOC entry ([name, dirname, split, classes])")
    names = set()
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise VOCDataError(f"{path} is not valid XML ({e}). Fix or regenerate it") from None
        names.update(n.text.strip() for n in root.iterfind("object/name") if n.text)
    if not names:
        raise VOCDataError(f"no <object><name> in any of the {len(files)} files of {folder}")
    return sorted(names)


def _voc_year(dirname: str, year) -> int:
    if year not in (None, ""):
        return int(year)
    found = re.search(r"VOC(\d{4})", os.path.basename(os.path.normpath(dirname)))
    return int(found.group(1)) if found else 2012


def _check_all_used(records: list, classes: list, dirname: str, split: str) -> list:
    """Warn about listed classes that no object of the split uses (legal, but often a typo)."""
    used = {a["category_id"] for r in records for a in r["annotations"]}
    unused = [c for i, c in enumerate(classes) if i not in used]
    if unused:
        logger.warning(f"VOC set {dirname} split {split!r}: no object of the classes {unused} "
                       "(check the class list's spelling against the annotations)")
    return records


def _class_list(classes):
    """A DATASETS.VOC class list as given: a comma-separated string split into names."""
    if isinstance(classes, str):
        return [c.strip() for c in classes.split(",") if c.strip()]
    return classes


def register_voc(name: str, dirname: str, split: str, classes=None, year=None) -> None:
    """Register a VOC-layout split (evaluator_type "pascal_voc") under `name`.

    Args:
        classes: list of class names (or a comma-separated string); None/empty: the classes
            found in the folder's annotations (`voc_classes_found`).
        year: the VOC metric year (2007: 11-point AP); None: from the folder name, else 2012.
    """
    classes = _class_list(classes)
    if classes and not (isinstance(classes, (list, tuple))
                        and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"VOC set {name!r}: its class list (the 4th item of a DATASETS.VOC "
                         f"entry) is {classes!r}; give a list of names or a comma-separated "
                         "string, or '' to use the names found in the annotations, e.g. "
                         "[name, dirname, split, '', 2007]")
    classes = list(classes or [])
    year = _voc_year(dirname, year)
    spec = ("voc", dirname, split, tuple(classes), year)
    if not _claim(name, spec):
        return
    if len(set(classes)) != len(classes):
        raise VOCDataError(f"VOC set {name!r}: class list {classes} names a class twice")
    if not classes:
        classes = voc_classes_found(dirname)
        logger.info(f"VOC set {name!r}: classes found in {dirname}/Annotations: {classes}")
    DatasetCatalog.register(name, lambda: _check_all_used(
        load_voc_checked(dirname, split, classes), classes, dirname, split))
    MetadataCatalog.get(name).set(thing_classes=list(classes), dirname=dirname, year=year,
                                  split=split, evaluator_type="pascal_voc")
    _REGISTERED[name] = spec


def _entries(cfg_value, key: str, sizes: tuple) -> list:
    entries = list(cfg_value)
    if entries and isinstance(entries[0], str):  # a single entry, not a list of them
        entries = [entries]
    for e in entries:
        if not isinstance(e, (list, tuple)) or len(e) not in sizes:
            raise ValueError(f"{key} entry {e!r}: expected a list of {' or '.join(map(str, sizes))}"
                             " items (see nst_det/config.py)")
    return entries


def register_datasets_from_config(cfg) -> list[str]:
    """Register every data set of cfg.DATASETS.COCO and cfg.DATASETS.VOC.

    Returns:
        the names registered (or already registered with the same spec).
    """
    names = []
    for name, json_file, image_root in _entries(cfg.DATASETS.COCO, "DATASETS.COCO", (3,)):
        register_coco(name, json_file, image_root)
        names.append(name)
    for entry in _entries(cfg.DATASETS.VOC, "DATASETS.VOC", (3, 4, 5)):
        register_voc(*entry)
        names.append(entry[0])
    return names


def configured_classes(cfg, name: str) -> list[str] | None:
    """The class names of data set `name` as `cfg` knows them without registering anything:
    the registered set's, else its DATASETS.VOC entry's list (or the names found in its folder,
    when that can be read), else None (e.g. an unregistered COCO set: its json holds them). For
    a config whose sets are not registered, such as a teacher's."""
    if name in DatasetCatalog.list() and MetadataCatalog.get(name).get("thing_classes"):
        return list(MetadataCatalog.get(name).thing_classes)
    for entry in _entries(cfg.DATASETS.VOC, "DATASETS.VOC", (3, 4, 5)):
        if entry[0] != name:
            continue
        classes = _class_list(entry[3] if len(entry) > 3 else None)
        if classes:
            return list(classes)
        try:
            return voc_classes_found(entry[1])
        except VOCDataError:  # the folder moved or is elsewhere: unknown here
            return None
    return None


def thing_classes(name: str) -> list[str]:
    """The class names of data set `name`. A COCO set learns them from its json and an
    ImageFolder from its class folders, so such a set is loaded (and checked) first when its
    metadata does not have them yet."""
    meta = MetadataCatalog.get(name)
    if not meta.get("thing_classes") and meta.get("evaluator_type") in ("coco", "classification"):
        DatasetCatalog.get(name)
    return list(meta.get("thing_classes", []))
