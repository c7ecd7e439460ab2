"""The dense probes' training augmentations (evaluate/dense_augment.py), checked by hand:
mmseg's ADE20K pipeline and the depth toolbox's NYUd one."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_mini import tiny_data  # noqa: F401  (fixture)
from webssl_repro.evaluate.dense_augment import (MS_RATIO_RANGE, NYU_CROP, RATIO_RANGE, AugmentedImages,
                                                 augmented_batches, color_aug, crop_origin, depth_train_sample,
                                                 hsv_to_rgb, photometric_distortion, rgb_to_hsv, rotate,
                                                 seg_train_sample)
from webssl_repro.evaluate.segmentation import IGNORE_INDEX

MEAN, STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255


class Scripted:
    """An rng whose draws are given: ``integers`` / ``uniform`` / ``random`` pop their queues;
    an empty ``integers`` queue gives the lower bound (coins off, crops at 0)."""

    def __init__(self, integers=(), uniform=(), random=()):
        self.queues = {"integers": list(integers), "uniform": list(uniform), "random": list(random)}
        self.uniform_bounds = []

    def integers(self, low, high=None):
        q = self.queues["integers"]
        return q.pop(0) if q else (0 if high is None else low)

    def uniform(self, low, high, size=None):
        self.uniform_bounds.append((low, high))
        return self.queues["uniform"].pop(0)

    def random(self):
        return self.queues["random"].pop(0)


def test_hsv_round_trip_matches_colorsys():
    rgb = torch.rand(3, 500, dtype=torch.float64) * 255
    rgb[:, :3] = torch.tensor([[255.0, 0, 0], [0, 0, 0], [90, 90, 90]]).T  # red, black, grey
    hsv = rgb_to_hsv(rgb)
    ref = torch.tensor([colorsys.rgb_to_hsv(*c) for c in rgb.T.tolist()], dtype=torch.float64).T
    assert torch.allclose(hsv, ref, atol=1e-9)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-9)


def test_photometric_steps_by_hand():
    x = torch.tensor([[255.0, 100.7, 10.0], [0.0, 100.2, 240.0], [0.0, 50.0, 5.0]]).view(3, 1, 3)
    # All coins off: the image is returned as it is.
    assert torch.equal(photometric_distortion(x, Scripted()), x)
    # Brightness +10: clipped at 255, truncated as uint8 (mmcv's convert).
    out = photometric_distortion(x, Scripted(integers=[1], uniform=[10.0]))
    assert out[:, 0, 0].tolist() == [255.0, 10.0, 10.0] and out[0, 0, 1] == 110.0
    # Contrast x2 after the HSV steps (coin 0 for "contrast first"), the only step on.
    out = photometric_distortion(x, Scripted(integers=[0, 0, 0, 0, 1], uniform=[2.0]))
    assert out[:, 0, 2].tolist() == [20.0, 255.0, 10.0]
    # Hue +30 of OpenCV's 0..180 turns pure red into yellow; saturation x0.5 halves its chroma.
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    assert photometric_distortion(red, Scripted(integers=[0, 0, 0, 1, 30, 0])).flatten().tolist() == [255, 255, 0]
    assert photometric_distortion(red, Scripted(integers=[0, 0, 1, 0, 0], uniform=[0.5])).flatten().tolist() == [
        255, 128, 128]


def test_random_crop_avoids_windows_dominated_by_one_class():
    mask = torch.zeros(10, 20, dtype=torch.long)
    mask[:, 10:] = 1  # a window 10 wide is accepted when it takes > 2.5 columns of each half
    mask[0, :] = IGNORE_INDEX  # unlabelled pixels never count

    def accepted(left: int) -> bool:
        window = mask[:, left:left + 10]
        counts = torch.bincount(window[window != IGNORE_INDEX])
        return len(counts[counts > 0]) > 1 and counts.max() / counts.sum() < 0.75

    picked = [crop_origin(mask, (10, 10), np.random.default_rng(s)) for s in range(200)]
    assert all(top == 0 for top, _ in picked)
    share = np.mean([accepted(left) for _, left in picked])
    plain = np.mean([accepted(left) for _, left in (crop_origin(mask, (10, 10), np.random.default_rng(s), 1.0)
                                                    for s in range(200))])
    assert share > 0.98 and 0.3 < plain < 0.6, (share, plain)  # 5 of 11 windows pass without the check
    # Ten redraws at most: on a one-class mask, the eleventh window stands.
    rng = Scripted(integers=[0, 0] + [v for k in range(1, 11) for v in (0, k)])
    assert crop_origin(torch.zeros(10, 20, dtype=torch.long), (10, 10), rng) == (0, 10)
    assert rng.queues["integers"] == []


def _striped(h: int, w: int, palette: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Vertical stripes 8 px wide, the class of each stripe in its own colour."""
    mask = (np.arange(w) // 8 % len(palette))[None, :].repeat(h, 0)
    return Image.fromarray(palette[mask].astype(np.uint8)), mask


def test_sample_keeps_image_and_mask_aligned_through_rescale_crop_and_flip():
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]])
    image, mask = _striped(48, 96, palette)
    # ratio 1.5: shorter side 48 -> 48 (crop 32 x 1.5), i.e. 48 x 96; window at (5, 21); flipped.
    x, y = seg_train_sample(image, mask, 32, Scripted(integers=[5, 21], uniform=[1.5], random=[0.0]))
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert torch.equal(y, torch.from_numpy(mask[5:37, 21:53]).flip(-1))
    rgb = x.permute(1, 2, 0).numpy() * STD + MEAN
    assert np.allclose(rgb, palette[y.numpy()], atol=1e-3)  # no photometric coin came up
    # ratio 2.0: shorter side 64, i.e. 64 x 128 (image bilinear, mask nearest); window at (9, 40).
    x, y = seg_train_sample(image, mask, 32, Scripted(integers=[9, 40], uniform=[2.0], random=[0.9]))
    assert torch.equal(y, torch.from_numpy(mask[(np.arange(9, 41) * 3) // 4][:, (np.arange(40, 72) * 3) // 4]))
    rgb = x.permute(1, 2, 0).numpy() * STD + MEAN
    ym = y.numpy()
    inside = (ym[:, 2:-2] == ym[:, :-4]) & (ym[:, 2:-2] == ym[:, 4:])  # 2 px from a stripe's edge
    assert inside.sum() > 400 and np.abs(rgb[:, 2:-2][inside] - palette[ym[:, 2:-2][inside]]).max() < 1.0
    # ratio 0.5: the image (16 x 32) is smaller than the crop: padded, the mask with ignore.
    x, y = seg_train_sample(image, mask, 32, Scripted(uniform=[0.5], random=[0.9]))
    assert x.shape == (3, 32, 32) and (y[16:] == IGNORE_INDEX).all() and (y[:16] != IGNORE_INDEX).all()
    assert (x[:, 16:] == 0).all() and torch.equal(y[:16, :32], torch.from_numpy(mask[::3, ::3][:16, :32]))


def test_rescale_ratios_are_lins_or_the_ms_configs():
    """The rescale ratio is drawn from (0.5, 2.0) ("lin.") or the given range (DINOv2's "+ms"
    config: 1.0-3.0): at 3x a 40 x 64 image covers the 32-px crop, at 0.5x it leaves padding."""
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])
    image, mask = _striped(40, 64, palette)
    rng = Scripted(uniform=[1.0], random=[0.9])
    seg_train_sample(image, mask, 32, rng)
    assert rng.uniform_bounds == [RATIO_RANGE] == [(0.5, 2.0)]
    rng = Scripted(uniform=[1.0], random=[0.9])
    seg_train_sample(image, mask, 32, rng, MS_RATIO_RANGE)
    assert rng.uniform_bounds == [MS_RATIO_RANGE] == [(1.0, 3.0)]
    records = [{"image": image, "seg": mask}]
    large = AugmentedImages(records, "seg", 32, seed=0, ratio_range=(3.0, 3.0))[(0, 0)][1]
    small = AugmentedImages(records, "seg", 32, seed=0, ratio_range=(0.5, 0.5))[(0, 0)][1]
    assert (large != IGNORE_INDEX).all() and (small == IGNORE_INDEX).sum() == 32 * 32 - 16 * 26
    with pytest.raises(ValueError, match=r"ratio_range must be 0 < low <= high, got \(2.0, 1.0\)"):
        AugmentedImages(records, "seg", 32, seed=0, ratio_range=(2.0, 1.0))


def test_augmented_draws_are_reproducible_and_numbered_by_stream_position():
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])
    records = [dict(zip(("image", "seg"), _striped(40, 64, palette))) for _ in range(5)]
    data = AugmentedImages(records, "seg", 32, seed=3)
    a, b, other = data[(2, 7)], data[(2, 7)], data[(2, 8)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other[0])
    batches = augmented_batches(5, 2, seed=0)
    first, second = next(batches), next(batches)
    assert first[:, 1].tolist() == [0, 1] and second[:, 1].tolist() == [2, 3]
    assert sorted(first[:, 0].tolist() + second[:, 0].tolist()) == sorted(set(first[:, 0].tolist()
                                                                              + second[:, 0].tolist()))


