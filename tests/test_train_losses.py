"""Spectral shape loss, eigen-segment consistency, edge baseline and the combined loss."""

import pytest
import torch

from sazs.core.linalg import orthonormal_basis
from sazs.train.losses import (
    LossConfig,
    balanced_bce,
    compute_losses,
    edge_targets,
    eigen_segment_loss,
    segmentation_ce,
    spectral_shape_loss,
)


def _eigvecs(b=2, k=4, h=6, w=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g, dtype=dtype)


def test_basis_is_orthonormal_and_spans_v():
    v = _eigvecs()
    q = orthonormal_basis(v.flatten(2))
    assert q.shape == (2, 42, 4) and q.dtype == torch.float64
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(4, dtype=q.dtype).expand(2, 4, 4))
    flat = v.flatten(2).transpose(1, 2)
    torch.testing.assert_close(q @ (q.transpose(1, 2) @ flat), flat)


def test_spectral_loss_zero_in_span_positive_outside():
    v = _eigvecs()
    basis = orthonormal_basis(v.flatten(2))
    coef = torch.randn(2, 4, 3, dtype=v.dtype)
    p_in = (v.flatten(2).transpose(1, 2) @ coef).transpose(1, 2).reshape(2, 3, 6, 7)  # P in span(V)
    assert spectral_shape_loss(p_in, basis).item() == pytest.approx(0.0, abs=1e-20)
    p_out = torch.rand(2, 3, 6, 7, dtype=v.dtype)
    loss = spectral_shape_loss(p_out, basis)
    assert loss.item() > 1e-3
    # equals the energy of the orthogonal complement, computed independently with lstsq
    flat = p_out.flatten(2).transpose(1, 2)
    sol = torch.linalg.lstsq(v.flatten(2).transpose(1, 2), flat).solution
    resid = flat - v.flatten(2).transpose(1, 2) @ sol
    assert loss.item() == pytest.approx((resid.pow(2).sum((1, 2)) / 42).mean().item(), rel=1e-9)


def test_spectral_loss_gradient_matches_finite_differences():
    v = _eigvecs(b=2, k=3, h=4, w=5)
    basis = orthonormal_basis(v.flatten(2))
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, :, -2:] = False
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    # through the softmax, as in training, and with a partial validity mask
    assert torch.autograd.gradcheck(lambda x: spectral_shape_loss(x.softmax(1), basis, valid), (logits,))
    probs = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: spectral_shape_loss(p, basis), (probs,))


def test_constant_prediction_is_free_when_the_trivial_vector_is_there():
    v = _eigvecs(b=1, k=3, h=5, w=5)
    v[:, 0] = 1.0  # the trivial (constant) eigenvector
    p = torch.full((1, 4, 5, 5), 0.25, dtype=v.dtype)
    assert spectral_shape_loss(p, orthonormal_basis(v.flatten(2))).item() < 1e-25


def test_valid_mask_restricts_pixels():
    v = _eigvecs(b=1, k=2, h=4, w=4)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[:, :2] = True
    basis = orthonormal_basis(v.flatten(2), valid.flatten(1))
    assert basis.reshape(1, 4, 4, 2)[0, 2:].abs().max() == 0  # no support outside the valid part
    p = torch.rand(1, 3, 4, 4, dtype=v.dtype)
    p_changed = p.clone()
    p_changed[..., 2:, :] = 7.0  # outside the valid rows: must not matter
    same = spectral_shape_loss(p_changed, basis, valid).item()
    assert spectral_shape_loss(p, basis, valid).item() == pytest.approx(same)


def test_rank_deficient_eigenvectors_add_no_spurious_directions():
    v = _eigvecs(b=1, k=4, h=5, w=6)
    v[:, 2] = 2 * v[:, 0] - v[:, 1]  # dependent (e.g. after a small crop)
    v[:, 3] = 0.0  # all zero (e.g. entirely in the padding)
    q = orthonormal_basis(v.flatten(2))
    rank = torch.linalg.matrix_rank(q[0]).item()
    assert rank == 2
    p = torch.rand(1, 3, 5, 6, dtype=v.dtype)
    flat = p.flatten(2).transpose(1, 2)
    sol = torch.linalg.lstsq(v[:, :2].flatten(2).transpose(1, 2), flat).solution
    expected = (flat - v[:, :2].flatten(2).transpose(1, 2) @ sol).pow(2).sum() / 30
    assert spectral_shape_loss(p, q).item() == pytest.approx(expected.item(), rel=1e-6)


