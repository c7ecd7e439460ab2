"""DINOv2 multi-crop augmentation and the collate that adds iBOT masks
(``dinov2/data/augmentations.py::DataAugmentationDINO``, ``data/collate.py``).

Gaussian-blur probabilities — decision: **bug-compatible with the DINOv2 code**. DINOv2's
``GaussianBlur(p)`` subclasses ``RandomApply`` with ``p_applied = 1 − p`` (dinov2 PR #411,
dinov3 issue #286), so the nominal (1.0, 0.1, 0.5) of the paper's recipe really means:
global crop 1 never blurred, global crop 2 blurred with p = 0.9, local crops p = 0.5. The
released Web-DINO checkpoints were trained with that code and the paper says it uses the
off-the-shelf recipe, so the effective probabilities are the default here;
``blur_convention="nominal"`` applies (1.0, 0.1, 0.5) literally instead.

Blur radius — decision: **scaled with the global crop size**. DINOv2's sigma range (0.1, 2.0)
px and 9-px kernel are pixels of a 224-px global crop. At the mini scale's 32-px crops the same
pixel values blur ~7x more of the image (sigma 2 px at 32 px is sigma 14 px at 224 px): the
blurred global view keeps only colour blobs, so the two views of an image share little beyond
colour statistics. ``blur_sigma_range(global_size)`` keeps the augmentation's strength
relative to the crop, (0.1, 2.0)·G/224, and is exactly DINOv2's at G = 224. The G of a run is
the scale's *base* resolution (``DinoConfig.blur_reference_size``): DINOv2's 378/518 phase keeps
the 224-px blur, so a high-resolution fine-tune does too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from webssl_repro.data.masking import MaskingGenerator, masked_token_selection, sample_masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: nominal blur probabilities of DINOv2's recipe: (global crop 1, global crop 2, local crops)
NOMINAL_BLUR_P = (1.0, 0.1, 0.5)
#: DINOv2's blur sigma range (px) and kernel size, for its 224-px global crops
DINOV2_BLUR_SIGMA = (0.1, 2.0)
DINOV2_BLUR_KERNEL = 9
DINOV2_GLOBAL_SIZE = 224


@contextlib.contextmanager
def global_rng_seeded(seed: int) -> Iterator[None]:
    """torchvision's random transforms draw from the global CPU generator: run them under
    ``seed`` and restore that generator after. Only it is seeded. ``torch.manual_seed`` would
    also seed every accelerator's generator: before CUDA starts, each call queues the seed with
    a captured stack (~0.6 ms a sample, on a CUDA build even without a GPU), and once it has
    started, each sample would reset the trainer's CUDA generator (drop-path, masks)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def blur_probabilities(convention: str = "dinov2_code") -> tuple[float, float, float]:
    """Blur probabilities (global crop 1, global crop 2, local crops) of a convention."""
    if convention == "dinov2_code":
        return tuple(1.0 - p for p in NOMINAL_BLUR_P)  # what DINOv2 actually applies
    if convention == "nominal":
        return NOMINAL_BLUR_P
    raise ValueError(f"blur_convention must be 'dinov2_code' or 'nominal', got {convention!r}")


def blur_sigma_range(global_size: int = DINOV2_GLOBAL_SIZE) -> tuple[float, float]:
    """DINOv2's sigma range in pixels of a ``global_size`` crop (same fraction of the crop)."""
    s = global_size / DINOV2_GLOBAL_SIZE
    return (DINOV2_BLUR_SIGMA[0] * s, DINOV2_BLUR_SIGMA[1] * s)


def blur_kernel_size(global_size: int = DINOV2_GLOBAL_SIZE) -> int:
    """DINOv2's 9-px kernel scaled like the sigma: odd, at least 3 (9 at 224 px)."""
    k = int(round(DINOV2_BLUR_KERNEL * global_size / DINOV2_GLOBAL_SIZE))
    return max(3, k + 1 - k % 2)


def blur_pixels(global_size: int, sigma: tuple[float, float] | None = None,
                kernel: int | None = None) -> tuple[tuple[float, float], int]:
    """(sigma range, kernel size) of a pipeline: explicit values, else DINOv2's scaled to ``global_size``."""
    return (tuple(sigma) if sigma is not None else blur_sigma_range(global_size),
            kernel if kernel is not None else blur_kernel_size(global_size))


def _blur(p: float, sigma: tuple[float, float] = DINOV2_BLUR_SIGMA,
          kernel_size: int = DINOV2_BLUR_KERNEL) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel_size, sigma=sigma)], p=p)


