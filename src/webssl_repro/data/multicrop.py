"""DINOv2 multi-crop with the geometry per image and the photometrics per batch.

Same distribution as ``augmentations.MultiCropAugmentation`` (RandomResizedCrop bicubic +
flip per crop; jitter, grayscale, blur, solarize with DINOv2's per-view probabilities), in
two halves that fit the training loop's data interface: ``crops`` (the loader's per-sample
function) cuts uint8 crops with one PIL call each, and ``collate`` runs the photometric
pipelines once over the batch's global crops and once over its local ones (``data.photometric``;
each crop with its own view's choices). At 32 px this is
several times cheaper than torchvision's per-crop transforms, which cost more than the
mini model's training step.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from webssl_repro.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, blur_pixels, blur_probabilities
from webssl_repro.data.photometric import Photometric


def resized_crop_box(width: int, height: int, scale: tuple[float, float], gen: torch.Generator,
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop), drawn
    from ``gen``; returns the PIL box (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _crop(image: Image.Image, size: int, scale: tuple[float, float], gen: torch.Generator) -> np.ndarray:
    box = resized_crop_box(image.width, image.height, scale, gen)
    out = image.resize((size, size), Image.BICUBIC, box=box)
    if float(torch.rand(1, generator=gen)) < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


class BatchedMultiCrop:
    """2 global + ``n_local`` local crops per image; photometrics applied per batch."""

    def __init__(self, global_size: int = 224, local_size: int = 98, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.32, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.32),
                 blur_convention: str = "dinov2_code",
                 blur_sigma: tuple[float, float] | None = None,
                 blur_kernel: int | None = None) -> None:
        self.blur_p = blur_probabilities(blur_convention)
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        sigma, kernel = blur_pixels(global_size, blur_sigma, blur_kernel)
        blur = {"blur_sigma": sigma, "blur_kernel": kernel}
        self.views = (Photometric(blur_p=self.blur_p[0], **blur),
                      Photometric(blur_p=self.blur_p[1], solarize_p=0.2, **blur),  # solarize: 2nd global only
                      Photometric(blur_p=self.blur_p[2], **blur))
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def crops(self, image: Image.Image, gen: torch.Generator) -> dict[str, np.ndarray]:
        """uint8 HWC crops of one image: ``global`` (2,G,G,3) and ``local`` (n,L,L,3)."""
        image = image.convert("RGB")
        glob = np.stack([_crop(image, self.global_size, self.global_scale, gen) for _ in range(2)])
        local = [_crop(image, self.local_size, self.local_scale, gen) for _ in range(self.n_local)]
        local_arr = np.stack(local) if local else np.zeros((0, self.local_size, self.local_size, 3), np.uint8)
        return {"global": glob, "local": local_arr}

    def _apply(self, view: Photometric, arrays: Sequence[np.ndarray], draws: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return (view.apply(x, draws) - self._mean) / self._std

    def collate(self, samples: Sequence[dict[str, np.ndarray]], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Crop-major, normalised: ``global_crops`` (2B,3,G,G), ``local_crops`` (nB,3,L,L). Each
        view draws its crops' choices in turn; the two global views are then applied as one
        batch: their pipelines differ only in the probabilities behind those choices."""
        n = len(samples)
        shared = [(v.blur_kernel, v.solarize_threshold) for v in self.views[:2]]
        if shared[0] != shared[1]:  # what `apply` takes from the view rather than from the draws
            raise ValueError(f"BatchedMultiCrop: the global views differ in (blur_kernel, solarize_threshold): "
                             f"{shared[0]} vs {shared[1]}; they are applied as one batch")
        first, second = self.views[0].draw(n, gen), self.views[1].draw(n, gen)
        draws = {k: torch.cat([first[k], second[k]]) for k in first}
        glob = self._apply(self.views[1], [s["global"][v] for v in range(2) for s in samples], draws)
        if self.n_local:
            local = self._apply(self.views[2], [s["local"][i] for i in range(self.n_local) for s in samples],
                                self.views[2].draw(n * self.n_local, gen))
        else:
            local = glob.new_zeros((0, 3, self.local_size, self.local_size))
        return {"global_crops": glob, "local_crops": local}