def test_rotation_is_clockwise_about_the_centre_with_the_aspect_kept():
    t = torch.zeros(1, 41, 81)
    t[0, 20, 60] = 1.0  # 20 px right of the centre (20, 40)
    turned = rotate(t, 90.0, "nearest")
    assert turned[0].nonzero().tolist() == [[40, 40]]  # now 20 px below it
    assert torch.equal(rotate(t, 0.0, "nearest"), t)
    flat = rotate(torch.full((1, 41, 81), 7.0), 10.0, "bilinear")
    assert flat[0, 20, 40] == pytest.approx(7.0) and flat[0, 0, 0] == 0.0  # a corner maps outside: no data


def test_color_aug_by_hand():
    x = torch.tensor([100.0, 100.0, 250.0]).view(3, 1, 1)
    assert torch.equal(color_aug(x, Scripted(random=[0.5])), x)  # p = 0.5: drawn 0.5 is not below it
    out = color_aug(x, Scripted(random=[0.0], uniform=[1.0, 1.2, np.array([1.0, 0.9, 1.0])]))
    assert out.flatten().tolist() == pytest.approx([120.0, 108.0, 255.0])
    # The toolbox raises the 0..255 values to the gamma: 100 ** 1.1 = 158.5.
    out = color_aug(x, Scripted(random=[0.0], uniform=[1.1, 1.0, np.ones(3)]))
    assert out[0].item() == pytest.approx(100 ** 1.1, rel=1e-5) and out[2].item() == 255.0


