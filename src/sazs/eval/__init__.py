"""The zero-shot evaluator (``sazs-eval``).

Pure modules (no trainer, no pipeline imports): ``splits`` (HSNet split lists, read or
generated), ``episodes`` (the episodes drawn from them), ``fusion`` (none / project / select,
and the oracle upper bound), ``refine`` (guided filtering of upsampled eigenvectors),
``evaluate`` (scoring a model on episodes and in the generalised setting), ``report`` (tables,
JSON), ``pictures`` (the episode grid), and for the priors alone ``prior_quality`` (the
metrics of one image), ``prior_scoring`` (a store against a dataset's masks) and
``prior_report`` (its tables and pictures).

Edges: ``predict`` (a checkpoint rebuilt for inference; priors of new images), ``run``
(`sazs-eval run`, configured by a ``RunConfig`` that ``options`` builds from the command
line), ``demo`` (`make eval`), ``prior_baseline`` and ``prior_cli`` (`sazs-eval priors`), and
``cli`` (``sazs-eval run | demo | predict | priors | list``).
"""
