"""sazs.pipeline: spectral priors of a dataset's images, written to a prior store.

One module per stage, each a pure function of a frozen config:

- ``extractors``: images -> patch ``Features`` (ViTs: ``vit_weights``, ``imgfocus``; a colour baseline)
- ``knn``, ``knn_certified``, ``knn_batched``: the exact k nearest patches (per image, or B images at once)
- ``graph``: features -> the affinity ``Graph`` (kNN cosines, colour term, global low-rank term)
- ``laplacian``: the graph operator (degrees, products with the kNN part and the global term), every solver's
- ``spectral``: the smallest eigenpairs of the normalised Laplacian, by solver
- ``ell``, ``ell_operator``, ``batched_solver``: many graphs as one padded batch, and their spectra at once
- ``types``: ``Features``, ``Graph``, ``Spectrum``, what the stages hand each other

Running them: ``compute`` (a shard's images -> store results, shared by the executors),
``job`` (``run_local``, the store side of a job), ``ray_plan`` / ``ray_worker`` /
``ray_executor`` (``run_ray``), ``cli`` / ``cli_options`` (``sazs-priors``).
"""
