"""Zero-shot class splits: PASCAL-5i and COCO-20i, and the label map training uses.

The class tables are written out here (not read from a dataset's files) so that a fold
always means the same classes, whatever annotation file a user has:

- PASCAL-5i (Shaban et al. 2017): the 20 VOC classes in VOC label order (label = index + 1);
  fold i holds out labels 5i+1 .. 5i+5.
- COCO-20i (Nguyen & Todorovic 2019, as split by HSNet / LSeg / SAZS): the 80 COCO classes in
  ascending category-id order; 0-based id = index, mask label = id + 1 (what
  ``pipeline.datasets.COCODataset`` writes); fold i holds out ids {i, i+4, ..., i+76}.

Training sees seen classes only. :meth:`ZeroShotSplit.label_map` turns a dataset mask
(0 background, 1..C classes, 255 ignore) into training labels 0..S (0 = background, then the
seen classes in table order) with every unseen pixel set to 255 (``unseen="ignore"``, the
default) or folded into class 0, which is then called "others" (``unseen="others"``: the
released SAZS code trains "others vs class"). The names of unseen classes are not part of
:meth:`ZeroShotSplit.train_names`, the only class list the trainer gives the text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255
NUM_FOLDS = 4

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Dataset name -> (benchmark, class table). Keys are pipeline dataset names.
BENCHMARKS = {"voc": ("pascal-5i", PASCAL_CLASSES), "coco": ("coco-20i", COCO_CLASSES)}

# VOC's run-together names read badly in a prompt; the tables above keep the official names.
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

UNSEEN_MODES = ("ignore", "others")


def prompt_name(name: str) -> str:
    return PROMPT_NAMES.get(name, name)


def pascal5i_unseen(fold: int) -> tuple[int, ...]:
    """Mask labels (1-based VOC ids) held out by PASCAL-5i fold ``fold``: 5i+1 .. 5i+5."""
    _check_fold(fold)
    return tuple(range(5 * fold + 1, 5 * fold + 6))


def coco20i_unseen(fold: int) -> tuple[int, ...]:
    """Mask labels held out by COCO-20i fold ``fold``: 0-based ids i, i+4, ..., i+76, plus one."""
    _check_fold(fold)
    return tuple(fold + 4 * k + 1 for k in range(20))


def _check_fold(fold: int) -> None:
    if not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be one of 0..{NUM_FOLDS - 1}, got {fold!r}")


@dataclass(frozen=True)
class ZeroShotSplit:
    """Seen / unseen classes of one fold; labels are the dataset's mask values (1..C)."""

    benchmark: str
    fold: int | None  # None: no class held out (fully supervised; smoke runs)
    class_names: tuple[str, ...]  # every foreground class, index = label - 1
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    unseen_mode: str = "ignore"

    @property
    def background_name(self) -> str:
        return "others" if self.unseen_mode == "others" else "background"

    def name(self, label: int) -> str:
        return self.class_names[label - 1]

    def train_names(self) -> tuple[str, ...]:
        """Names of the training classes 0..S: background (or "others"), then the seen classes."""
        return (self.background_name, *(self.name(c) for c in self.seen))

    def unseen_names(self) -> tuple[str, ...]:
        return tuple(self.name(c) for c in self.unseen)

    def all_names(self) -> tuple[str, ...]:
        """Names of every class 0..C in dataset label order (evaluation, never the training loss)."""
        return ("background", *self.class_names)

    def label_map(self) -> np.ndarray:
        """(256,) uint8 lookup table: dataset mask value -> training label (0..S or 255)."""
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        lut[0] = 0
        for j, c in enumerate(self.seen):
            lut[c] = j + 1
        if self.unseen_mode == "others":
            lut[list(self.unseen)] = 0
        return lut

    def describe(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "fold": self.fold,
            "unseen_mode": self.unseen_mode,
            "seen": list(self.seen),
            "unseen": list(self.unseen),
            "train_names": list(self.train_names()),
            "unseen_names": list(self.unseen_names()),
        }


def zero_shot_split(dataset: str, fold: int | None, unseen: str = "ignore") -> ZeroShotSplit:
    """The split of ``fold`` for a pipeline dataset name ('voc' -> PASCAL-5i, 'coco' -> COCO-20i)."""
    if dataset not in BENCHMARKS:
        raise ValueError(f"no zero-shot benchmark for dataset {dataset!r}; choose from {sorted(BENCHMARKS)}")
    if unseen not in UNSEEN_MODES:
        raise ValueError(f"unseen must be one of {UNSEEN_MODES}, got {unseen!r}")
    benchmark, names = BENCHMARKS[dataset]
    labels = tuple(range(1, len(names) + 1))
    if fold is None:
        held_out: tuple[int, ...] = ()
    else:
        held_out = pascal5i_unseen(fold) if dataset == "voc" else coco20i_unseen(fold)
    seen = tuple(c for c in labels if c not in held_out)
    return ZeroShotSplit(benchmark, fold, names, seen, held_out, unseen)


def check_dataset_classes(split: ZeroShotSplit, dataset_class_names: list[str]) -> None:
    """Refuse a dataset whose class list (index = mask label) differs from the split's table."""
    got = tuple(dataset_class_names[1:])
    if got != split.class_names:
        diff = [f"label {i + 1}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(got, split.class_names)) if a != b]
        if len(got) != len(split.class_names):
            diff.insert(0, f"{len(got)} classes != {len(split.class_names)}")
        raise ValueError(f"the dataset's classes do not match the {split.benchmark} table "
                         f"({'; '.join(diff[:5])}); fold numbers would select the wrong classes")
