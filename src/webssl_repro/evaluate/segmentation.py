"""DINOv2 linear semantic segmentation ("lin." and "+ms") on a frozen encoder.

Head = DINOv2's ``BNHead``: (bilinearly resized, concatenated) patch-token maps -> BatchNorm ->
1x1 conv -> logits at token resolution, bilinearly upsampled to the mask size. "lin." reads the
last block only; "+ms" concatenates the last 4 blocks and adds multi-scale + flip test-time
augmentation. Optimisation follows the official mmseg config (AdamW 1e-3, wd 1e-4, linear
warm-up then poly-1.0 decay, CE with ignore 255). At test, mmseg's ``slide`` mode: the image
(shorter side at the crop size) is covered by crop-sized windows at a 2/3 stride, each window's
logits are averaged where windows overlap, and the result is resized to the label map.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import BlockTokens, chunk_size, interp_matrix
from .progress import Checkpoint, head_state, resume_heads

IGNORE_INDEX = 255
#: DINOv2's ADE20K "+ms" test ratios: each scales the test image (and its shorter side), over
#: which the windows slide (or which is passed whole), with flips. DINOv2's "+ms" config works
#: at 640 px (short side and windows): ``evaluate.classic.segmentation.ms_img_size``.
MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)
#: mmseg's ADE20K slide stride over its crop, truncated: 341 of 512, 426 of 640
SLIDE_STRIDE = 2 / 3

FeatureFn = Callable[[torch.Tensor], BlockTokens]

__all__ = ["LinearSegHead", "seg_logits", "slide_logits", "window_starts", "eval_logits", "multiscale_probs",
           "train_seg_heads", "predict", "mean_iou", "IoU", "MS_SCALES", "SLIDE_STRIDE",
           "IGNORE_INDEX"]


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

    def forward_concat(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` on maps already concatenated along channels, (B, L*D, h, w) in
        block order (last block last), all on one grid; the last ``n_layers`` blocks are used."""
        return self.conv(self.bn(x[:, x.shape[1] - self.bn.num_features:]))


