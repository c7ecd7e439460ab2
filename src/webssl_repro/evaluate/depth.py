"""DINOv2 linear monocular depth ("lin.1" / "lin.4", NYUd protocol) on a frozen encoder.

Head (DINOv2 ``dinov2/hub/depth/decode_heads.py``, depth ``BNHead``): for each chosen block,
concat the patch map with the CLS token broadcast over space (2D channels), upsample x4
bilinearly, concat the blocks, 1x1 conv to 256 bins; bins are uniform on [min, max] depth
("UD"), and "linear" normalisation turns logits into weights ``relu(l) + 0.1`` normalised over
bins; depth = expected bin centre. Features are the raw residual stream (``norm=False``), as
DINOv2's depther.

Loss, as DINOv2's NYUd runs compute it: SigLoss (scale-invariant log, with warm-up) on each
GPU's 2 images (``samples_per_gpu``), averaged as DDP averages their gradients. Its config
adds 0.5 x GradientLoss, whose code slices the batch and channel dimensions of the (2, 1, H, W)
maps instead of the spatial ones and so contributes exactly zero: ``grad_weight`` is 0 by
default, and 0.5 applies the MegaDepth loss it meant. AdamW's beta1 follows mmcv's one-cycle
momentum schedule (``momentum_config=dict(policy='OneCycle')``: 0.95 -> 0.85 over the first 30 %
of the iterations, back to 0.95 by the end, cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import BlockTokens, chunk_size, interp_matrix
from .progress import Checkpoint, head_state, resume_heads

__all__ = ["lin4_blocks", "DepthLinearHead", "bins_to_depth", "sig_loss", "gradient_loss",
           "depth_loss", "onecycle_beta1", "train_depth_heads", "rmse", "RMSE", "eigen_crop",
           "EIGEN_CROP", "SAMPLES_PER_GPU", "DepthRange"]

EPS = 1e-3  # log offset of DINOv2's SigLoss / GradientLoss
MIN_DEPTH = 1e-3  # the first bin (DINOv2's depther); pixels at or below it are not scored


@dataclass(frozen=True)
class DepthRange:
    """The depth bins' (``low``, ``high``) and the pixels a depth score counts: those strictly
    inside, DINOv2's NYUd eval mask. Where the top is the deepest training pixel (mini), the
    pixels at it are mini-web's far wall and sky (20 m, a third of them), which the score leaves
    out as NYUd's frames leave out what lies past the sensor's range; the probe's SigLoss still
    trains on them (DINOv2's mask there is only ``target > 0``). Scoring them would make the
    mini RMSE mostly the sky's edge: 8.2 m for the best single depth instead of 3.1 m."""

    low: float
    high: float

    def scored(self, d: torch.Tensor) -> torch.Tensor:
        return (d > self.low) & (d < self.high)

    def __str__(self) -> str:
        return f"({self.low:g}, {self.high:g})"


#: images per GPU of DINOv2's NYUd configs (samples_per_gpu), over which each SigLoss is taken
SAMPLES_PER_GPU = 2
#: DINOv2's lin.4 blocks of the depths it evaluates (``hub/depthers.py``): ViT-S/B, ViT-L, ViT-g
DINOV2_LIN4 = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}
#: Eigen et al.'s NYUd evaluation crop (rows 45:471, columns 41:601 of the 480 x 640 frames,
#: where the Kinect's depth is valid), as the depth toolbox behind DINOv2 applies it
EIGEN_CROP = {"frame": (480, 640), "rows": (45, 471), "cols": (41, 601)}


def eigen_crop(shape: Sequence[int]) -> torch.Tensor:
    """(H, W) boolean mask of the Eigen crop; NYUd's frames only (another size has no such crop)."""
    H, W = (int(v) for v in shape[-2:])
    if (H, W) != EIGEN_CROP["frame"]:
        raise ValueError(f"the Eigen crop is defined on NYUd's {EIGEN_CROP['frame']} frames, not {(H, W)}: "
                         "set evaluate.classic.depth.eigen_crop to false for this set")
    mask = torch.zeros(H, W, dtype=torch.bool)
    (r0, r1), (c0, c1) = EIGEN_CROP["rows"], EIGEN_CROP["cols"]
    mask[r0:r1, c0:c1] = True
    return mask


