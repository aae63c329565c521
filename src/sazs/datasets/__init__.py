"""The datasets: reading images and masks, their registries, and small synthetic ones.

``sazs.datasets`` imports only ``sazs.core``; the stores, the pipeline, the trainer and the
evaluator read images through it.
"""
