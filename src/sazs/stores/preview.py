"""Preview pictures of priors: the image, its first non-trivial eigenvectors as heat maps,
and the binarised eigen-segments. Pure drawing: callers bring the images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .reader import Prior

log = logging.getLogger(__name__)


def segment_labels(eigvecs: np.ndarray, num_vectors: int = 3) -> np.ndarray:
    """Label map (h, w) from the signs of the first ``num_vectors`` non-trivial eigenvectors.

    By the store's sign convention the positive part of each vector is the minority of
    patches, so vector 1 > 0 is the Fiedler foreground; combining signs of several vectors
    gives up to 2**num_vectors segments.
    """
    vecs = eigvecs[1 : 1 + num_vectors]
    labels = np.zeros(eigvecs.shape[1:], np.int64)
    for bit, vec in enumerate(vecs):
        labels |= (vec > 0).astype(np.int64) << bit
    return labels


# One look for every picture of priors: diverging heat maps (blue < 0 < red), ten segment colours.
HEATMAP_CMAP = "RdBu_r"
SEGMENT_CMAP = "tab10"


def heatmap_rgb(vec: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One eigenvector (h, w) as an RGB uint8 heat map of ``size`` (height, width), bilinear,
    symmetric about zero (white), as :func:`draw_priors` draws it."""
    import matplotlib
    from PIL import Image

    lim = float(np.abs(vec).max()) or 1.0
    up = np.asarray(Image.fromarray(np.asarray(vec, np.float32), mode="F").resize(size[::-1], Image.BILINEAR))
    rgba = matplotlib.colormaps[HEATMAP_CMAP]((up / lim + 1) / 2)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def segments_rgb(labels: np.ndarray, size: tuple[int, int], image: np.ndarray | None = None) -> np.ndarray:
    """A label map (h, w) (:func:`segment_labels`) as RGB uint8 of ``size``, nearest-neighbour,
    blended half and half with ``image`` (already of ``size``) when there is one."""
    import matplotlib
    from PIL import Image

    up = np.asarray(Image.fromarray(labels.astype(np.uint8), mode="L").resize(size[::-1], Image.NEAREST))
    rgb = matplotlib.colormaps[SEGMENT_CMAP](up % 10)[..., :3] * 255
    if image is not None:
        rgb = 0.5 * rgb + 0.5 * image[..., :3]
    return rgb.round().astype(np.uint8)


def draw_priors(
    rows: list[tuple[Prior, np.ndarray | None]],
    out_png: str | Path,
    *,
    num_vectors: int = 3,
    title: str | None = None,
) -> Path:
    """Draw one row per image: image, eigenvectors 1..num_vectors, Fiedler segment, segments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("nothing to draw: no images with priors")
    num_vectors = max(1, min(num_vectors, min(p.eigvecs.shape[0] for p, _ in rows) - 1))
    cols = 1 + num_vectors + 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.3 * len(rows)), squeeze=False)
    for r, (prior, image) in enumerate(rows):
        h, w = prior.grid
        height, width = image.shape[:2] if image is not None else prior.image_size
        extent = (0, width, height, 0)
        ax = axes[r, 0]
        if image is not None:
            ax.imshow(image, extent=extent)
        else:
            ax.text(0.5, 0.5, "image unavailable", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(prior.id, fontsize=8)
        for c in range(num_vectors):
            vec = prior.eigvecs[c + 1]
            lim = float(np.abs(vec).max()) or 1.0
            axes[r, c + 1].imshow(vec, cmap=HEATMAP_CMAP, vmin=-lim, vmax=lim, extent=extent, interpolation="bilinear")
            if r == 0:
                axes[r, c + 1].set_title(f"eigvec {c + 1}", fontsize=9)
            axes[r, c + 1].set_xlabel(f"λ={prior.eigvals[c + 1]:.3f}", fontsize=8)
        fiedler = (prior.eigvecs[1] > 0).astype(float)
        ax = axes[r, 1 + num_vectors]
        if image is not None:
            ax.imshow(image, extent=extent)
        ax.imshow(np.ma.masked_equal(fiedler, 0), cmap="autumn", alpha=0.55, extent=extent, interpolation="nearest")
        ax = axes[r, 2 + num_vectors]
        ax.imshow(
            segment_labels(prior.eigvecs, num_vectors),
            cmap=SEGMENT_CMAP,
            vmin=0,
            vmax=9,
            extent=extent,
            interpolation="nearest",
        )
        if r == 0:
            axes[r, 0].set_title("image", fontsize=9)
            axes[r, 1 + num_vectors].set_title("segment (vec 1 > 0)", fontsize=9)
            axes[r, 2 + num_vectors].set_title(f"segments (signs 1..{num_vectors})", fontsize=9)
        axes[r, 2 + num_vectors].set_xlabel(f"grid {h}×{w}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    log.info("wrote preview %s", out_png)
    return out_png
