"""sazs.segments: ground-truth-free segments read from a store's eigenvectors.

``maps`` (segment maps: spectral clustering of the eigenvector rows), ``refine`` (refinement
to pixel resolution with the image: the guided filter of eigenvectors, and a registry of
refiners for masks and label maps), ``bilateral`` (the fast bilateral solver), ``pamr``
(pixel-adaptive mask refinement).
"""
