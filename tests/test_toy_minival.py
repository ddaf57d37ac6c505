"""Issue 26, part 2 (data only): the toy detection set's validation split, disjoint from
trainval and test."""

import filecmp
import hashlib
import json

from nst_det.data import make_toy_voc
from nst_det.data.datasets import register_toy_voc
from nst_det.data.toy_data import SPEC_FILE


def _ids(root, split):
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_minival_is_disjoint_from_trainval_and_test(tmp_path):
    root = make_toy_voc(tmp_path / "v", seed=2, num_trainval=5, num_test=3, num_minival=4)
    ids = {split: _ids(root, split) for split in ("trainval", "test", "minival")}
    assert [len(ids[s]) for s in ("trainval", "test", "minival")] == [5, 3, 4]
    every = [i for split in ids.values() for i in split]
    assert len(set(every)) == len(every)  # no image id in two splits
    # nor the same picture under another id
    digest = {i: hashlib.sha256((root / "JPEGImages" / f"{i}.jpg").read_bytes()).hexdigest()
              for i in every}
    assert len(set(digest.values())) == len(every)
    assert json.loads((root / SPEC_FILE).read_text())["minival"] == 4

    # adding the split leaves trainval and test as they were, and the default adds nothing
    plain = make_toy_voc(tmp_path / "p", seed=2, num_trainval=5, num_test=3)
    assert not (plain / "ImageSets" / "Main" / "minival.txt").exists()
    assert "minival" not in json.loads((plain / SPEC_FILE).read_text())
    for i in ids["trainval"] + ids["test"]:
        for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "xml")):
            assert filecmp.cmp(root / sub / f"{i}.{ext}", plain / sub / f"{i}.{ext}",
                               shallow=False), i


def test_registered_minival_records_share_no_image_with_train_or_test(tmp_path):
    from detectron2.data import DatasetCatalog

    names = register_toy_voc("minival_check", str(tmp_path / "VOC2007"), seed=5,
                             num_trainval=4, num_test=2, num_minival=3)
    assert names == ["minival_check_trainval", "minival_check_test", "minival_check_minival"]
    records = {n: DatasetCatalog.get(n) for n in names}
    image_ids = {n: {r["image_id"] for r in rs} for n, rs in records.items()}
    files = {n: {r["file_name"] for r in rs} for n, rs in records.items()}
    assert [len(image_ids[n]) for n in names] == [4, 2, 3]
    for a in names:
        for b in names:
            if a != b:
                assert not image_ids[a] & image_ids[b] and not files[a] & files[b], (a, b)
    assert all(r["annotations"] for r in records["minival_check_minival"])
    assert register_toy_voc("minival_none", str(tmp_path / "other"), num_trainval=2,
                            num_test=1) == ["minival_none_trainval", "minival_none_test"]


def test_a_minival_registered_in_its_own_folder_is_disjoint_from_the_registered_sets(tmp_path):
    """As the built-in toy_voc_*_minival: the minival split alone, in a folder of its own, beside
    sets registered without one (their folders and spec files untouched)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    sizes = {"seed": 4, "num_trainval": 4, "num_test": 2}
    sets = register_toy_voc("own_folder", str(tmp_path / "VOC2007"), **sizes)
    (minival,) = register_toy_voc("own_folder", str(tmp_path / "VOC2007_minival"), **sizes,
                                  num_minival=3, splits=("minival",))
    assert minival == "own_folder_minival"

    def pictures(name):
        return {hashlib.sha256(open(r["file_name"], "rb").read()).hexdigest()
                for r in DatasetCatalog.get(name)}

    seen = {name: pictures(name) for name in [*sets, minival]}
    assert len(seen[minival]) == 3
    assert not seen[minival] & (seen[sets[0]] | seen[sets[1]])
    assert "minival" not in json.loads((tmp_path / "VOC2007" / SPEC_FILE).read_text())
    # the built-in sets come with theirs, each in its own folder
    for prefix in ("toy_voc_tiny", "toy_voc_2007"):
        meta = MetadataCatalog.get(f"{prefix}_minival")
        assert meta.split == "minival"
        assert meta.dirname != MetadataCatalog.get(f"{prefix}_test").dirname