class MultiCropAugmentation:
    """PIL image → ``{"global_crops": [2 × (3,G,G)], "local_crops": [n_local × (3,L,L)]}``.

    Per crop: RandomResizedCrop (bicubic) + flip, colour jitter (p 0.8) + grayscale (p 0.2),
    Gaussian blur, solarize (2nd global crop only, p 0.2), ImageNet normalisation.
    ``blur_sigma`` / ``blur_kernel``: None scales DINOv2's (0.1, 2.0) / 9 px to the global
    crop size (see the module docstring); local crops use the same pixels, as in DINOv2.
    """

    def __init__(self, global_size: int = 224, local_size: int = 98, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.32, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.32),
                 blur_convention: str = "dinov2_code",
                 blur_sigma: tuple[float, float] | None = None,
                 blur_kernel: int | None = None) -> None:
        blur_p = blur_probabilities(blur_convention)
        self.blur_p = blur_p
        self.blur_sigma, self.blur_kernel = blur_pixels(global_size, blur_sigma, blur_kernel)
        self.n_local = n_local
        bicubic = InterpolationMode.BICUBIC

        def geometric(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.Compose([v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic,
                                                    antialias=True),
                               v2.RandomHorizontalFlip(p=0.5)])

        color = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])
        normalize = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global_geometric = geometric(global_size, global_scale)
        self.local_geometric = geometric(local_size, local_scale)
        def blur(p: float) -> v2.Transform:
            return _blur(p, self.blur_sigma, self.blur_kernel)

        self.global1 = v2.Compose([color, blur(blur_p[0]), normalize])
        # solarize acts on the uint8 range (threshold 128), i.e. before normalisation
        self.global2 = v2.Compose([color, blur(blur_p[1]), v2.RandomSolarize(threshold=128, p=0.2),
                                   normalize])
        self.local = v2.Compose([color, blur(blur_p[2]), normalize])

    def _crops(self, image: Any) -> dict[str, list[torch.Tensor]]:
        return {
            "global_crops": [self.global1(self.global_geometric(image)),
                             self.global2(self.global_geometric(image))],
            "local_crops": [self.local(self.local_geometric(image)) for _ in range(self.n_local)],
        }

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> dict[str, list[torch.Tensor]]:
        """Crops of ``image`` (PIL or uint8 tensor). torchvision draws from the global torch
        RNG; with ``generator`` the crops are drawn under a seed taken from it, leaving the
        global RNG untouched, so they are reproducible."""
        if generator is None:
            return self._crops(image)
        with global_rng_seeded(int(torch.randint(0, 2**62, (), generator=generator).item())):
            return self._crops(image)


def collate_multicrop(samples: Sequence[Any], patch_size: int,
                      mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
                      mask_sample_probability: float = 0.5,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Batch B multi-crop samples for ``DinoMethod.training_step``.

    Crop-major stacking (all images' crop 1, then all images' crop 2) lets the method split
    views with ``chunk``. ``samples`` are ``MultiCropAugmentation`` outputs, or
    ``(output, target)`` pairs as image-folder datasets give them (targets are dropped).
    Returns ``global_crops`` (2B,3,H,W), ``local_crops`` (nB,3,h,w), ``masks`` bool
    (2B, (H/patch)·(W/patch)) and their ``mask_indices`` / ``mask_weights``; use
    ``functools.partial`` to fix the keywords for a DataLoader.
    """
    crops = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0]["local_crops"])
    global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])
    if n_local:
        local_crops = torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops])
    else:
        local_crops = global_crops.new_zeros((0, *global_crops.shape[1:]))
    return with_ibot_masks({"global_crops": global_crops, "local_crops": local_crops}, patch_size,
                           mask_ratio_min_max, mask_sample_probability, generator)


def with_ibot_masks(batch: dict[str, torch.Tensor], patch_size: int,
                    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
                    mask_sample_probability: float = 0.5,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``batch`` plus iBOT block masks over its global crops: ``masks`` (bool, 2B × patches)
    and their ``mask_indices`` / ``mask_weights`` (``masking.masked_token_selection``), made
    here so that the training step never has to find them on the device."""
    global_crops = batch["global_crops"]
    grid = (global_crops.shape[-2] // patch_size, global_crops.shape[-1] // patch_size)
    masks = sample_masks(global_crops.shape[0], grid, mask_ratio_min_max, mask_sample_probability,
                         generator, MaskingGenerator(grid))
    indices, weights = masked_token_selection(masks)
    return {**batch, "masks": masks, "mask_indices": indices, "mask_weights": weights}
