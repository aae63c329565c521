"""The shape-aware zero-shot trainer (``sazs-train``).

Modules: ``splits`` (PASCAL-5i / COCO-20i tables, folds, label map), ``data`` (images + masks +
priors with one joint augmentation), ``model`` (open_clip ViT + dense head + text classifier),
``losses`` (CE, spectral shape loss, eigen-segment consistency, edge baseline), ``loop``
(optimiser, schedule, exact resume, metrics), ``checkpoint`` (writing and reading
checkpoints: tensors and plain values only, never code), ``validate`` (quick end-of-run
check), ``cli`` (``sazs-train run | demo | list``).
"""
