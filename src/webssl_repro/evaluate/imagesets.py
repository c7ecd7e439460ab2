"""Eval-set images as probe inputs, read lazily: ImageNet's 1.28M training images never sit
in memory at once, and the mini sets take the same path.

A split is a sequence of records (``image`` + ``label`` / ``seg`` / ``depth`` / ``caption``):
the mini-web sets are small lists, the real sets (``data.real_evalsets.HFSplit``) decode a row
when it is indexed. ``EvalImages`` turns records into the probe's normalised tensors,
and ``image_loader`` batches them in a given index order (workers decode ahead at paper scale),
so every probe sees the same seeded batches whether it caches tokens or streams them.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from webssl_repro.data.workers import JobDataLoader
from webssl_repro.files import read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: target key -> (resize mode, dtype): neither class ids nor depths are blended (a depth map's 0
#: marks a missing reading, which bilinear would mix into its neighbours as a shallow depth that
#: SigLoss, masking only depth > 0, then trains on)
TARGETS = {"label": (None, torch.long), "seg": ("nearest", torch.long), "depth": ("nearest", torch.float32)}


def load_split(manifest_path: str | Path, split: str) -> Sequence[dict[str, Any]]:
    """Records of one split of an eval set, from the manifest its data rule wrote."""
    from webssl_repro.data.evalsets import load_evalset

    manifest = read_json(manifest_path)
    if manifest.get("source") == "hf":  # paper scale: ImageNet-1k, ADE20K, NYUd, WIT-1024
        from webssl_repro.data.real_evalsets import load_hf_split

        return load_hf_split(manifest, split)
    try:
        (rel,) = manifest["splits"][split].values()
    except (KeyError, ValueError):
        raise ValueError(f"{manifest_path}: no single '{split}' split in {manifest.get('splits')}") from None
    return load_evalset(str(Path(manifest_path).parent / rel))


#: DINOv2's eval transform for ImageNet (``eval/linear.py``, ``eval/knn.py``): the shorter
#: side resized to 256 for a 224 crop, i.e. the crop keeps 224/256 of it.
CLASSIFY_CROP = 224 / 256


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """An eval size, ``s`` or ``(h, w)``, as ``(h, w)``."""
    if isinstance(size, int) or np.ndim(size) == 0:
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


def _resize(t: torch.Tensor, hw: tuple[int, int], mode: str, antialias: bool = False) -> torch.Tensor:
    """(C, H, W) -> (C, h, w): real eval sets (ImageNet, ADE20K, NYUd) mix image sizes."""
    if tuple(t.shape[-2:]) == hw:
        return t
    extra = {"align_corners": False, "antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(t.unsqueeze(0), size=hw, mode=mode, **extra).squeeze(0)


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


#: How an image meets the encoder's square input: ``crop`` resizes the shorter side to
#: size / crop_pct and crops the centre (torchvision's Resize + CenterCrop: DINOv2's ImageNet
#: evaluation with ``CLASSIFY_CROP``, timm's DINOv2 config for alignment with 1.0); ``pad``
#: first pads to a square with the mean colour (Cambrian's ``expand2square``, the VQA probe);
#: ``squash`` resizes straight to ``size``, aspect not kept; ``short`` resizes the shorter side
#: to ``size`` keeping the aspect (mmseg's ``Resize(img_scale=(99999999, 512), keep_ratio=True)``
#: of DINOv2's ADE20K test); ``cover`` resizes (aspect kept) just to cover ``size`` and takes
#: the centre, targets alike (the dense training images whose test keeps the aspect). Dense
#: targets follow ``cover`` or ``squash``, or stay native.
FITS = ("crop", "pad", "squash", "short", "cover")
#: The fits of the dense protocols, whose pipelines (mmseg, the depth toolbox) resize with
#: mmcv: cv2's bilinear on 8-bit images. The others resize as PIL / torchvision: bicubic with
#: anti-aliasing.
DENSE_FITS = ("squash", "short", "cover")


def short_side_hw(H: int, W: int, short: int) -> tuple[int, int]:
    """(h, w) of an H x W image whose shorter side becomes ``short`` (mmseg's rescale_size for
    ``img_scale=(99999999, short)``: one factor for both sides, ``int(x * factor + 0.5)``)."""
    factor = short / min(H, W)
    return int(H * factor + 0.5), int(W * factor + 0.5)


def crop_box(H: int, W: int, size: int, crop_pct: float) -> tuple[tuple[int, int], int, int]:
    """The ``crop`` fit of an H x W image to a ``size`` square: the resized (h, w) and the
    centre crop's top and left (torchvision's Resize(size / crop_pct) + CenterCrop(size))."""
    short = int(size / crop_pct)  # floor, as timm's eval transform
    new = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    return new, int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))


def cover_box(H: int, W: int, hw: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """The dense ``crop`` fit: resized (aspect kept) just to cover ``hw``, then its centre:
    the resized (h, w), top and left. For a square ``hw``, ``crop_box`` with no margin."""
    factor = max(hw[0] / H, hw[1] / W)
    new = (max(hw[0], int(H * factor + 0.5)), max(hw[1], int(W * factor + 0.5)))
    return new, int(round((new[0] - hw[0]) / 2.0)), int(round((new[1] - hw[1]) / 2.0))


def _resize_crop(t: torch.Tensor, box: tuple[tuple[int, int], int, int], hw: tuple[int, int], mode: str,
                 antialias: bool = False) -> torch.Tensor:
    """``t`` resized to ``box``'s size, then its ``hw`` window at ``box``'s top and left."""
    new, top, left = box
    return _resize(t, new, mode, antialias)[:, top:top + hw[0], left:left + hw[1]]


def rgb_array(image: Any) -> np.ndarray:
    """A PIL image as (H, W, 3) float32 RGB values in 0..255, the one decoding every probe input starts from."""
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def pixels(image: Any) -> torch.Tensor:
    """A PIL image as (3, H, W) RGB values in 0..1, what the fits resize."""
    return torch.from_numpy(rgb_array(image) / 255.0).permute(2, 0, 1)


def mmcv_resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) 8-bit values (0..255) resized as mmcv's ``imresize`` does: bilinear (half-pixel
    centres), no anti-aliasing, rounded to the 8-bit levels (cv2's fixed point may differ by
    one). The dense protocols' resize, at test (``fit_pixels``) and in training (``dense_augment``)."""
    return _resize(x, tuple(hw), "bilinear").round().clamp(0, 255)


