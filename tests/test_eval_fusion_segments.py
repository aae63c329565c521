"""The `segments` fusion: the prediction corrected by spectral segments and superpixels (eval/regions.py)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from sazs.eval.fusion import GT_FREE, NEEDS_PRIORS, SEMANTIC, FusionConfig, fuse_binary, fuse_semantic, fusion_maps
from sazs.eval.regions import SegmentMaps, grow_labels, spectral_segments, vote_probs

H, W = 96, 128
CFG = FusionConfig(superpixels=120)  # ~100 px each, about what the default 400 are on a VOC photograph


def scene():
    """A photograph-like scene: a textured background and a bright disc (the object), plus eigenvectors
    as the priors give them: v0 constant, v1 the object (smooth at its border, as an upsampled
    patch-grid vector), v2 and v3 slow ramps over the background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    obj = (yy - 50) ** 2 + (xx - 60) ** 2 < 28**2
    image = np.where(obj[..., None], [200, 60, 40], [40, 90, 150]).astype(np.float64)
    image = (image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)
    soft = ndimage.gaussian_filter(obj.astype(np.float64), 3.0)
    ramps = [(1 - soft) * 0.3 * (xx / W - 0.5), (1 - soft) * 0.3 * (yy / H - 0.5)]
    v = np.stack([np.ones((H, W)), soft - soft.mean(), *ramps])
    return image, torch.tensor(obj), torch.tensor(v, dtype=torch.float32)


def probs_of(fg: torch.Tensor) -> torch.Tensor:
    fg = fg.float().clamp(0, 1)
    return torch.stack([1 - fg, fg])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_segments_is_a_ground_truth_free_mode_for_episodes_and_label_maps():
    assert "segments" in GT_FREE and "segments" in SEMANTIC and "segments" in NEEDS_PRIORS


def test_a_half_sure_prediction_is_completed_to_the_object():
    image, obj, v = scene()
    yy, _ = np.mgrid[0:H, 0:W]
    sure = obj & torch.tensor(yy < 50)  # the network is sure of the top half only
    p = probs_of(0.05 + 0.85 * sure + 0.4 * (obj & ~sure))
    none = fuse_binary("none", p).mask
    fused = fuse_binary("segments", p, v, image=image, cfg=CFG).mask
    assert iou(none, obj) < 0.6 and iou(fused, obj) > 0.95


def test_a_spill_into_another_segment_is_pulled_back():
    image, obj, v = scene()
    # a false blob in the background, weakly predicted, in a segment the object does not live in
    blob = torch.zeros(H, W, dtype=torch.bool)
    blob[5:20, 100:125] = True
    p = probs_of(0.05 + 0.9 * obj + 0.5 * blob) * torch.tensor([1.0, 1.0])[:, None, None]
    p[1][blob] = 0.52  # just above 0.5: predicted, but its superpixels' mean (with its edges) is weak
    p[0][blob] = 0.48
    spread = blob.clone()
    spread[5:20, 100:101] = False
    p[1][~obj & ~spread & (torch.arange(W)[None] > 90).expand(H, W)] = 0.1
    p[0] = 1 - p[1]
    maps = fusion_maps(v, image, CFG)
    maps = SegmentMaps(maps.superpixels, np.where(obj.numpy(), 0, 1))  # the object's segment, the rest
    # the blob's superpixels average to < 0.3 once its surroundings (0.1) are in: it goes back to background
    mean = vote_probs(p, maps.superpixels)[1]
    weak = spread & (mean < 0.3)
    fused = grow_labels(p, maps) == 1
    assert bool(weak.any()) and not bool((fused & weak).any()) and iou(fused & obj, obj) > 0.97


def test_a_correct_prediction_is_left_alone():
    image, obj, v = scene()
    p = probs_of(0.1 + 0.8 * obj)
    fused = fuse_binary("segments", p, v, image=image, cfg=CFG).mask
    assert int((fused ^ obj).sum()) <= 5  # at most a superpixel's stray pixels
    # and an empty prediction stays empty (no segment is ever forced in)
    assert not fuse_binary("segments", probs_of(torch.full((H, W), 0.2)), v, image=image, cfg=CFG).mask.any()


def test_label_maps_grow_each_class_and_keep_a_correct_map():
    image, obj, v = scene()
    yy, _ = np.mgrid[0:H, 0:W]
    sure = obj & torch.tensor(yy < 50)
    fg = 0.05 + 0.85 * sure.float() + 0.4 * (obj & ~sure).float()
    p = torch.stack([1 - fg - 0.02, fg, torch.full((H, W), 0.02)])
    fused = fuse_semantic("segments", p, v, image=image, cfg=CFG)
    truth = obj.long()
    assert float((fused == truth).float().mean()) > 0.99 > float((p.argmax(0) == truth).float().mean())
    clean = probs_of(0.1 + 0.8 * obj)
    assert int((fuse_semantic("segments", clean, v, image=image, cfg=CFG) != obj.long()).sum()) <= 5
    # without a background class: the per-superpixel vote
    novote = fuse_semantic("segments", clean, v, image=image, cfg=CFG, background=None)
    assert iou(novote == 1, obj) > 0.97


def test_vote_probs_averages_each_region():
    regions = np.array([[0, 0, 1], [0, 2, 1]])
    p = torch.tensor([[[1.0, 0.0, 0.2], [0.5, 0.9, 0.4]]])
    out = vote_probs(p, regions)
    assert torch.allclose(out[0], torch.tensor([[0.5, 0.5, 0.3], [0.5, 0.9, 0.3]]))
    with pytest.raises(ValueError, match="differ in size"):
        vote_probs(p, regions[:, :2])


def test_maps_are_deterministic_and_parts_can_be_switched_off():
    image, obj, v = scene()
    two = spectral_segments(v, 2)
    assert max(iou(torch.tensor(two == k), obj) for k in (0, 1)) > 0.8  # one segment is the disc (patch-blurred)
    a, b = fusion_maps(v, image, CFG), fusion_maps(v, image, CFG)
    assert np.array_equal(a.superpixels, b.superpixels) and np.array_equal(a.spectral, b.spectral)
    assert a.superpixels.max() > 50 and a.spectral.max() == CFG.spectral_segments - 1
    off = fusion_maps(v, image, FusionConfig(spectral_segments=0, superpixels=0))
    assert off.superpixels.max() == 0 and off.spectral.max() == 0
    with pytest.raises(ValueError, match=">= 0"):
        FusionConfig(superpixels=-1)
    with pytest.raises(ValueError, match="seed_share"):
        FusionConfig(seed_share=0)
    with pytest.raises(ValueError, match="need the eigenvectors"):
        fusion_maps(None, None, FusionConfig())