def seg_logits(head: LinearSegHead, feature_fn: FeatureFn, images: torch.Tensor,
               out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Logits (B, C, H, W) at ``out_size`` (default: the image size), bilinear upsampling."""
    logits = head(feature_fn(images).maps())
    size = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Where mmseg's ``slide_inference`` puts its windows along one side: every ``stride``,
    the last one moved back to end at the edge (one window if the side is not longer)."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop {crop} and stride {stride} must be >= 1")
    n = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, length - crop), 0) for i in range(n)]


def slide_logits(head: LinearSegHead, feature_fn: FeatureFn, images: torch.Tensor,
                 crop: Sequence[int], stride: Sequence[int], windows_per_pass: int = 8) -> torch.Tensor:
    """Logits (B, C, H, W) at the image size: each crop-sized window's logits (upsampled to the
    window), averaged over the windows covering a pixel. A pass holds at most
    ``windows_per_pass`` windows of each image."""
    H, W = images.shape[-2:]
    ch, cw = min(int(crop[0]), H), min(int(crop[1]), W)
    corners = [(y, x) for y in window_starts(H, ch, int(stride[0])) for x in window_starts(W, cw, int(stride[1]))]
    total = count = None
    for k in range(0, len(corners), windows_per_pass):
        part = corners[k:k + windows_per_pass]
        crops = torch.cat([images[..., y:y + ch, x:x + cw] for y, x in part])
        for (y, x), logits in zip(part, seg_logits(head, feature_fn, crops).split(images.shape[0])):
            if total is None:
                total = logits.new_zeros((*logits.shape[:2], H, W))
                count = logits.new_zeros((1, 1, H, W))
            total[..., y:y + ch, x:x + cw] += logits
            count[..., y:y + ch, x:x + cw] += 1
    return total / count


def eval_logits(head: LinearSegHead, feature_fn: FeatureFn, images: torch.Tensor,
                out_size: Sequence[int], slide: Optional[tuple[Sequence[int], Sequence[int]]] = None) -> torch.Tensor:
    """Logits at ``out_size`` from the whole image, or from sliding ``slide = (crop, stride)``."""
    if slide is None:
        return seg_logits(head, feature_fn, images, out_size=out_size)
    logits = slide_logits(head, feature_fn, images, *slide)
    size = tuple(out_size)
    return logits if logits.shape[-2:] == size else F.interpolate(logits, size=size, mode="bilinear",
                                                                  align_corners=False)


Images = Union[torch.Tensor, Sequence[torch.Tensor]]


@torch.no_grad()
def multiscale_probs(head: LinearSegHead, feature_fn: FeatureFn, images: Images,
                     scales: Sequence[float] = MS_SCALES, flip: bool = True,
                     out_size: Optional[Sequence[int]] = None,
                     slide: Optional[tuple[Sequence[int], Sequence[int]]] = None) -> torch.Tensor:
    """"+ms" test-time augmentation: mean class probabilities over scales (and h-flips).

    ``images``: a batch, resized here to each scale; or a pyramid, the batch at each of
    ``scales`` resized from the original (mmseg's ``MultiScaleFlipAug``; ``ScalePyramid``).
    mmseg's ``aug_test`` averages softmax outputs, not raw logits, so we do the same; each
    scale's output is resized to ``out_size`` (default: the batch's size, or the pyramid's
    first level's) before averaging. Whole images: an upscaled pass runs on fewer
    images at once, so that no pass holds more pixels than that size (at 3x a 512-px image is
    12,100 tokens); sliding windows are crop-sized at every scale.
    """
    pyramid = None if isinstance(images, torch.Tensor) else images
    if pyramid is not None:
        if len(pyramid) != len(scales):
            raise ValueError(f"a pyramid of {len(pyramid)} levels for {len(scales)} scales")
        made_at = tuple(getattr(pyramid, "scales", scales))  # a ScalePyramid knows its scales
        if made_at != tuple(scales):
            raise ValueError(f"a pyramid made at scales {made_at} for scales {tuple(scales)}")
    base = images if pyramid is None else pyramid[0]  # a level may be made when read: once each
    B, (H, W) = base.shape[0], base.shape[-2:]
    out = tuple(out_size) if out_size is not None else (H, W)
    total, count = None, 0
    for level, s in enumerate(scales):
        source = base if pyramid is None or level == 0 else pyramid[level]
        size = (max(1, round(H * s)), max(1, round(W * s))) if pyramid is None else tuple(source.shape[-2:])
        chunk = B if slide is not None else max(1, (B * H * W) // (size[0] * size[1]))
        flips = (False, True) if flip else (False,)
        parts: dict[bool, list[torch.Tensor]] = {f: [] for f in flips}
        for xb in source.split(chunk):
            x = xb if tuple(xb.shape[-2:]) == size else F.interpolate(xb, size=size, mode="bilinear",
                                                                     align_corners=False)
            for flipped in flips:
                p = eval_logits(head, feature_fn, x.flip(-1) if flipped else x, out, slide).softmax(dim=1)
                parts[flipped].append(p.flip(-1) if flipped else p)
        for flipped in flips:
            p = torch.cat(parts[flipped])
            total = p if total is None else total + p
            count += 1
    return total / count


def predict(head: LinearSegHead, feature_fn: FeatureFn, images: Images,
            multiscale: bool = False, scales: Sequence[float] = MS_SCALES,
            out_size: Optional[Sequence[int]] = None,
            slide: Optional[tuple[Sequence[int], Sequence[int]]] = None) -> torch.Tensor:
    """Per-pixel class ids (B, *out_size) (default: the image size); ``multiscale`` switches
    on the "+ms" TTA (``images`` a batch or its pyramid over ``scales``), ``slide = (crop,
    stride)`` mmseg's sliding-window test."""
    head.eval()
    if multiscale:  # multiscale_probs runs under no_grad
        return multiscale_probs(head, feature_fn, images, scales, out_size=out_size, slide=slide).argmax(dim=1)
    if not isinstance(images, torch.Tensor):
        raise TypeError("a single-scale prediction takes one batch, not a pyramid")
    out = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
    with torch.no_grad():
        return eval_logits(head, feature_fn, images, out, slide).argmax(dim=1)


def _lr_factor(it: int, total: int, warmup: int, warmup_ratio: float) -> float:
    """mmseg poly(power 1, min 0) with linear warm-up from ``warmup_ratio``."""
    poly = 1.0 - it / max(total, 1)
    if it < warmup:
        k = (1 - it / warmup) * (1 - warmup_ratio)
        return poly * (1 - k)
    return poly


class _UpsampledCE(torch.autograd.Function):
    """Per-image summed CE of bilinearly upsampled logits, built chunk by chunk.

    Same maths as ``F.cross_entropy(F.interpolate(z, size), y, reduction="none").sum((1, 2))``:
    the (B, C, H, W) upsampled logits are made by two matmuls per chunk of images (a chunk
    stays in cache) and rebuilt in the backward pass, whose gradient is
    U^T (softmax(u) - onehot(y)) on labelled pixels.
    """

    @staticmethod
    def forward(ctx, z, y, uh, uw, ignore_index, chunk):
        out = []
        for zc, yc in zip(z.split(chunk), y.split(chunk)):
            u = torch.matmul(uh, torch.matmul(zc, uw.T))                  # (b, C, H, W)
            ce = F.cross_entropy(u, yc, ignore_index=ignore_index, reduction="none")
            out.append(ce.sum(dim=(1, 2)))
        ctx.save_for_backward(z, y, uh, uw)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        z, y, uh, uw = ctx.saved_tensors
        out = []
        for zc, yc, gc in zip(z.split(ctx.chunk), y.split(ctx.chunk), grad.split(ctx.chunk)):
            p = torch.matmul(uh, torch.matmul(zc, uw.T)).softmax(dim=1)
            valid = yc != ctx.ignore_index
            p.scatter_add_(1, torch.where(valid, yc, 0).unsqueeze(1), p.new_full((1,), -1.0).expand_as(yc).unsqueeze(1))
            p.mul_((valid.to(p.dtype) * gc.view(-1, 1, 1)).unsqueeze(1))
            out.append(torch.matmul(torch.matmul(uh.T, p), uw))           # (b, C, h, w)
        return torch.cat(out), None, None, None, None, None


def upsampled_ce(logits: torch.Tensor, target: torch.Tensor,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-image summed CE of ``logits`` (B, C, h, w) bilinearly upsampled to ``target``'s
    (B, H, W) size, without keeping the upsampled logits (see ``_UpsampledCE``)."""
    (_, C, h, w), (H, W) = logits.shape, target.shape[-2:]
    uh, uw = interp_matrix(h, H).to(logits), interp_matrix(w, W).to(logits)
    return _UpsampledCE.apply(logits, target.long(), uh, uw, ignore_index, chunk_size(C * H * W))


def train_seg_heads(heads: Sequence[LinearSegHead], batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                    iters: int, lr: float = 1e-3, weight_decay: float = 1e-4, warmup: int = 1500,
                    warmup_ratio: float = 1e-6, state: Optional[Mapping[str, Any]] = None,
                    checkpoint: Optional[Checkpoint] = None) -> list[list[float]]:
    """Trains several ADE20K heads at once on frozen maps: DINOv2's recipe (AdamW, mmseg poly lr
    with linear warm-up, CE averaged over every pixel, ignored ones as 0).

    ``batches`` yields (maps, masks): maps (B, L*D, h, w) are a batch's frozen patch maps
    concatenated along channels in block order (from a token cache or the encoder). Every head
    sees the same batches; one AdamW over all heads is per-parameter, so it is exactly one AdamW
    per head. The heads' logits are upsampled in one call, and the loss is the sum of the heads'
    mean CEs (``upsampled_ce``), whose gradient for each head is that head's own. Returns each
    head's loss curve. ``state`` (``head_state``) resumes a stopped training, ``batches``
    then starting at its iteration; ``checkpoint(done, make_state)`` follows each iteration.
    """
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    start, losses = resume_heads(heads, opt, state)
    for h in heads:
        h.train()
    for it in range(start, iters):
        xb, y = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(it, iters, warmup, warmup_ratio)
        logits = torch.cat([h.forward_concat(xb) for h in heads])
        per_image = upsampled_ce(logits, y.repeat(len(heads), 1, 1)).view(len(heads), -1)
        per_head = per_image.sum(1) / y.numel()  # mmseg 0.x: mean over all pixels, ignored ones as 0
        opt.zero_grad(set_to_none=True)
        per_head.sum().backward()
        opt.step()
        for curve, value in zip(losses, per_head.tolist()):
            curve.append(value)
        if checkpoint is not None:
            checkpoint(it + 1, lambda: head_state(it + 1, heads, opt, losses))
    return losses


class IoU:
    """mmseg's mIoU accumulated batch by batch: per-class intersection and areas over every
    pixel of the set, so a val set's predictions are never held at once."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.inter = self.area_p = self.area_t = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        n = self.num_classes
        keep = target != self.ignore_index
        p, t = pred[keep].long(), target[keep].long()
        if ((t < 0) | (t >= n)).any():
            raise ValueError("target has labels outside [0, num_classes) other than ignore_index")
        if ((p < 0) | (p >= n)).any():
            raise ValueError("pred has labels outside [0, num_classes)")
        self.inter = self.inter + torch.bincount(t[p == t], minlength=n)[:n].double().cpu()
        self.area_p = self.area_p + torch.bincount(p, minlength=n)[:n].double().cpu()
        self.area_t = self.area_t + torch.bincount(t, minlength=n).double().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"inter": self.inter, "area_p": self.area_p, "area_t": self.area_t}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inter, self.area_p, self.area_t = (state[k].double() for k in ("inter", "area_p", "area_t"))

    def mean(self) -> float:
        """Mean over classes with a union; classes absent from both are skipped, as in mmseg."""
        union = self.area_p + self.area_t - self.inter
        iou = self.inter / union
        iou[union == 0] = float("nan")
        if torch.isnan(iou).all():
            raise ValueError("mIoU: no pixel is labelled with a class (all are ignore_index) or predicted")
        return float(torch.nanmean(iou))


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
             ignore_index: int = IGNORE_INDEX) -> float:
    """mmseg mIoU: IoU per class accumulated over all pixels, mean over classes with a union.

    Pixels with ``target == ignore_index`` are dropped; classes absent from both prediction and
    target (union 0) are NaN and skipped (``nanmean``), as in mmseg.
    """
    iou = IoU(num_classes, ignore_index)
    iou.add(pred, target)
    return iou.mean()