def _mmcv_resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``mmcv_resize`` of pixels in 0..1."""
    if tuple(x.shape[-2:]) == hw:
        return x
    return mmcv_resize(x * 255.0, hw) / 255.0


def fit_pixels(x: torch.Tensor, size: int | Sequence[int], fit: str = "crop", crop_pct: float = 1.0,
               scale: float = 1.0) -> torch.Tensor:
    """(3, H, W) pixels in 0..1 -> the probe's ImageNet-normalised input, resized by ``fit``
    (``FITS``; ``pad`` squashes an image already padded square) on ``x``'s device: as mmcv
    for ``DENSE_FITS``, else as PIL / torchvision. ``scale`` multiplies the fitted size of
    ``short`` and ``squash`` (truncated, as mmseg's ``MultiScaleFlipAug`` ratios) in one resize
    from ``x``."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if scale != 1.0 and fit not in ("short", "squash"):
        raise ValueError(f"scale {scale} needs fit 'short' or 'squash', got {fit!r}")
    h, w = as_hw(size)
    if scale != 1.0:  # mmseg's MultiScaleFlipAug: int(scale x ratio)
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
    if fit == "short":
        x = _mmcv_resize(x, short_side_hw(*x.shape[-2:], min(h, w)))
    elif fit == "cover":
        new, top, left = cover_box(*x.shape[-2:], (h, w))
        x = _mmcv_resize(x, new)[:, top:top + h, left:left + w]
    elif fit == "squash":
        x = _mmcv_resize(x, (h, w))
    elif fit == "pad":
        x = _resize(x, (h, w), "bicubic", antialias=True)
    else:
        if h != w:
            raise ValueError(f"a centre crop needs a square size, got {(h, w)}")
        x = _resize_crop(x, crop_box(*x.shape[-2:], h, crop_pct), (h, w), "bicubic", antialias=True)
    return (x.clamp(0, 1) - _MEAN.to(x.device)) / _STD.to(x.device)


def image_tensor(image: Any, size: int | Sequence[int], fit: str = "crop", crop_pct: float = 1.0,
                 scale: float = 1.0, pad_mean: Sequence[float] = IMAGENET_MEAN) -> torch.Tensor:
    """One PIL image -> (3, h, w) by ``fit_pixels``; ``pad`` first pads it to a square with
    ``pad_mean``, the encoder's own pixel mean, as Cambrian's ``expand2square`` pads with its
    processor's ``image_mean``."""
    if fit == "pad" and image.width != image.height:
        side = max(image.width, image.height)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in pad_mean))
        square.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    return fit_pixels(pixels(image), size, fit, crop_pct, scale)


class ScalePyramid(Sequence):
    """One image at each of ``scales`` times its ``fit`` ("short" or "squash") to ``size``, as
    one-image batches (1, 3, h, w), each level resized from the original when it is read
    (mmseg's ``MultiScaleFlipAug``, the "+ms" test). Only the original is held, and ``to``
    moves it, so the levels are made where the encoder runs."""

    def __init__(self, original: torch.Tensor, size: tuple[int, int], fit: str, scales: Sequence[float]) -> None:
        self.original, self.size, self.fit, self.scales = original, size, fit, tuple(scales)

    def __len__(self) -> int:
        return len(self.scales)

    def __getitem__(self, i: int) -> torch.Tensor:
        return fit_pixels(self.original, self.size, self.fit, scale=self.scales[i]).unsqueeze(0)

    def to(self, device: torch.device | str) -> "ScalePyramid":
        return ScalePyramid(self.original.to(device), self.size, self.fit, self.scales)


