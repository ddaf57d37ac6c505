"""ImageFolder classification datasets in detectron2's DatasetCatalog.

Layout (torchvision's ImageFolder): `<root>/<class>/<image>`; classes are the sorted folder
names, so ImageNet labels match torchvision's published models. A dataset dict is
`{"file_name": str, "image_id": int, "label": int}`; metadata has `thing_classes` and
`evaluator_type = "classification"`.

Registered here:
* `imagenet_train`, `imagenet_val`: `$DETECTRON2_DATASETS/imagenet/{train,val}` (val sorted
  into class folders, as for torchvision's ImageFolder);
* `toy_cls_train`, `toy_cls_val`: the toy shapes set, generated on first load under
  `$DETECTRON2_DATASETS/toy/cls` (200 + 60 images per class, 48 x 48 px).
"""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .datasets import datasets_root
from .toy_data import make_toy_imagefolder
from .toy_world import TOY_CLASSES

__all__ = ["load_imagefolder", "register_imagefolder", "register_toy_imagefolder"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# the built-in toy classification set (fixed: changing it changes every toy number)
TOY_CLS = {"seed": 0, "train_per_class": 200, "val_per_class": 60, "size": 48}


def load_imagefolder(root: str) -> tuple[list[dict], list[str]]:
    """List `<root>/<class>/<image>` files, images in sub-folders of a class folder included
    (as torchvision's ImageFolder, following links).

    Returns:
        (dataset dicts sorted by class, then folder and file name; sorted class names).
    Raises:
        FileNotFoundError: `root` is missing, or a class folder holds no image.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder root not found: {root!r} (see datasets/README.md)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    dicts, empty = [], []
    for label, name in enumerate(classes):
        files = [os.path.join(folder, f)
                 for folder, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True))
                 for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
        empty += [name] if not files else []
        dicts += [{"file_name": f, "image_id": len(dicts) + i, "label": label}
                  for i, f in enumerate(files)]
    if empty or not classes:
        raise FileNotFoundError(f"{root!r}: class folders without images {empty} (expected "
                                f"<root>/<class>/<image>, extensions {IMG_EXTENSIONS})")
    return dicts, classes


def register_imagefolder(name: str, root: str, classes: list[str] | None = None,
                         prepare=None) -> str:
    """Register ImageFolder `root` as `name`; `prepare()` runs before each load (e.g. to
    generate the data). If `classes` is given, the folders must be exactly those classes.
    """

    def load():
        if prepare is not None:
            prepare()
        dicts, found = load_imagefolder(root)
        if classes is not None and list(classes) != found:
            raise ValueError(f"{root}: class folders {found} != expected {list(classes)}")
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "thing_classes"):
            meta.thing_classes = found
        return dicts

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name)
    meta.set(image_root=root, evaluator_type="classification")
    if classes is not None:
        meta.set(thing_classes=list(classes))
    return name


def register_toy_imagefolder(prefix: str, dirname: str, seed: int = 0, train_per_class: int = 200,
                             val_per_class: int = 60, size: int = 48) -> list[str]:
    """Register `<prefix>_train` / `<prefix>_val`, generating the toy set on first load.

    Labels follow ImageFolder's sorted folder names (not TOY_CLASSES' order); the classifier
    head is dropped at conversion, so the detection stage is unaffected.
    """

    def prepare():
        make_toy_imagefolder(dirname, seed=seed, train_per_class=train_per_class,
                             val_per_class=val_per_class, size=size)

    return [
        register_imagefolder(f"{prefix}_{split}", os.path.join(dirname, split),
                             classes=sorted(TOY_CLASSES), prepare=prepare)
        for split in ("train", "val")
    ]


def register_builtin_imagefolders() -> None:
    """ImageNet (if present when loaded) and the toy classification set."""
    root = datasets_root()
    for split in ("train", "val"):
        register_imagefolder(f"imagenet_{split}", os.path.join(root, "imagenet", split))
    register_toy_imagefolder("toy_cls", os.path.join(root, "toy", "cls"), **TOY_CLS)
    # a reduced copy for the pipeline's CI-scale run (tools/run_pipeline.py --scale ci): few
    # val images (evaluation cost), but as many training images as the demo's set, so writing
    # it takes long enough (~1-2 s) that stages started side by side race for it, as on a fresh
    # clone's `make demo` (tests/test_pipeline.py); training runs a fixed few iterations
    register_toy_imagefolder("toy_cls_tiny", os.path.join(root, "toy", "cls_tiny"),
                             **{**TOY_CLS, "val_per_class": 4})


register_builtin_imagefolders()
