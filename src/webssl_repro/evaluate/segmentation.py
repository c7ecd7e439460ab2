"""DINOv2 linear semantic segmentation ("lin." and "+ms") on a frozen encoder.

Head = DINOv2's ``BNHead``: (bilinearly resized, concatenated) patch-token maps -> BatchNorm ->
1x1 conv -> logits at token resolution, bilinearly upsampled to the mask size. "lin." reads the
last block only; "+ms" concatenates the last 4 blocks and adds multi-scale + flip test-time
augmentation. Optimisation follows the official mmseg config (AdamW 1e-3, wd 1e-4, linear
warm-up then poly-1.0 decay, CE with ignore 255).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import BlockTokens

IGNORE_INDEX = 255
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # mmseg's usual ratios for DINOv2's "+ms" TTA

FeatureFn = Callable[[torch.Tensor], BlockTokens]

__all__ = ["LinearSegHead", "seg_logits", "multiscale_probs", "train_segmentation",
           "predict", "mean_iou", "MS_SCALES", "IGNORE_INDEX"]


class LinearSegHead(nn.Module):
    """BN + 1x1 conv over the concatenation of ``n_layers`` patch-token maps.

    ``n_layers=1`` is "lin." (last block), ``n_layers=4`` is "+ms" (last 4 blocks). Maps are
    resized to the first map's size before concatenation, as mmseg's ``resize_concat`` does
    (a no-op for a ViT, whose blocks share one grid).
    """

    def __init__(self, in_dim: int, num_classes: int, n_layers: int = 1):
        super().__init__()
        self.n_layers = n_layers
        self.bn = nn.BatchNorm2d(in_dim * n_layers)
        self.conv = nn.Conv2d(in_dim * n_layers, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)  # mmseg decode-head init
        nn.init.zeros_(self.conv.bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """``maps``: (L, B, D, h, w) with L >= n_layers; the last ``n_layers`` are used."""
        if maps.ndim != 5:
            raise ValueError(f"maps must be (layers, B, D, h, w); got {tuple(maps.shape)}")
        chosen = list(maps[-self.n_layers:])
        size = chosen[0].shape[-2:]
        chosen = [m if m.shape[-2:] == size else
                  F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in chosen]
        return self.conv(self.bn(torch.cat(chosen, dim=1)))


def seg_logits(head: LinearSegHead, feature_fn: FeatureFn, images: torch.Tensor,
               out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Logits (B, C, H, W) at ``out_size`` (default: the image size), bilinear upsampling."""
    logits = head(feature_fn(images).maps())
    size = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def multiscale_probs(head: LinearSegHead, feature_fn: FeatureFn, images: torch.Tensor,
                     scales: Sequence[float] = MS_SCALES, flip: bool = True) -> torch.Tensor:
    """"+ms" test-time augmentation: mean class probabilities over scales (and h-flips).

    mmseg's ``aug_test`` averages softmax outputs, not raw logits, so we do the same; each
    scale's output is resized back to the input size before averaging.
    """
    H, W = images.shape[-2:]
    total, count = None, 0
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear",
                                                        align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            p = seg_logits(head, feature_fn, xi, out_size=(H, W)).softmax(dim=1)
            p = p.flip(-1) if flipped else p
            total = p if total is None else total + p
            count += 1
    return total / count


def predict(head: LinearSegHead, feature_fn: FeatureFn, images: torch.Tensor,
            multiscale: bool = False, scales: Sequence[float] = MS_SCALES) -> torch.Tensor:
    """Per-pixel class ids (B, H, W); ``multiscale`` switches on the "+ms" TTA."""
    head.eval()
    with torch.no_grad():
        if multiscale:
            return multiscale_probs(head, feature_fn, images, scales).argmax(dim=1)
        return seg_logits(head, feature_fn, images).argmax(dim=1)


def _lr_factor(it: int, total: int, warmup: int, warmup_ratio: float) -> float:
    """mmseg poly(power 1, min 0) with linear warm-up from ``warmup_ratio``."""
    poly = 1.0 - it / max(total, 1)
    if it < warmup:
        k = (1 - it / warmup) * (1 - warmup_ratio)
        return poly * (1 - k)
    return poly


def train_segmentation(head: LinearSegHead, feature_fn: FeatureFn,
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]], iters: int,
                       lr: float = 1e-3, weight_decay: float = 1e-4, warmup: int = 1500,
                       warmup_ratio: float = 1e-6) -> list[float]:
    """Train ``head`` for ``iters`` steps on (images, masks) batches; returns the loss curve.

    ``batches`` is cycled if shorter than ``iters``. Masks are (B, H, W) long with
    ``IGNORE_INDEX`` for unlabeled pixels; logits are upsampled to the mask size before the loss.
    """
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    losses: list[float] = []
    head.train()
    while len(losses) < iters:
        n_before = len(losses)
        for images, masks in batches:
            if len(losses) >= iters:
                break
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(len(losses), iters, warmup, warmup_ratio)
            logits = seg_logits(head, feature_fn, images, out_size=masks.shape[-2:])
            loss = F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if len(losses) == n_before:
            raise ValueError("batches is empty")
    return losses


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
             ignore_index: int = IGNORE_INDEX) -> float:
    """mmseg mIoU: IoU per class accumulated over all pixels, mean over classes with a union.

    Pixels with ``target == ignore_index`` are dropped; classes absent from both prediction and
    target (union 0) are NaN and skipped (``nanmean``), as in mmseg.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    if ((t < 0) | (t >= num_classes)).any():
        raise ValueError("target has labels outside [0, num_classes) other than ignore_index")
    if ((p < 0) | (p >= num_classes)).any():
        raise ValueError("pred has labels outside [0, num_classes)")
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes].double()
    area_p = torch.bincount(p, minlength=num_classes)[:num_classes].double()
    area_t = torch.bincount(t, minlength=num_classes).double()
    union = area_p + area_t - inter
    iou = inter / union
    iou[union == 0] = float("nan")
    return float(torch.nanmean(iou))
