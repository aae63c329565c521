"""The zero-shot evaluator (``sazs-eval``).

Pure modules (no trainer, no pipeline imports): ``splits`` (HSNet split lists, read or
generated), ``episodes`` (the episodes drawn from them), ``metrics`` (IoU / FB-IoU accumulators, boundary F),
``fusion`` (none / project / select, and the oracle upper bound), ``evaluate`` (scoring a
model on episodes and in the generalised setting), ``report`` (tables, JSON, pictures).
Edges: ``predict`` (a checkpoint rebuilt for inference; priors of new images) and ``cli``
(``sazs-eval run | demo | predict | list``).
"""