def lin4_blocks(depth: int) -> list[int]:
    """0-based blocks for lin.4: DINOv2's own choice at the depths it evaluates (12, 24, 40:
    ``DINOV2_LIN4``), else ``depth * m / 4 - 1`` for m = 1..4, the rule behind its 12 and 40.

    The paper does not say which 4 blocks it uses for the 2B-7B models: the 24-block 2B takes
    ViT-L's [4, 11, 17, 23], the 26- and 32-block 3B-7B the rule's evenly spaced blocks.
    """
    if depth < 4:
        raise ValueError(f"lin.4 needs at least 4 blocks; got depth={depth}")
    return list(DINOV2_LIN4.get(depth, [depth * m // 4 - 1 for m in range(1, 5)]))


def bins_to_depth(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, 1, H, W) expected depth with DINOv2's "linear" normalisation."""
    # sum_k (r_k + 0.1) b_k / sum_k (r_k + 0.1) with r = relu(logits), without materialising w.
    r = torch.relu(logits)
    num = torch.einsum("bkhw,k->bhw", r, bins.to(r.dtype)) + 0.1 * bins.sum()
    den = r.sum(dim=1) + 0.1 * bins.numel()
    return (num / den).unsqueeze(1)


class DepthLinearHead(nn.Module):
    """Linear classifier over uniform depth bins on [CLS, patch] features of ``n_layers`` blocks.

    ``n_layers=1`` is lin.1 (last block), ``n_layers=4`` is lin.4 (blocks from ``lin4_blocks``,
    chosen by the feature function). No BatchNorm: DINOv2's depth BNHead never applies one.
    The conv keeps PyTorch's default initialisation, as DINOv2's (no init_cfg on it).
    """

    def __init__(self, in_dim: int, n_layers: int = 1, n_bins: int = 256, min_depth: float = MIN_DEPTH,
                 max_depth: float = 10.0, upsample: int = 4):
        super().__init__()
        self.n_layers, self.upsample = n_layers, upsample
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv = nn.Conv2d(2 * in_dim * n_layers, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def flat_inputs(self, tokens: BlockTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches (B, P, n*D), cls (B, n*D)) of the last ``n_layers`` blocks, block-major."""
        patches, cls = tokens.patches[-self.n_layers:], tokens.cls[-self.n_layers:]
        if patches.shape[0] != self.n_layers:
            raise ValueError(f"head expects {self.n_layers} blocks; tokens has {patches.shape[0]}")
        return torch.cat(list(patches), dim=-1), torch.cat(list(cls), dim=-1)

    def token_logits(self, patches: torch.Tensor, cls: torch.Tensor,
                     grid: tuple[int, int]) -> torch.Tensor:
        """Bin logits on the token grid, channel-last (B, h, w, K), before the x``upsample``.

        The conv's input channels are, per block, [patch map (D), CLS broadcast (D)]. A 1x1
        conv is affine per pixel and bilinear interpolation is a per-pixel convex combination
        (weights sum to 1), so conv(upsample(x)) = upsample(conv(x)) exactly: the conv runs on
        the h*w tokens instead of the 16*h*w upsampled pixels, and the CLS half of the conv
        (constant over space) is one (B, K) term.
        """
        n, K = self.n_layers, self.conv.out_channels
        D = patches.shape[-1] // n
        w = self.conv.weight.view(K, n, 2, D)
        w_patch, w_cls = w[:, :, 0].reshape(K, n * D), w[:, :, 1].reshape(K, n * D)
        per_image = F.linear(cls, w_cls, self.conv.bias)                  # (B, K)
        logits = F.linear(patches, w_patch) + per_image[:, None, :]       # (B, P, K)
        return logits.view(logits.shape[0], grid[0], grid[1], K)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Token-grid logits (B, h, w, K) -> depth (B, 1, upsample*h, upsample*w)."""
        return upsampled_bins_to_depth(logits, self.bins, self.upsample).unsqueeze(1)

    def forward(self, tokens: BlockTokens) -> torch.Tensor:
        """Depth (B, 1, upsample*h, upsample*w) from the last ``n_layers`` blocks in ``tokens``."""
        patches, cls = self.flat_inputs(tokens)
        return self.from_logits(self.token_logits(patches, cls, tokens.grid))


def _up_cl(z: torch.Tensor, uh: torch.Tensor, uw: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of channel-last maps (B, h, w, K) -> (B, H, W, K) by two matmuls."""
    B, h, _, K = z.shape
    t = torch.matmul(uw, z)                                               # (B, h, W, K)
    return torch.matmul(uh, t.reshape(B, h, -1)).view(B, uh.shape[0], uw.shape[0], K)


def _up_cl_adjoint(g: torch.Tensor, uh: torch.Tensor, uw: torch.Tensor) -> torch.Tensor:
    B, H, W, K = g.shape
    t = torch.matmul(uh.T, g.reshape(B, H, W * K)).view(B, uh.shape[1], W, K)
    return torch.matmul(uw.T, t)


class _UpsampledBins(torch.autograd.Function):
    """``bins_to_depth(upsample(logits))`` without keeping the upsampled logits.

    The (B, K, 4h, 4w) upsampled logits are the largest tensor of the depth probe by far; it
    is built chunk by chunk (a chunk stays in cache), reduced to depth at once, and rebuilt
    in the backward pass. Same maths as autograd through ``F.interpolate`` + ``bins_to_depth``:
    d = (sum_k b_k r_k + 0.1 sum b) / (sum_k r_k + 0.1 K), r = relu(u), so
    dd/du_k = 1[u_k > 0] (b_k - d) / den.
    """

    @staticmethod
    def forward(ctx, z, uh, uw, bins, chunk):
        c = torch.stack([bins, torch.ones_like(bins)])                    # (2, K)
        ds, dens = [], []
        for zc in z.split(chunk):
            nd = torch.relu_(_up_cl(zc, uh, uw)) @ c.T                    # (b, H, W, 2)
            den = nd[..., 1] + 0.1 * bins.numel()
            ds.append((nd[..., 0] + 0.1 * bins.sum()) / den)
            dens.append(den)
        d, den = torch.cat(ds), torch.cat(dens)
        ctx.save_for_backward(z, uh, uw, c, den, d)
        ctx.chunk = chunk
        return d

    @staticmethod
    def backward(ctx, grad):
        z, uh, uw, c, den, d = ctx.saved_tensors
        s = grad / den
        a = torch.stack([s, -s * d], dim=-1)                              # (B, H, W, 2)
        out = []
        for zc, ac in zip(z.split(ctx.chunk), a.split(ctx.chunk)):
            g = torch.ops.aten.threshold_backward(ac @ c, _up_cl(zc, uh, uw), 0.0)
            out.append(_up_cl_adjoint(g, uh, uw))
        return torch.cat(out), None, None, None, None


def upsampled_bins_to_depth(logits: torch.Tensor, bins: torch.Tensor, upsample: int) -> torch.Tensor:
    """(B, h, w, K) token-grid logits -> (B, upsample*h, upsample*w) depth: bilinear x``upsample``
    (``F.interpolate``, ``align_corners=False``) then ``bins_to_depth``, computed in chunks."""
    B, h, w, K = logits.shape
    uh, uw = interp_matrix(h, upsample * h), interp_matrix(w, upsample * w)
    chunk = chunk_size(K * upsample * h * upsample * w)
    return _UpsampledBins.apply(logits, uh.to(logits), uw.to(logits), bins.to(logits), chunk)


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
    (B, 1, H, W) tensor, i.e. over batch/channel rather than space: at its 2 images per GPU
    every slice it differences is empty and the loss is zero (hence ``grad_weight`` 0 by
    default). This is the intended spatial version, on each (H, W) map at strides 1, 2, 4, 6,
    normalised by the valid-pixel count of each scale.
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


def depth_loss(pred: torch.Tensor, target: torch.Tensor, warm_up: bool = False, grad_weight: float = 0.0,
               samples_per_gpu: int | None = SAMPLES_PER_GPU) -> torch.Tensor:
    """SigLoss (+ ``grad_weight`` x GradientLoss) after bilinearly resizing ``pred`` to the
    target size, on each group of ``samples_per_gpu`` images and averaged (None: one group)."""
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    n = samples_per_gpu or pred.shape[0]
    if pred.shape[0] % n:
        raise ValueError(f"a batch of {pred.shape[0]} images does not split into groups of samples_per_gpu={n}")
    losses = [sig_loss(p, t, warm_up) + (grad_weight * gradient_loss(p, t) if grad_weight else 0.0)
              for p, t in zip(pred.split(n), target.split(n))]
    return torch.stack(losses).mean()


def onecycle_beta1(it: int, total: int, low: float = 0.85, high: float = 0.95, pct_start: float = 0.3) -> float:
    """mmcv's ``OneCycleMomentumUpdaterHook`` (two phases, cosine) at 0-based iteration ``it``:
    ``high`` -> ``low`` until iteration ``pct_start * total - 1``, then back to ``high`` at ``total - 1``."""
    turn = pct_start * total - 1
    start, end, frac = (high, low, it / turn) if it <= turn else (low, high, (it - turn) / (total - 1 - turn))
    return end + 0.5 * (start - end) * (math.cos(math.pi * frac) + 1)


def _schedule(opt: torch.optim.Optimizer, lr: float, it: int, iters: int, warmup_iters: int) -> None:
    """This iteration's lr (warm-up + cosine) and beta1 (one-cycle), as DINOv2's NYUd runs set them."""
    factor, beta1 = _lr_factor(it, iters, warmup_iters), onecycle_beta1(it, iters)
    for group in opt.param_groups:
        group["lr"] = lr * factor
        group["betas"] = (beta1, group["betas"][1])


def _lr_factor(it: int, total: int, warmup: int, warmup_ratio: float = 1e-3,
               min_ratio: float = 1e-8) -> float:
    """mmcv cosine annealing over all iterations, linearly warmed up from ``warmup_ratio``."""
    regular = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * it / max(total, 1)))
    if it < warmup:
        return regular * (1 - (1 - it / warmup) * (1 - warmup_ratio))
    return regular


def train_depth_heads(heads: Sequence[DepthLinearHead],
                      batches: Iterator[tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], tuple[int, int], torch.Tensor]],
                      iters: int, lr: float = 1e-4, weight_decay: float = 0.01, warmup_iters: int = 12800,
                      sig_warmup: int = 100, grad_clip: float = 35.0, grad_weight: float = 0.0,
                      samples_per_gpu: int | None = SAMPLES_PER_GPU, state: Optional[Mapping[str, Any]] = None,
                      checkpoint: Optional[Checkpoint] = None) -> list[list[float]]:
    """Trains several NYUd heads at once on frozen tokens: DINOv2's recipe (AdamW with one-cycle
    beta1, warm-up + cosine lr, gradient clipping 35, the loss per ``samples_per_gpu`` images).

    ``batches`` yields (inputs, grid, depth (B, 1, H, W)) with ``inputs[i]`` = (patches
    (B, P, n_i*D), cls (B, n_i*D)) for head i (``DepthLinearHead.flat_inputs``), from a token
    cache or the encoder. All heads see the same batches; their logits are upsampled in one pass.
    One AdamW over all heads is per-parameter, i.e. one AdamW per head, and gradients are
    clipped per head, as separate trainings would. Returns each head's loss curve. ``state``
    and ``checkpoint`` resume and save as in ``segmentation.train_seg_heads``.
    """
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start, losses = resume_heads(heads, opt, state)
    for h in heads:
        h.train()
    shared = all(h.upsample == heads[0].upsample and torch.equal(h.bins, heads[0].bins) for h in heads)
    for it in range(start, iters):
        inputs, grid, target = next(batches)
        target = target.view(target.shape[0], 1, *target.shape[-2:])
        _schedule(opt, lr, it, iters, warmup_iters)
        logits = torch.cat([h.token_logits(p, c, grid) for h, (p, c) in zip(heads, inputs)])
        if shared:  # one chunked pass over all heads' logits
            preds = heads[0].from_logits(logits).chunk(len(heads))
        else:
            preds = [h.from_logits(lg) for h, lg in zip(heads, logits.chunk(len(heads)))]
        per_head = [depth_loss(pred, target, warm_up=it < sig_warmup, grad_weight=grad_weight,
                               samples_per_gpu=samples_per_gpu) for pred in preds]
        opt.zero_grad(set_to_none=True)
        torch.stack(per_head).sum().backward()
        for h in heads:
            nn.utils.clip_grad_norm_(h.parameters(), grad_clip)
        opt.step()
        for curve, value in zip(losses, torch.stack(per_head).tolist()):
            curve.append(value)
        if checkpoint is not None:
            checkpoint(it + 1, lambda: head_state(it + 1, heads, opt, losses))
    return losses


class RMSE:
    """``rmse`` accumulated batch by batch: per-image RMSEs, averaged at the end."""

    def __init__(self) -> None:
        self.per_image: list[torch.Tensor] = []

    def add(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> None:
        if pred.shape != target.shape or valid_mask.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and valid_mask "
                             f"{tuple(valid_mask.shape)} must match")
        b = pred.shape[0]
        # selected, not multiplied by the mask: a pixel without depth (NaN or inf, outside the mask) stays out
        err = torch.where(valid_mask.bool(), (pred.double() - target.double()) ** 2, 0.0).reshape(b, -1).sum(1)
        n = valid_mask.reshape(b, -1).sum(1).double()
        keep = n > 0
        self.per_image.append(torch.sqrt(err[keep] / n[keep]).cpu())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"per_image": torch.cat(self.per_image) if self.per_image else torch.empty(0, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.per_image = [state["per_image"].double()]

    def value(self) -> float:
        values = torch.cat(self.per_image) if self.per_image else torch.empty(0)
        if not len(values):
            raise ValueError("valid_mask selects no pixel")
        if not torch.isfinite(values).all():  # a NaN prediction: said, not averaged into a NaN score
            raise ValueError(f"RMSE: {int((~torch.isfinite(values)).sum())} of {len(values)} images' predictions "
                             "are not finite")
        return float(values.mean())


def rmse(pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> float:
    """RMSE over valid pixels, computed per image then averaged (the depth toolbox's convention).

    Inputs are (B, H, W) or (B, 1, H, W); images with no valid pixel are skipped.
    """
    acc = RMSE()
    acc.add(pred, target, valid_mask)
    return acc.value()
