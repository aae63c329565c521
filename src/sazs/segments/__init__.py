"""sazs.segments: ground-truth-free segments read from a store's eigenvectors.

``refine`` (pixel-resolution refinement of upsampled eigenvectors with the image).
"""