def test_eigen_segment_loss():
    eig = torch.zeros(1, 3, 4, 4)
    eig[:, 0] = 1
    eig[0, 1, :2] = 1.0  # segment: top half
    eig[0, 1, 2:] = -1.0
    eig[0, 2, :, :2] = 1.0  # segment: left half
    eig[0, 2, :, 2:] = -1.0
    # constant inside both segments -> 0; top half 0.5 / bottom 0 is constant on the top segment,
    # but the left segment mixes top and bottom -> positive
    p = torch.zeros(1, 2, 4, 4)
    p[:, 0] = 1.0
    assert eigen_segment_loss(p, eig).item() == pytest.approx(0.0, abs=1e-7)
    p2 = torch.zeros(1, 2, 4, 4)
    p2[0, 0, :2] = 1.0
    p2[0, 1, 2:] = 1.0
    assert eigen_segment_loss(p2, eig).item() == pytest.approx(0.25)  # left: var 0.5 (2 classes x 0.25), top: 0


def test_edge_targets_and_balanced_bce():
    lab = torch.zeros(1, 12, 12, dtype=torch.long)
    lab[0, 3:9, 3:9] = 4
    band = torch.zeros_like(lab, dtype=torch.bool)
    band[0, 2:10, 2:10] = True
    band[0, 4:8, 4:8] = False
    lab[band] = 255  # VOC-style ignore band on the outline
    t = edge_targets(lab, radius=2)
    assert t[0, 6, 6] == 0 and t[0, 0, 0] == 0  # deep inside / far outside
    assert t[0, 3, 6] == 1 and t[0, 6, 2] == 1  # on the outline, through the band
    unseen = torch.full((1, 12, 12), 255, dtype=torch.long)
    unseen[0, :, :2] = 0
    assert (edge_targets(unseen, 2) == 1).sum() == 0  # an unseen region has no outline
    assert (edge_targets(unseen, 2)[0, :, 6:] == 2).all()  # far from any label: ignored
    logits = torch.zeros(1, 1, 12, 12, requires_grad=True)
    loss = balanced_bce(logits, t)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    # perfect logits give a smaller loss than uninformative ones
    good = (t.unsqueeze(1) == 1).float() * 20 - 10
    assert balanced_bce(good, t) < loss


def test_ce_upsamples_and_handles_all_ignored():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 16, 16))
    assert torch.isfinite(segmentation_ce(logits, target))
    empty = segmentation_ce(logits, torch.full((2, 16, 16), 255))
    assert empty.item() == 0.0
    empty.backward()  # still a graph


def test_compute_losses_terms_and_errors():
    b, c = 2, 3
    out = {"logits": torch.randn(b, c, 8, 8, requires_grad=True), "edges": torch.randn(b, 1, 8, 8)}
    batch = {
        "mask": torch.randint(0, c, (b, 32, 32)),
        "eigvecs": torch.randn(b, 4, 8, 8),
        "prior_valid": torch.ones(b, 8, 8, dtype=torch.bool),
    }
    cfg = LossConfig(spectral_weight=2.0, segment_weight=0.5, edge_weight=0.3)
    terms = compute_losses(out, batch, cfg)
    assert set(terms) == {"ce", "spectral", "segment", "edge", "loss"}
    expected = terms["ce"] + 2.0 * terms["spectral"] + 0.5 * terms["segment"] + 0.3 * terms["edge"]
    torch.testing.assert_close(terms["loss"], expected)
    terms["loss"].backward()
    with pytest.raises(ValueError, match="no priors"):
        compute_losses(out, {"mask": batch["mask"]}, LossConfig())
    with pytest.raises(ValueError, match="boundary head"):
        compute_losses({"logits": out["logits"]}, batch, LossConfig(edge_weight=1.0))
    with pytest.raises(ValueError, match="must be >= 0"):
        LossConfig(spectral_weight=-1)
