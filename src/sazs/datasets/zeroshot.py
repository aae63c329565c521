"""The zero-shot splits of each benchmark: class tables, folds, seen and unseen classes.

Class tables are written out here (not read from a dataset's files) so that a fold always
means the same classes, whatever annotation file a user has:

- PASCAL-5i (Shaban et al. 2017): the 20 VOC classes in VOC label order (label = index + 1);
  fold i holds out labels 5i+1 .. 5i+5.
- COCO-20i (Nguyen & Todorovic 2019, as split by HSNet / LSeg / SAZS): the 80 COCO classes in
  ascending category-id order; 0-based id = index, mask label = id + 1 (what
  ``sazs.datasets.coco.COCODataset`` writes); fold i holds out ids {i, i+4, ..., i+76}.
- CamVid-11 (this project's zero-shot split of SegNet's 11-class CamVid; ``camvid``): CamVid
  has no background class, so its labels 0..10 *are* the classes (``background=False``: no
  background word in any classifier, seen mIoU over the seen classes only). Three folds of
  three unseen classes; every unseen class has a semantic neighbour among the fold's seen
  classes, so the text space has something to transfer from:

  - fold 0: bicyclist (seen: pedestrian), pavement (road), fence (pole);
  - fold 1: pedestrian (bicyclist), road (pavement), sign symbol (pole);
  - fold 2: car (bicyclist), building (fence), pole (sign symbol).

  Sky and tree are always seen.

Training sees seen classes only. :meth:`ZeroShotSplit.label_map` turns a dataset mask
(0 background, 1..C classes, 255 ignore) into training labels 0..S (0 = background, then the
seen classes in table order) with every unseen pixel set to 255 (``unseen="ignore"``, the
default) or folded into class 0, which is then called "others" (``unseen="others"``: the
released SAZS code trains "others vs class").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from sazs.core.labels import IGNORE_INDEX
from sazs.core.registry import Registry

from .camvid import CAMVID_CLASSES
from .voc import VOC_CLASSES

NUM_FOLDS = 4

PASCAL_CLASSES = tuple(VOC_CLASSES[1:])  # the 20 VOC classes in label order, without background

COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

# CamVid-11 folds (mask labels = index in CAMVID_CLASSES); see the module docstring for the neighbours.
CAMVID_FOLDS = ((10, 4, 7), (9, 3, 6), (8, 1, 2))


@dataclass(frozen=True)
class BenchmarkCard:
    """Everything that defines one zero-shot benchmark, in one place (a new benchmark is one card).

    ``dataset`` is the pipeline dataset it reads (the registry key); ``classes`` the class table
    (index = label - 1, or = label without background); ``unseen`` the rule fold -> held-out
    mask labels; ``sampling`` HSNet's episode rule (None: scored in the generalised setting only).
    """

    name: str  # e.g. "pascal-5i"
    title: str  # e.g. "PASCAL-5i"
    dataset: str  # pipeline dataset name, e.g. "voc"
    classes: tuple[str, ...]
    num_folds: int
    unseen: Callable[[int], tuple[int, ...]]
    background: bool = True  # label 0 is background; else labels 0..C-1 are the classes
    ignore_index: int = IGNORE_INDEX
    sampling: str | None = None  # episode rule: "cycle" | "class-uniform"; None = generalised setting only
    train_split: str = "train"
    val_split: str = "val"


# VOC's run-together names read badly in a prompt; the tables above keep the official names.
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

UNSEEN_MODES = ("ignore", "others")


def prompt_name(name: str) -> str:
    return PROMPT_NAMES.get(name, name)


def pascal5i_unseen(fold: int) -> tuple[int, ...]:
    """Mask labels (1-based VOC ids) held out by PASCAL-5i fold ``fold``: 5i+1 .. 5i+5."""
    check_fold(fold)
    return tuple(range(5 * fold + 1, 5 * fold + 6))


def coco20i_unseen(fold: int) -> tuple[int, ...]:
    """Mask labels held out by COCO-20i fold ``fold``: 0-based ids i, i+4, ..., i+76, plus one."""
    check_fold(fold)
    return tuple(fold + 4 * k + 1 for k in range(20))


def camvid11_unseen(fold: int) -> tuple[int, ...]:
    """Mask labels (0-based CamVid classes) held out by CamVid-11 fold ``fold``."""
    check_fold(fold, len(CAMVID_FOLDS))
    return tuple(sorted(CAMVID_FOLDS[fold]))


def check_fold(fold: int, num_folds: int = NUM_FOLDS) -> None:
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be one of 0..{num_folds - 1}, got {fold!r}")


BENCHMARKS: Registry[BenchmarkCard] = Registry("zero-shot benchmark")
BENCHMARKS.add(
    "voc",
    BenchmarkCard("pascal-5i", "PASCAL-5i", "voc", PASCAL_CLASSES, NUM_FOLDS, pascal5i_unseen, sampling="cycle"),
    help="PASCAL-5i: fold i holds out VOC classes 5i+1..5i+5",
)
BENCHMARKS.add(
    "coco",
    BenchmarkCard("coco-20i", "COCO-20i", "coco", COCO_CLASSES, NUM_FOLDS, coco20i_unseen, sampling="class-uniform"),
    help="COCO-20i: fold i holds out 0-based ids i, i+4, ..., i+76",
)
BENCHMARKS.add(
    "camvid",
    BenchmarkCard(
        "camvid-11", "CamVid-11", "camvid", CAMVID_CLASSES, len(CAMVID_FOLDS), camvid11_unseen, background=False
    ),
    help="CamVid-11: three folds of three street classes, each with a seen neighbour",
)


def benchmark_named(name: str) -> BenchmarkCard:
    """A card by its benchmark name ('pascal-5i', 'coco-20i', 'camvid-11')."""
    for dataset in BENCHMARKS:
        if BENCHMARKS[dataset].name == name:
            return BENCHMARKS[dataset]
    raise ValueError(f"unknown zero-shot benchmark {name!r}; choose from {[BENCHMARKS[d].name for d in BENCHMARKS]}")


def benchmark(dataset: str) -> BenchmarkCard:
    """The card of a pipeline dataset's zero-shot benchmark ('voc' -> PASCAL-5i, ...)."""
    if dataset not in BENCHMARKS:
        raise ValueError(f"no zero-shot benchmark for dataset {dataset!r}; choose from {BENCHMARKS.names()}")
    return BENCHMARKS[dataset]


