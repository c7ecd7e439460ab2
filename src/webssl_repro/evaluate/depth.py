"""DINOv2 linear monocular depth ("lin.1" / "lin.4", NYUd protocol) on a frozen encoder.

Head (DINOv2 ``dinov2/hub/depth/decode_heads.py``, depth ``BNHead``): for each chosen block,
concat the patch map with the CLS token broadcast over space (2D channels), upsample x4
bilinearly, concat the blocks, 1x1 conv to 256 bins; bins are uniform on [min, max] depth
("UD"), and "linear" normalisation turns logits into weights ``relu(l) + 0.1`` normalised over
bins; depth = expected bin centre. Losses: SigLoss (scale-invariant log, with warm-up) +
0.5 x GradientLoss. Features are the raw residual stream (``norm=False``), as DINOv2's depther.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import BlockTokens

__all__ = ["lin4_blocks", "DepthLinearHead", "bins_to_depth", "sig_loss", "gradient_loss",
           "depth_loss", "train_depth", "rmse"]

EPS = 1e-3  # log offset of DINOv2's SigLoss / GradientLoss


def lin4_blocks(depth: int) -> list[int]:
    """0-based blocks for lin.4: ``depth * m / 4 - 1`` for m = 1..4.

    The paper does not say which 4 blocks it uses for the 2B-7B models; DINOv2 ViT-g (40 blocks)
    uses {10, 20, 30, 40} (1-based), i.e. [9, 19, 29, 39], which this rule reproduces, as well as
    ViT-S/B's [2, 5, 8, 11]. (DINOv2 ViT-L uses [4, 11, 17, 23]; the rule gives [5, 11, 17, 23].)
    """
    if depth < 4:
        raise ValueError(f"lin.4 needs at least 4 blocks; got depth={depth}")
    return [depth * m // 4 - 1 for m in range(1, 5)]


def bins_to_depth(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, 1, H, W) expected depth with DINOv2's "linear" normalisation."""
    w = torch.relu(logits) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    return (w * bins.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)


class DepthLinearHead(nn.Module):
    """Linear classifier over uniform depth bins on [CLS, patch] features of ``n_layers`` blocks.

    ``n_layers=1`` is lin.1 (last block), ``n_layers=4`` is lin.4 (blocks from ``lin4_blocks``,
    chosen by the feature function). No BatchNorm: DINOv2's depth BNHead never applies one.
    """

    def __init__(self, in_dim: int, n_layers: int = 1, n_bins: int = 256, min_depth: float = 1e-3,
                 max_depth: float = 10.0, upsample: int = 4):
        super().__init__()
        self.n_layers, self.upsample = n_layers, upsample
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv = nn.Conv2d(2 * in_dim * n_layers, n_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def forward(self, tokens: BlockTokens) -> torch.Tensor:
        """Depth (B, 1, upsample*h, upsample*w) from the last ``n_layers`` blocks in ``tokens``."""
        maps, cls = tokens.maps()[-self.n_layers:], tokens.cls[-self.n_layers:]
        if maps.shape[0] != self.n_layers:
            raise ValueError(f"head expects {self.n_layers} blocks; tokens has {maps.shape[0]}")
        feats = []
        for m, c in zip(maps, cls):
            x = torch.cat([m, c[:, :, None, None].expand_as(m)], dim=1)
            feats.append(F.interpolate(x, scale_factor=self.upsample, mode="bilinear",
                                       align_corners=False))
        logits = self.conv(torch.cat(feats, dim=1))
        return bins_to_depth(logits, self.bins)


def sig_loss(pred: torch.Tensor, target: torch.Tensor, warm_up: bool = False) -> torch.Tensor:
    """Scale-invariant log loss on pixels with target > 0: sqrt(Var(g) + 0.15 mean(g)^2).

    During DINOv2's warm-up (first 100 iterations) only the mean term is used.
    """
    valid = target > 0
    g = torch.log(pred[valid] + EPS) - torch.log(target[valid] + EPS)
    if g.numel() < 2:
        return pred.sum() * 0.0
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    return torch.sqrt(g.var() + 0.15 * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MegaDepth multi-scale gradient matching of log-depth over valid pixels.

    DINOv2's copy slices ``[::2i, ::2i]`` and ``[0:-2, :]`` on the leading dims of a 4-D
    (B, 1, H, W) tensor, i.e. over batch/channel rather than space (as we read it, identically
    zero at 2 images per GPU). We apply the intended spatial version (MegaDepth) to each (H, W)
    map at strides 1, 2, 4, 6, normalised by the valid-pixel count of each scale.
    """
    total = pred.new_zeros(())
    for s in (1, 2, 4, 6):
        p, t = pred[..., ::s, ::s], target[..., ::s, ::s]
        mask = (t > 0).to(p.dtype)
        n = mask.sum()
        if n == 0:
            continue
        d = (torch.log(p + EPS) - torch.log(t + EPS)) * mask
        v = (d[..., :-2, :] - d[..., 2:, :]).abs() * mask[..., :-2, :] * mask[..., 2:, :]
        h = (d[..., :, :-2] - d[..., :, 2:]).abs() * mask[..., :, :-2] * mask[..., :, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


def depth_loss(pred: torch.Tensor, target: torch.Tensor, warm_up: bool = False,
               grad_weight: float = 0.5) -> torch.Tensor:
    """SigLoss + 0.5 GradientLoss after bilinearly resizing ``pred`` to the target size."""
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return sig_loss(pred, target, warm_up) + grad_weight * gradient_loss(pred, target)


def _lr_factor(it: int, total: int, warmup: int, warmup_ratio: float = 1e-3,
               min_ratio: float = 1e-8) -> float:
    """mmcv cosine annealing over all iterations, linearly warmed up from ``warmup_ratio``."""
    regular = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * it / max(total, 1)))
    if it < warmup:
        return regular * (1 - (1 - it / warmup) * (1 - warmup_ratio))
    return regular


def train_depth(head: DepthLinearHead, feature_fn, batches: Iterable, iters: int, lr: float = 1e-4,
                weight_decay: float = 0.01, warmup_iters: int = 12800, sig_warmup: int = 100,
                grad_clip: float = 35.0) -> list[float]:
    """Train on (images, depth) batches: DINOv2's AdamW, warm-up + cosine, clip 35; loss curve."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    head.train()
    while len(losses) < iters:
        n_before = len(losses)
        for images, target in batches:
            it = len(losses)
            if it >= iters:
                break
            factor = _lr_factor(it, iters, warmup_iters)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            pred = head(feature_fn(images))
            loss = depth_loss(pred, target.view(target.shape[0], 1, *target.shape[-2:]),
                              warm_up=it < sig_warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), grad_clip)
            opt.step()
            losses.append(loss.item())
        if len(losses) == n_before:
            raise ValueError("batches is empty")
    return losses


def rmse(pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> float:
    """RMSE over valid pixels, computed per image then averaged (the depth toolbox's convention).

    Inputs are (B, H, W) or (B, 1, H, W); images with no valid pixel are skipped.
    """
    if pred.shape != target.shape or valid_mask.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and valid_mask "
                         f"{tuple(valid_mask.shape)} must match")
    b = pred.shape[0]
    err = ((pred.double() - target.double()) ** 2 * valid_mask).reshape(b, -1).sum(1)
    n = valid_mask.reshape(b, -1).sum(1).double()
    keep = n > 0
    if not keep.any():
        raise ValueError("valid_mask selects no pixel")
    return float(torch.sqrt(err[keep] / n[keep]).mean())
