"""Zero-shot class splits (PASCAL-5i, COCO-20i) and the training label map.

The tables, fold rules and :class:`ZeroShotSplit` live in :mod:`sazs.eval.protocols` (the
evaluator owns the protocols; ``train -> eval`` is the allowed direction). This module
re-exports them under their historical names so the trainer reads ``from .splits import ...``.
"""

from sazs.eval.protocols import (
    BENCHMARKS,
    COCO_CLASSES,
    IGNORE_INDEX,
    NUM_FOLDS,
    PASCAL_CLASSES,
    PROMPT_NAMES,
    UNSEEN_MODES,
    ZeroShotSplit,
    check_dataset_classes,
    coco20i_unseen,
    pascal5i_unseen,
    prompt_name,
    zero_shot_split,
)

__all__ = [
    "BENCHMARKS",
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "NUM_FOLDS",
    "PASCAL_CLASSES",
    "PROMPT_NAMES",
    "UNSEEN_MODES",
    "ZeroShotSplit",
    "check_dataset_classes",
    "coco20i_unseen",
    "pascal5i_unseen",
    "prompt_name",
    "zero_shot_split",
]
