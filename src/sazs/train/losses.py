"""Training losses: cross-entropy on seen classes, the spectral shape loss, and the edge baseline.

Spectral shape loss (GT-free). For one image let P (N x C) hold the predicted class
probabilities at N pixels and V (N x K) the image's K smallest Laplacian eigenvectors
upsampled to the same pixels. Low-frequency eigenvectors are smooth inside regions and change
across their borders, so a prediction that follows the image's shapes is (close to) a linear
combination of them. With Q an orthonormal basis of span(V) (QR per image),

    L_spec = ||P - Q Q^T P||_F^2 / N

is the energy of the prediction outside the spectral subspace: 0 when every class map lies in
span(V), and it needs no mask. Eigen-segment consistency (optional) asks the prediction to be
constant on each eigen-segment {v_k > 0} (the minority side by the store's sign convention):
the mean within-segment variance of P.

Edge alignment (baseline of the released SAZS code, for ablation): a boundary head predicts
edge logits, trained with class-balanced BCE (HED weighting) against the edges of the
seen-class mask; unseen pixels are 255 there, so their outlines are never targets.

Everything here is float32 (the loop disables autocast around the losses): QR and the
squared residuals are not safe in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sazs.core.linalg import orthonormal_basis
from sazs.core.metrics import IGNORE_INDEX


@dataclass(frozen=True)
class LossConfig:
    spectral_weight: float = 1.0
    segment_weight: float = 0.0  # eigen-segment consistency
    edge_weight: float = 0.0  # edge-alignment baseline (needs the model's boundary head)
    edge_radius: int = 2  # half-width (px) of the window that marks a pixel as a mask edge
    rank_rtol: float = 1e-4  # eigenvectors closer than this to dependent are dropped from the basis

    def __post_init__(self) -> None:
        for name in ("spectral_weight", "segment_weight", "edge_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def needs_priors(self) -> bool:
        return self.spectral_weight > 0 or self.segment_weight > 0


# ----------------------------------------------------------------------------- cross-entropy


def segmentation_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross-entropy; logits (B, C, h, w) are upsampled (bilinear) to the target's (H, W).

    A batch with no labelled pixel gives 0 (with a graph), not the NaN of a mean over nothing.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


# ----------------------------------------------------------------------------- spectral


def spectral_shape_loss(probs: torch.Tensor, basis: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of ||P - Q Q^T P||^2 / N_valid; probs (B, C, h, w), basis (B, h*w, K)."""
    b, c = probs.shape[:2]
    p = probs.reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
    if valid is not None:
        valid = valid.reshape(b, -1).to(p.dtype)
        p = p * valid.unsqueeze(-1)
        n = valid.sum(1)
    else:
        n = torch.full((b,), p.shape[1], dtype=p.dtype, device=p.device)
    residual = p - basis @ (basis.transpose(1, 2) @ p)
    per_image = residual.pow(2).sum((1, 2)) / n.clamp_min(1)
    return per_image.mean()