def images_tensor(records: Sequence[dict[str, Any]], size: int, fit: str = "crop",
                  crop_pct: float = 1.0, pad_mean: Sequence[float] = IMAGENET_MEAN) -> torch.Tensor:
    """A small set's images stacked (N, 3, size, size): VQA, k-NN and alignment sets."""
    return torch.stack([image_tensor(r["image"], size, fit, crop_pct, pad_mean=pad_mean) for r in records])


def target_tensor(record: dict[str, Any], key: str, size: int | Sequence[int] | None,
                  fit: str = "squash") -> torch.Tensor:
    """A record's target for the probe: a class id, or an (h, w) mask / depth map fitted to
    ``size`` as its image (``squash`` or ``cover``), or as stored (``size`` None)."""
    mode, dtype = TARGETS[key]
    if mode is None:
        return torch.tensor(int(record[key]), dtype=dtype)
    t = torch.from_numpy(np.asarray(record[key], dtype=np.float32)).unsqueeze(0)
    if size is not None:
        hw = as_hw(size)
        t = _resize_crop(t, cover_box(*t.shape[-2:], hw), hw, mode) if fit == "cover" else _resize(t, hw, mode)
    return t.squeeze(0).to(dtype)


class EvalImages(Dataset):
    """``records`` as (image, target) pairs at the probe's ``size`` (``s`` or ``(h, w)``);
    decoded per item. Class labels get DINOv2's ImageNet eval transform (resize + centre
    crop); masks and depth maps are fitted with their image (``squash``, or ``cover``: aspect
    kept, the centre of ``size``), so the two align, or with ``native`` kept at the set's
    own resolution, where the dense protocols score (the image then fits by ``fit``: ``short``
    for ADE20K's sliding windows). With ``scales`` an item's image is a ``ScalePyramid``: at
    each scale of its fitted size, resized from the original (the "+ms" test)."""

    def __init__(self, records: Sequence[dict[str, Any]], size: int | Sequence[int], target: str,
                 fit: str | None = None, native: bool = False, scales: Sequence[float] | None = None) -> None:
        if target not in TARGETS:
            raise KeyError(f"unknown target {target!r} (known: {sorted(TARGETS)})")
        dense = TARGETS[target][0] is not None
        self.records, self.size, self.target, self.native = records, as_hw(size), target, native
        self.fit = fit or ("squash" if dense else "crop")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        if dense and self.fit not in ("squash", "cover") and not native:
            raise ValueError(f"fit {fit!r} changes the aspect of the image but not of its {target} map: "
                             "use native=True")
        if scales is not None and not (native and self.fit in ("short", "squash")):
            raise ValueError(f"scales need native targets and fit 'short' or 'squash', got fit {self.fit!r}, "
                             f"native={native}")
        self.scales = None if scales is None else tuple(float(s) for s in scales)
        self.crop_pct = 1.0 if dense else CLASSIFY_CROP

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | ScalePyramid, torch.Tensor]:
        record = self.records[i]
        target = target_tensor(record, self.target, None if self.native else self.size, self.fit)
        if self.scales is not None:
            return ScalePyramid(pixels(record["image"]), self.size, self.fit, self.scales), target
        return image_tensor(record["image"], self.size, self.fit, self.crop_pct), target

    def target_of(self, i: int) -> torch.Tensor:
        """Item ``i``'s target alone, without decoding its image."""
        return target_tensor(self.records[i], self.target, None if self.native else self.size, self.fit)

    def targets(self) -> Iterator[torch.Tensor]:
        """Every item's target in order, read as it is asked for."""
        return (self.target_of(i) for i in range(len(self)))


def collate_lists(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch kept as lists (images and targets of different sizes: native-resolution val)."""
    return [x for x, _ in batch], [y for _, y in batch]


def seeded_batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches of a reshuffled pass per epoch (DINOv2's infinite sampler); a
    pass's last partial batch is dropped."""
    if batch > n:
        raise ValueError(f"batch size {batch} is larger than the {n} training images")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def in_order(n: int, batch: int, start: int = 0) -> Iterator[torch.Tensor]:
    """One pass in order from sample ``start``, the last batch possibly short (feature
    extraction, evaluation)."""
    for i in range(start, n, batch):
        yield torch.arange(i, min(i + batch, n))


def image_loader(images: EvalImages, batches: Iterable[torch.Tensor], workers: int = 0, collate=None
                 ) -> Iterator[tuple[torch.Tensor, Any, Any]]:
    """(indices, images, targets) per index batch, in the order given, stacked (or as
    ``collate`` makes them, e.g. ``collate_lists``). With ``workers`` the decoding runs ahead
    in worker processes (0: in this one); the batches do not change."""
    order: deque[torch.Tensor] = deque()

    def sampler() -> Iterator[list[int]]:  # the loader reads ahead: remember what it asked for
        for idx in batches:
            order.append(idx)
            yield idx.tolist()

    workers = max(0, int(workers))
    loader = JobDataLoader(images, batch_sampler=sampler(), num_workers=workers,
                           prefetch_factor=4 if workers else None, collate_fn=collate)
    for x, y in loader:
        yield order.popleft(), x, y

