"""The training augmentations of DINOv2's dense probes, on tensors.

ADE20K (mmseg's pipeline of the official linear config, ssl_reference.md §5.2):
``Resize(img_scale=(99999999, crop), ratio_range=(0.5, 2.0))``, the shorter side to the crop
size times a uniform ratio (image bilinear, mask nearest; DINOv2's "+ms" config draws the
ratio from (1.0, 3.0), ``MS_RATIO_RANGE``); ``RandomCrop(crop,
cat_max_ratio=0.75)``, redrawn up to 10 times until no class covers 75 % of the window's
labelled pixels; ``RandomFlip(0.5)``; ``PhotoMetricDistortion``; ImageNet normalisation;
padding to the crop (image 0, mask ``IGNORE_INDEX``). The photometric steps work on 0..255
values and truncate after each, as mmcv's ``convert`` does on uint8 images; hue and
saturation go through HSV in floating point, where mmcv uses OpenCV's 8-bit HSV.

NYUd (the depth toolbox's pipeline of DINOv2's NYU configs, §5.3): ``NYUCrop`` (rows 45:472,
columns 43:608 of a 480 x 640 frame, where the frame has content), ``RandomRotate(0.5, 2.5°)``
(image bilinear, depth nearest, zeros outside: no ground truth there), ``RandomFlip(0.5)``,
``RandomCrop(416 x 544)``, ``ColorAug(0.5)``: gamma 0.9-1.1 applied to the 0..255 values as
the toolbox does, brightness 0.75-1.25, a colour per channel 0.9-1.1, clipped to 0..255.

An image's randomness comes from ``(seed, draw)``, the draw being its position in the training
stream, so the batches do not depend on the number of workers.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .imagesets import IMAGENET_MEAN, IMAGENET_STD, as_hw, mmcv_resize, rgb_array, seeded_batches, short_side_hw
from .segmentation import IGNORE_INDEX

RATIO_RANGE = (0.5, 2.0)
#: the "+ms" config's ``Resize(img_scale=(99999999, 640), ratio_range=(1.0, 3.0))``: it trains
#: on the larger scales it is tested at (``segmentation.MS_SCALES`` run to 3.0)
MS_RATIO_RANGE = (1.0, 3.0)
CAT_MAX_RATIO = 0.75
CROP_TRIES = 10
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18

_MEAN = 255.0 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = 255.0 * torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _pixels(image: Any) -> torch.Tensor:
    """A PIL image as (3, H, W) RGB float values in 0..255, what the pipelines transform."""
    return torch.from_numpy(rgb_array(image)).permute(2, 0, 1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """0..255 RGB -> the encoder's ImageNet-normalised input."""
    return (x - _MEAN) / _STD


def crop_origin(mask: torch.Tensor, crop: tuple[int, int], rng: np.random.Generator,
                cat_max_ratio: float = CAT_MAX_RATIO, tries: int = CROP_TRIES) -> tuple[int, int]:
    """Top and left of mmseg's ``RandomCrop`` window over ``mask`` (H, W): redrawn while one
    class covers ``cat_max_ratio`` or more of its labelled pixels, or it holds a single class;
    after ``tries`` redraws the last one stands."""
    H, W = mask.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(H - crop[0], 0) + 1)), int(rng.integers(0, max(W - crop[1], 0) + 1))

    top, left = draw()
    if cat_max_ratio >= 1.0:
        return top, left
    for _ in range(tries):
        window = mask[top:top + crop[0], left:left + crop[1]]
        counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        top, left = draw()
    return top, left


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(3, ...) RGB -> HSV: hue in [0, 1), saturation in [0, 1], value in RGB's units."""
    r, g, b = x.unbind(0)
    v, _ = x.max(0)
    delta = v - x.min(0).values
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    d = delta.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rgb_to_hsv``."""
    h, s, v = hsv.unbind(0)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = (sector.long() % 6).unsqueeze(0)
    pick = [torch.stack(c).gather(0, i).squeeze(0)
            for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return torch.stack(pick)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmcv's ``convert`` on a uint8 image: ``x * alpha + beta``, clipped, truncated."""
    return (x * alpha + beta).clamp(0, 255).floor()


