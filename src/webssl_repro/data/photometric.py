"""DINOv2's photometric augmentations applied to a whole batch of crops at once.

``MultiCropAugmentation`` runs torchvision's per-image transforms: at the mini scale (32 px
crops) that is ~1 ms of Python dispatch per crop, three times the model's own step. Here
each crop still draws its own parameters (apply-or-not, jitter factors and order, blur
sigma), but every operation is one tensor op over the batch. Per-crop semantics follow
torchvision's tensor kernels (``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``,
``gaussian_blur`` with reflect padding, ``solarize``), which the tests check op by op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(lo, hi, generator=gen)


def _bernoulli(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] → (B,1,H,W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _col(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_col(factor) * x + (1 - _col(factor)) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (_col(factor) * x + (1 - _col(factor)) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (HSV round trip, as torchvision's tensor kernel)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    # HSV -> RGB
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack([torch.stack(c, dim=1) for c in
                         ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], dim=1)  # B,3,6,H,W
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding (torchvision's)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    grid = torch.linspace(-half, half, kernel_size)
    k = torch.exp(-0.5 * (grid[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n·c, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


@dataclass(frozen=True)
class Photometric:
    """One crop group's pipeline: colour jitter (p), grayscale (p), blur (p), solarize (p)."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 9
    solarize_p: float = 0.0
    solarize_threshold: float = 128 / 255

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B,3,H,W) float in [0,1] → the augmented batch (still in [0,1], not normalised)."""
        return self.apply(x, self.draw(x.shape[0], gen))

    def draw(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Each of ``n`` crops' own random choices, as torchvision draws them per crop: whether
        it is jittered, its four factors and their order, grayscale, blur and its sigma, solarize."""
        return {"jitter": _bernoulli(n, self.jitter_p, gen),
                "brightness": _uniform(n, 1 - self.brightness, 1 + self.brightness, gen),
                "contrast": _uniform(n, 1 - self.contrast, 1 + self.contrast, gen),
                "saturation": _uniform(n, 1 - self.saturation, 1 + self.saturation, gen),
                "hue": _uniform(n, -self.hue, self.hue, gen),
                "order": torch.argsort(torch.rand(n, 4, generator=gen), dim=1),  # ColorJitter's random order
                "grayscale": _bernoulli(n, self.grayscale_p, gen),
                "blur": _bernoulli(n, self.blur_p, gen),
                "sigma": _uniform(n, *self.blur_sigma, gen),
                "solarize": _bernoulli(n, self.solarize_p, gen)}

    def apply(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` augmented in place by ``draws``: each op once over the crops that drew it."""
        ops = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
               "hue": adjust_hue}
        for position in range(4):
            for k, (name, op) in enumerate(ops.items()):
                rows = (draws["jitter"] & (draws["order"][:, position] == k)).nonzero().flatten()
                if rows.numel():
                    x[rows] = op(x[rows], draws[name][rows])
        gray = draws["grayscale"].nonzero().flatten()
        if gray.numel():
            x[gray] = grayscale(x[gray]).expand(-1, 3, -1, -1)
        rows = draws["blur"].nonzero().flatten()
        if rows.numel():
            x[rows] = gaussian_blur(x[rows], draws["sigma"][rows], self.blur_kernel)
        rows = draws["solarize"].nonzero().flatten()
        if rows.numel():
            sub = x[rows]
            x[rows] = torch.where(sub >= self.solarize_threshold, 1.0 - sub, sub)
        return x