def _nyu_frame():
    rows, cols = np.mgrid[0:480, 0:640]
    depth = (1.0 + rows / 100.0 + cols / 1000.0).astype(np.float32)  # every pixel its own depth
    blob = (rows - 240) ** 2 / 60 ** 2 + (cols - 320) ** 2 / 120 ** 2 < 1
    depth[blob] = 9.0
    image = np.zeros((480, 640, 3), np.uint8)
    image[blob] = (255, 0, 0)
    return Image.fromarray(image), depth, blob


def test_depth_sample_cuts_the_frame_then_crops_where_drawn():
    image, depth, _ = _nyu_frame()
    # no rotation (0.9), angle drawn anyway, no flip (0.9), crop at (3, 7), no colour (0.9)
    x, d = depth_train_sample(image, depth, (416, 544), Scripted(integers=[3, 7], uniform=[1.0], random=[0.9] * 3),
                              nyu_crop=True)
    (r0, _), (c0, _) = NYU_CROP
    assert x.shape == (3, 416, 544) and torch.equal(d, torch.from_numpy(depth[r0 + 3:r0 + 419, c0 + 7:c0 + 551]))
    assert x.shape[-2:] == d.shape
    with pytest.raises(ValueError, match="nyu_crop cuts NYUd's 480 x 640 frames"):
        depth_train_sample(image.crop((0, 0, 64, 64)), depth[:64, :64], 32, np.random.default_rng(0), nyu_crop=True)
    with pytest.raises(ValueError, match=r"train_crop \(430, 544\) is larger than the training image \(427, 565\)"):
        depth_train_sample(image, depth, (430, 544), np.random.default_rng(0), nyu_crop=True)


def test_depth_sample_rotates_and_flips_image_and_depth_together():
    image, depth, _ = _nyu_frame()
    # rotated 2.4 degrees, flipped, crop at (5, 11), no colour
    turned = Scripted(integers=[5, 11], uniform=[2.4], random=[0.0, 0.0, 0.9])
    x, d = depth_train_sample(image, depth, (416, 544), turned, nyu_crop=True)
    red = x[0] > x[1] + 1.0  # the blob, in the image
    deep = d == 9.0  # the blob, in the depth map
    iou = (red & deep).sum() / (red | deep).sum()
    assert red.sum() > 10000 and iou > 0.97, iou
    assert (d[:, :4] == 0).any() or (d[:, -4:] == 0).any()  # the turned corners lost their ground truth
    still = depth_train_sample(image, depth, (416, 544), Scripted(integers=[5, 11], uniform=[2.4],
                                                                  random=[0.9, 0.9, 0.9]), nyu_crop=True)[1]
    assert not torch.equal(still, d)


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_augmented_dense_probe_is_the_same_with_workers(tiny_data, task):  # noqa: F811
    from test_classic_streaming import DENSE, _encoder
    from webssl_repro.evaluate import classic

    encoder, meta = _encoder()
    cfg = {**DENSE, task: {**DENSE[task], "augment": True, "iters": 6}}
    probe = getattr(classic, task)
    inline = probe(encoder, meta, tiny_data[task], classic.classic_config(cfg))
    workers = probe(encoder, meta, tiny_data[task], classic.classic_config({**cfg, "workers": 1}))
    plain = probe(encoder, meta, tiny_data[task],
                  classic.classic_config({**cfg, task: {**cfg[task], "augment": False}}))
    assert inline == workers
    assert len(inline) == 2 and all(0.0 < v < 100.0 for v in inline.values()) and inline != plain, (inline, plain)