@dataclass(frozen=True)
class ZeroShotSplit:
    """Seen / unseen classes of one fold; labels are the dataset's mask values.

    With ``background`` (PASCAL, COCO) label 0 is background and the classes are 1..C; without
    (CamVid) the classes are 0..C-1 and no classifier holds a background word (except
    "others" when unseen pixels are folded into one, ``unseen="others"``).
    """

    benchmark: str
    fold: int | None  # None: no class held out (fully supervised; smoke runs)
    class_names: tuple[str, ...]  # every class, index = label - 1 (label with no background)
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    unseen_mode: str = "ignore"
    background: bool = True  # label 0 is background, not a class

    @property
    def background_name(self) -> str | None:
        """The word of the training classifier's class 0: background / others, or None (no such class)."""
        if self.unseen_mode == "others":
            return "others"
        return "background" if self.background else None

    def name(self, label: int) -> str:
        return self.class_names[label - 1 if self.background else label]

    def label(self, name: str) -> int:
        """Mask label of a class name (inverse of :meth:`name`)."""
        return self.class_names.index(name) + (1 if self.background else 0)

    def train_names(self) -> tuple[str, ...]:
        """Names of the training classes: background (or "others") if any, then the seen classes."""
        head = () if self.background_name is None else (self.background_name,)
        return (*head, *(self.name(c) for c in self.seen))

    def unseen_names(self) -> tuple[str, ...]:
        return tuple(self.name(c) for c in self.unseen)

    def all_names(self) -> tuple[str, ...]:
        """Names of every class in dataset label order (evaluation, never the training loss)."""
        return ("background", *self.class_names) if self.background else tuple(self.class_names)

    def seen_scored(self) -> tuple[int, ...]:
        """Labels averaged into seen mIoU: background counts as seen (GZS3Net), when there is one."""
        return (0, *self.seen) if self.background else tuple(self.seen)

    def label_map(self) -> np.ndarray:
        """(256,) uint8 lookup table: dataset mask value -> training label (index in train_names, or 255)."""
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        offset = 0 if self.background_name is None else 1
        if self.background:
            lut[0] = 0
        for j, c in enumerate(self.seen):
            lut[c] = j + offset
        if self.unseen_mode == "others":
            lut[list(self.unseen)] = 0
        return lut

    def describe(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "fold": self.fold,
            "unseen_mode": self.unseen_mode,
            "background": self.background,
            "seen": list(self.seen),
            "unseen": list(self.unseen),
            "train_names": list(self.train_names()),
            "unseen_names": list(self.unseen_names()),
        }


def num_folds(dataset: str) -> int:
    """Number of zero-shot folds of a pipeline dataset's benchmark."""
    return benchmark(dataset).num_folds


def zero_shot_split(dataset: str, fold: int | None, unseen: str = "ignore") -> ZeroShotSplit:
    """The split of ``fold`` for a pipeline dataset name ('voc' -> PASCAL-5i, 'coco' -> COCO-20i,
    'camvid' -> CamVid-11)."""
    card = benchmark(dataset)
    if unseen not in UNSEEN_MODES:
        raise ValueError(f"unseen must be one of {UNSEEN_MODES}, got {unseen!r}")
    n = len(card.classes)
    labels = tuple(range(1, n + 1)) if card.background else tuple(range(n))
    held_out: tuple[int, ...] = () if fold is None else card.unseen(fold)
    seen = tuple(c for c in labels if c not in held_out)
    return ZeroShotSplit(card.name, fold, card.classes, seen, held_out, unseen, card.background)


def check_dataset_classes(split: ZeroShotSplit, dataset_class_names: list[str]) -> None:
    """Refuse a dataset whose class list (index = mask label) differs from the split's table."""
    got = tuple(dataset_class_names[1:] if split.background else dataset_class_names)
    if got != split.class_names:
        diff = [f"label {i + 1}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(got, split.class_names)) if a != b]
        if len(got) != len(split.class_names):
            diff.insert(0, f"{len(got)} classes != {len(split.class_names)}")
        raise ValueError(
            f"the dataset's classes do not match the {split.benchmark} table "
            f"({'; '.join(diff[:5])}); fold numbers would select the wrong classes"
        )


def benchmark_folds(dataset: str) -> tuple[int, ...]:
    """Every fold of a dataset's benchmark (what ``--folds all`` means)."""
    return tuple(range(num_folds(dataset)))


def parse_folds(text: str | Iterable[int], num_folds: int = NUM_FOLDS) -> tuple[int, ...]:
    """'0', '0,2', '0 1', 'all' (= 0..num_folds-1) or an iterable of ints -> sorted unique folds."""
    if not isinstance(text, str):
        folds = list(text)
    elif text.strip() == "all":
        folds = list(range(num_folds))
    else:
        try:
            folds = [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]
        except ValueError:
            raise ValueError(f"folds must be 0..{num_folds - 1}, a list such as 0,2, or 'all'; got {text!r}") from None
    for f in folds:
        check_fold(f, num_folds)
    if not folds:
        raise ValueError("no fold given")
    return tuple(sorted(set(folds)))