def eigen_segment_loss(probs: torch.Tensor, eigvecs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean within-segment variance of P over the eigen-segments {v_k > 0}, k >= 1."""
    b, c = probs.shape[:2]
    p = probs.reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
    seg = (eigvecs[:, 1:].reshape(b, eigvecs.shape[1] - 1, -1) > 0).to(p.dtype)  # (B, K-1, N)
    if valid is not None:
        seg = seg * valid.reshape(b, 1, -1).to(p.dtype)
    count = seg.sum(-1)  # (B, K-1)
    mean = (seg @ p) / count.clamp_min(1).unsqueeze(-1)  # (B, K-1, C)
    second = (seg @ p.pow(2).sum(-1, keepdim=True)).squeeze(-1) / count.clamp_min(1)  # E||p||^2
    var = (second - mean.pow(2).sum(-1)).clamp_min(0)
    present = count > 0
    if not present.any():
        return probs.sum() * 0.0
    return var[present].mean()


# ----------------------------------------------------------------------------- edges


def edge_targets(labels: torch.Tensor, radius: int = 2, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) float: 1 where labelled pixels of two different classes lie within ``radius``,
    0 elsewhere, and 2 (ignored) where no labelled pixel lies within ``radius``.

    The window spans VOC's 255 band (about 2 px wide on every outline), so the outline of a
    seen object is found through the band; an unseen object (255 everywhere) has no outline.
    """
    lab = labels.float().unsqueeze(1)
    valid = (labels != ignore_index).float().unsqueeze(1)
    k = 2 * radius + 1
    big = torch.where(valid > 0, lab, torch.full_like(lab, -1.0))
    small = torch.where(valid > 0, lab, torch.full_like(lab, 1e4))
    hi = F.max_pool2d(big, k, stride=1, padding=radius)
    lo = -F.max_pool2d(-small, k, stride=1, padding=radius)
    near = F.max_pool2d(valid, k, stride=1, padding=radius) > 0
    edge = (hi != lo) & near
    out = torch.where(near, edge.float(), torch.full_like(lab, 2.0))
    return out.squeeze(1)


def balanced_bce(edge_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE (HED): edges weighted by the non-edge share and vice versa; 2 = ignored."""
    if edge_logits.shape[-2:] != targets.shape[-2:]:
        edge_logits = F.interpolate(edge_logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    logits = edge_logits.reshape(targets.shape)
    pos, neg = targets == 1, targets == 0
    n_pos, n_neg = pos.sum(), neg.sum()
    total = (n_pos + n_neg).clamp_min(1)
    weight = torch.zeros_like(logits)
    weight = torch.where(pos, n_neg / total, weight)
    weight = torch.where(neg, n_pos / total, weight)
    loss = F.binary_cross_entropy_with_logits(logits, pos.to(logits.dtype), weight=weight, reduction="sum")
    return loss / total


# ----------------------------------------------------------------------------- total


def compute_losses(outputs: dict, batch: dict, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Every active loss term and their weighted sum under "loss" (all float32 scalars).

    ``outputs``: "logits" (B, C, h, w) [+ "edges" (B, 1, h, w)]; ``batch``: "mask" (B, H, W)
    [+ "eigvecs" (B, K, hp, wp), "prior_valid" (B, hp, wp)].
    """
    logits = outputs["logits"].float()
    terms = {"ce": segmentation_ce(logits, batch["mask"])}
    total = terms["ce"]
    if cfg.needs_priors:
        if "eigvecs" not in batch:
            raise ValueError(
                "spectral / segment loss weights are > 0 but the batch has no priors; "
                "give the trainer a prior store (--priors) or set the weights to 0"
            )
        eig = batch["eigvecs"].float()
        valid = batch["prior_valid"]
        probs = logits.softmax(1)
        if probs.shape[-2:] != eig.shape[-2:]:
            probs = F.interpolate(probs, size=eig.shape[-2:], mode="bilinear", align_corners=False)
        if cfg.spectral_weight > 0:
            basis = orthonormal_basis(eig.flatten(2), valid.flatten(1), cfg.rank_rtol)
            terms["spectral"] = spectral_shape_loss(probs, basis, valid)
            total = total + cfg.spectral_weight * terms["spectral"]
        if cfg.segment_weight > 0:
            terms["segment"] = eigen_segment_loss(probs, eig, valid)
            total = total + cfg.segment_weight * terms["segment"]
    if cfg.edge_weight > 0:
        if "edges" not in outputs:
            raise ValueError("edge_weight > 0 needs the model's boundary head (ModelConfig.boundary_head)")
        terms["edge"] = balanced_bce(outputs["edges"].float(), edge_targets(batch["mask"], cfg.edge_radius))
        total = total + cfg.edge_weight * terms["edge"]
    terms["loss"] = total
    return terms
