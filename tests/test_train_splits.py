"""Zero-shot class tables and fold rules (PASCAL-5i, COCO-20i) and the training label map."""

import numpy as np
import pytest

from sazs.datasets.synthetic import COCO_CATEGORIES
from sazs.datasets.voc import VOC_CLASSES
from sazs.datasets.zeroshot import (
    COCO_CLASSES,
    PASCAL_CLASSES,
    check_dataset_classes,
    coco20i_unseen,
    pascal5i_unseen,
    zero_shot_split,
)


def test_tables_match_the_datasets():
    assert len(PASCAL_CLASSES) == 20 and len(set(PASCAL_CLASSES)) == 20
    assert list(PASCAL_CLASSES) == VOC_CLASSES[1:]
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    # standard order = ascending COCO category id (what COCODataset's labels 1..80 follow)
    assert list(COCO_CLASSES) == [name for _, name, _ in sorted(COCO_CATEGORIES)]
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[4] == "airplane" and COCO_CLASSES[79] == "toothbrush"


def test_pascal5i_folds():
    assert pascal5i_unseen(0) == (1, 2, 3, 4, 5)
    assert pascal5i_unseen(3) == (16, 17, 18, 19, 20)
    names = [zero_shot_split("voc", f).unseen_names() for f in range(4)]
    assert names[0] == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert names[1] == ("bus", "car", "cat", "chair", "cow")
    assert names[2] == ("diningtable", "dog", "horse", "motorbike", "person")
    assert names[3] == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
    all_unseen = sorted(c for f in range(4) for c in pascal5i_unseen(f))
    assert all_unseen == list(range(1, 21))  # the folds partition the classes


def test_coco20i_folds():
    assert coco20i_unseen(0) == tuple(range(1, 81, 4))  # 0-based ids 0, 4, ..., 76
    assert coco20i_unseen(1)[:3] == (2, 6, 10)
    assert coco20i_unseen(3)[-1] == 80
    split = zero_shot_split("coco", 0)
    assert split.unseen_names()[:4] == ("person", "airplane", "boat", "parking meter")
    assert sorted(c for f in range(4) for c in coco20i_unseen(f)) == list(range(1, 81))
    for f in range(4):
        s = zero_shot_split("coco", f)
        assert len(s.seen) == 60 and len(s.unseen) == 20 and not set(s.seen) & set(s.unseen)


@pytest.mark.parametrize("fold", [-1, 4, "0", 1.0])
def test_bad_fold(fold):
    with pytest.raises(ValueError, match="fold must be one of 0..3"):
        pascal5i_unseen(fold)


def test_unknown_dataset_and_mode():
    with pytest.raises(ValueError, match="no zero-shot benchmark for dataset 'sample'"):
        zero_shot_split("sample", 0)
    with pytest.raises(ValueError, match="unseen must be one of"):
        zero_shot_split("voc", 0, unseen="keep")


def test_label_map_ignores_unseen_by_default():
    split = zero_shot_split("voc", 1)  # unseen 6..10
    lut = split.label_map()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    mask = np.array([[0, 1, 5, 6, 10, 11, 20, 255]], np.uint8)
    assert lut[mask].tolist() == [[0, 1, 5, 255, 255, 6, 15, 255]]
    names = split.train_names()
    assert names[0] == "background" and len(names) == 16
    assert names[lut[11]] == "diningtable" and names[lut[12]] == "dog" and names[lut[20]] == "tvmonitor"
    assert not set(names) & set(split.unseen_names())


def test_label_map_others_mode():
    split = zero_shot_split("voc", 0, unseen="others")
    lut = split.label_map()
    assert lut[[0, 1, 5, 6, 255]].tolist() == [0, 0, 0, 1, 255]
    assert split.train_names()[0] == "others"
    assert not set(split.train_names()) & set(split.unseen_names())


def test_no_fold_means_all_seen():
    split = zero_shot_split("coco", None)
    assert split.unseen == () and len(split.train_names()) == 81
    assert split.label_map()[80] == 80


def test_dataset_class_check():
    split = zero_shot_split("voc", 0)
    check_dataset_classes(split, list(VOC_CLASSES))
    wrong = list(VOC_CLASSES)
    wrong[3], wrong[4] = wrong[4], wrong[3]
    with pytest.raises(ValueError, match="label 3: 'boat' != 'bird'"):
        check_dataset_classes(split, wrong)
    with pytest.raises(ValueError, match="19 classes != 20"):
        check_dataset_classes(split, list(VOC_CLASSES)[:-1])