def photometric_distortion(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` of a (3, H, W) RGB image in 0..255: each step with
    probability 1/2, contrast before or after the HSV steps at random."""
    if rng.integers(2):
        x = _convert(x, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = bool(rng.integers(2))

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return _convert(x, alpha=rng.uniform(*CONTRAST_RANGE)) if rng.integers(2) else x

    if contrast_first:
        x = contrast(x)
    saturation = rng.uniform(*SATURATION_RANGE) if rng.integers(2) else None
    hue = int(rng.integers(-HUE_DELTA, HUE_DELTA)) if rng.integers(2) else None  # mmseg's randint: [-18, 18)
    if saturation is not None or hue is not None:
        h, s, v = rgb_to_hsv(x).unbind(0)
        if saturation is not None:
            s = (s * saturation).clamp(0, 1)
        if hue is not None:
            h = (h + hue / 180.0) % 1.0  # OpenCV's 8-bit hue runs over 0..180
        x = hsv_to_rgb(torch.stack([h, s, v])).round().clamp(0, 255)
    if not contrast_first:
        x = contrast(x)
    return x


def seg_train_sample(image: Any, mask: Any, crop: int | Sequence[int], rng: np.random.Generator,
                     ratio_range: tuple[float, float] = RATIO_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented (image, mask): (3, h, w) normalised, (h, w) long, (h, w) = ``crop``; the
    shorter side first goes to the crop's times a ratio drawn from ``ratio_range``."""
    ch, cw = as_hw(crop)
    x = _pixels(image)
    y = torch.from_numpy(np.asarray(mask).astype(np.int64))
    if y.shape != x.shape[-2:]:
        raise ValueError(f"mask {tuple(y.shape)} and image {tuple(x.shape[-2:])} differ in size")
    hw = short_side_hw(*x.shape[-2:], int(min(ch, cw) * rng.uniform(*ratio_range)))
    x = mmcv_resize(x, hw)
    y = F.interpolate(y[None, None].float(), size=hw, mode="nearest")[0, 0].long()
    top, left = crop_origin(y, (ch, cw), rng)
    x, y = x[:, top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    x = _normalise(photometric_distortion(x, rng))
    pad = (0, cw - x.shape[-1], 0, ch - x.shape[-2])
    return F.pad(x, pad, value=0.0), F.pad(y, pad, value=IGNORE_INDEX)


#: The depth toolbox's ``NYUCrop`` of a 480 x 640 NYUd frame: rows, columns with content
NYU_CROP = ((45, 472), (43, 608))
ROTATE_PROB, ROTATE_DEGREES = 0.5, 2.5
COLOR_PROB, GAMMA_RANGE, DEPTH_BRIGHTNESS_RANGE, COLOR_RANGE = 0.5, (0.9, 1.1), (0.75, 1.25), (0.9, 1.1)


def rotate(t: torch.Tensor, degrees: float, mode: str) -> torch.Tensor:
    """(C, H, W) turned ``degrees`` clockwise about the image centre (mmcv's ``imrotate``:
    same size, corners cut, zeros where nothing maps)."""
    H, W = t.shape[-2:]
    a = math.radians(degrees)
    # output -> input sampling positions in grid_sample's [-1, 1] coordinates (aspect-corrected)
    theta = torch.tensor([[math.cos(a), math.sin(a) * H / W, 0.0],
                          [-math.sin(a) * W / H, math.cos(a), 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, t.shape[0], H, W], align_corners=False)
    return F.grid_sample(t[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def color_aug(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The toolbox's ``ColorAug`` of a (3, H, W) image in 0..255, with probability ``COLOR_PROB``."""
    if rng.random() >= COLOR_PROB:
        return x
    gamma, brightness = rng.uniform(*GAMMA_RANGE), rng.uniform(*DEPTH_BRIGHTNESS_RANGE)
    colors = torch.from_numpy(rng.uniform(*COLOR_RANGE, size=3)).float().view(3, 1, 1)
    return (x.pow(gamma) * brightness * colors).clamp(0, 255)


def depth_train_sample(image: Any, depth: Any, crop: int | Sequence[int], rng: np.random.Generator,
                       nyu_crop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented (image, depth): (3, h, w) normalised, (h, w) metres, (h, w) = ``crop``
    (0 where the rotation left no ground truth)."""
    ch, cw = as_hw(crop)
    x = _pixels(image)
    d = torch.from_numpy(np.asarray(depth, dtype=np.float32).copy())[None]
    if d.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"depth map {tuple(d.shape[-2:])} and image {tuple(x.shape[-2:])} differ in size")
    if nyu_crop:
        if tuple(x.shape[-2:]) != (480, 640):
            raise ValueError(f"depth.nyu_crop cuts NYUd's 480 x 640 frames; this image is {tuple(x.shape[-2:])}: "
                             "set evaluate.classic.depth.nyu_crop to false")
        (r0, r1), (c0, c1) = NYU_CROP
        x, d = x[:, r0:r1, c0:c1], d[:, r0:r1, c0:c1]
    H, W = x.shape[-2:]
    if ch > H or cw > W:
        raise ValueError(f"depth.train_crop {(ch, cw)} is larger than the training image {(H, W)}")
    turn, degrees = rng.random() < ROTATE_PROB, rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES)
    if turn:
        x, d = rotate(x, degrees, "bilinear").round().clamp(0, 255), rotate(d, degrees, "nearest")
    if rng.random() < 0.5:
        x, d = x.flip(-1), d.flip(-1)
    top, left = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    x, d = x[:, top:top + ch, left:left + cw], d[0, top:top + ch, left:left + cw]
    return _normalise(color_aug(x, rng)), d


class AugmentedImages(Dataset):
    """A dense training split, augmented: item ``(i, draw)`` is record ``i`` under the
    randomness of ``(seed, draw)`` (``augmented_batches`` numbers the draws). ``target``:
    ``seg`` (ADE20K's pipeline, its rescale ratios from ``ratio_range``) or ``depth`` (NYUd's;
    ``nyu_crop`` first cuts the frame)."""

    def __init__(self, records: Sequence[dict[str, Any]], target: str, crop: int | Sequence[int], seed: int,
                 nyu_crop: bool = False, ratio_range: tuple[float, float] = RATIO_RANGE) -> None:
        if target not in ("seg", "depth"):
            raise ValueError(f"no training augmentation for target {target!r} (seg, depth)")
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")
        self.records, self.target, self.crop = records, target, as_hw(crop)
        self.seed, self.nyu_crop, self.ratio_range = int(seed), nyu_crop, (float(lo), float(hi))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, draw = (int(k) for k in key)
        record, rng = self.records[i], np.random.default_rng([self.seed, draw])
        if self.target == "seg":
            return seg_train_sample(record["image"], record["seg"], self.crop, rng, self.ratio_range)
        return depth_train_sample(record["image"], record["depth"], self.crop, rng, self.nyu_crop)


def augmented_batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """``seeded_batches``' index batches as (batch, 2) rows ``(index, draw)``, the draw being
    the image's position in the stream: a record drawn twice is augmented differently."""
    for k, idx in enumerate(seeded_batches(n, batch, seed)):
        yield torch.stack([idx, torch.arange(k * batch, (k + 1) * batch)], dim=1)
