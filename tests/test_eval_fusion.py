"""Fusion with eigenvectors: none, project, select (ground-truth-free) and the oracle (eval/fusion.py)."""

import numpy as np
import pytest
import torch

from sazs.core.linalg import orthonormal_basis
from sazs.eval.fusion import (
    FUSIONS,
    GT_FREE,
    FusionConfig,
    check_headline,
    fuse_binary,
    fuse_semantic,
    fusion_key,
    fusion_label,
    project_probs,
    segment_masks,
)
from sazs.segments.refine import upsample_eigvecs

H, W = 12, 16


def vectors():
    """v0 constant, v1 = +1 on the left third / -1 elsewhere, v2 = +1 on the top half / -1 elsewhere."""
    yy, xx = np.mgrid[0:H, 0:W]
    v = np.stack([np.ones((H, W)), np.where(xx < W // 3, 1.0, -1.0), np.where(yy < H // 2, 1.0, -1.0)])
    return torch.tensor(v, dtype=torch.float32)


def probs_of(fg: torch.Tensor) -> torch.Tensor:
    fg = fg.float().clamp(0, 1)
    return torch.stack([1 - fg, fg])


def test_project_keeps_what_lies_in_the_span_and_removes_the_rest():
    v = vectors()
    left = v[1] > 0
    p = probs_of(0.1 + 0.8 * left)  # in span(v0, v1)
    assert torch.allclose(project_probs(p, v), p, atol=1e-5)
    # A fine checkerboard is (nearly) orthogonal to the smooth vectors: projection removes it
    checker = torch.tensor(np.indices((H, W)).sum(0) % 2 * 2 - 1, dtype=torch.float32)
    noisy = probs_of(0.1 + 0.8 * left + 0.45 * checker)
    none = fuse_binary("none", noisy).mask
    proj = fuse_binary("project", noisy, v).mask
    assert not torch.equal(none, left) and torch.equal(proj, left)


def test_orthonormal_basis_drops_dependent_vectors():
    v = vectors()
    dup = torch.cat([v, v[1:2] * 2.0, v[0:1] + v[2:3]])  # 5 vectors, rank 3
    q = orthonormal_basis(dup.reshape(5, -1))
    assert q.shape == (H * W, 5) and int((q.norm(dim=0) > 0.5).sum()) == 3  # two zero columns
    q = q[:, q.norm(dim=0) > 0.5]
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
    x = (0.3 * v[1] - 0.7 * v[2]).reshape(-1)
    assert torch.allclose(q @ (q.T @ x), x, atol=1e-5)


def test_upsample_eigvecs_covers_the_whole_image():
    grid = torch.zeros(2, 3, 4)
    grid[0] = 1.0
    grid[1, :, :2] = 1.0
    up = upsample_eigvecs(grid.numpy(), (30, 40))
    assert up.shape == (2, 30, 40) and torch.allclose(up[0], torch.ones(30, 40))
    assert up[1, :, :15].min() > 0.9999 and up[1, :, 25:].abs().max() < 1e-6  # cell centres at 5, 15, 25, 35 px
    assert upsample_eigvecs(grid, (3, 4)) is not None and torch.equal(upsample_eigvecs(grid, (3, 4)), grid)
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        upsample_eigvecs(torch.zeros(3, 4), (6, 8))


def test_select_keeps_an_agreeing_segment_and_only_then():
    v = vectors()
    segments = segment_masks(v, 2)
    assert segments.shape == (2, H, W) and torch.equal(segments[0], v[1] > 0)
    left = v[1] > 0
    rough = left.clone()
    rough[0, 0] = rough[5, 1] = False
    rough[0, 10] = True  # a ragged version of the left segment
    out = fuse_binary("select", probs_of(rough), v, cfg=FusionConfig(num_segments=2, select_threshold=0.5))
    assert out.choice == 1 and torch.equal(out.mask, left) and out.score > 0.9
    blob = torch.zeros(H, W, dtype=torch.bool)
    blob[9:11, 12:14] = True  # agrees with no segment
    out = fuse_binary("select", probs_of(blob), v, cfg=FusionConfig(num_segments=2, select_threshold=0.5))
    assert out.choice == 0 and torch.equal(out.mask, blob)
    # an empty prediction stays empty whatever the threshold
    out = fuse_binary("select", probs_of(torch.zeros(H, W)), v, cfg=FusionConfig(select_threshold=0.0))
    assert out.choice == 0 and not out.mask.any()


def test_oracle_picks_with_the_ground_truth():
    v = vectors()
    left, top = v[1] > 0, v[2] > 0
    target = top.long()
    out = fuse_binary("oracle", probs_of(left), v, cfg=FusionConfig(num_segments=2), target=target)
    assert out.choice == 2 and torch.equal(out.mask, top) and out.score == 1.0
    # a tie keeps the prediction (the released SAZS code: prediction if its IoU >= the best eigen-mask's)
    out = fuse_binary("oracle", probs_of(left), v, cfg=FusionConfig(num_segments=2), target=left.long())
    assert out.choice == 0
    # ignored pixels count for no candidate: with the left-bottom block ignored, "left" equals the truth there
    target = (left & top).long()
    target[H // 2 :, : W // 3] = 255
    out = fuse_binary("oracle", probs_of(torch.zeros(H, W)), v, cfg=FusionConfig(num_segments=2), target=target)
    assert out.choice == 1 and out.score == 1.0
    with pytest.raises(ValueError, match="ground truth"):
        fuse_binary("oracle", probs_of(left), v)


def test_modes_that_need_priors_say_so():
    p = probs_of(torch.zeros(H, W))
    for mode in ("project", "select", "oracle"):
        with pytest.raises(ValueError, match="eigenvectors"):
            fuse_binary(mode, p)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_binary("best", p)
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        fuse_binary("none", torch.zeros(3, H, W))


def test_semantic_fusion():
    v = vectors()
    left, top = v[1] > 0, v[2] > 0
    p = torch.stack([(~left & ~top).float(), left.float(), (top & ~left).float()]) * 0.8 + 0.1
    assert torch.equal(fuse_semantic("none", p), p.argmax(0))
    assert torch.equal(fuse_semantic("project", p, v), p.argmax(0))  # already in the span
    for mode in ("select", "oracle"):
        with pytest.raises(ValueError, match="binary episodes only"):
            fuse_semantic(mode, p, v)


def test_oracle_is_labelled_an_upper_bound_and_never_a_headline():
    assert FUSIONS == ("none", "project", "select", "segments", "oracle") and "oracle" not in GT_FREE
    assert "upper bound" in fusion_label("oracle") and fusion_key("oracle") == "oracle_upper_bound"
    assert fusion_label("select") == "select" and fusion_key("none") == "none"
    for mode in GT_FREE:
        assert check_headline(mode) == mode
    with pytest.raises(ValueError, match="upper bound and can never be the headline"):
        check_headline("oracle")
    with pytest.raises(ValueError, match="unknown"):
        check_headline("best")
