"""sazs: shape-aware zero-shot semantic segmentation with spectral priors.

Packages, each importing only the ones before it::

    core < datasets < features < segments < stores < pipeline < quality < model < train < eval

``core`` shared primitives; ``datasets`` readers and zero-shot benchmark cards; ``features``
self-supervised ViT extractors; ``segments`` ground-truth-free object masks and segment maps read
from eigenvectors, and their refinement with the image; ``stores`` the prior-store format;
``pipeline`` graph + spectrum of every image into a store (``sazs-priors``); ``quality`` priors
scored against human masks (``sazs-eval priors``); ``model`` the zero-shot segmentation model,
encoders, checkpoints, feature cache; ``train`` the trainer (``sazs-train``); ``eval`` protocols,
fusion, prediction (``sazs-eval``).
"""
