"""One-head trainers written the plain way (encoder called on images each step, one head, one
optimizer): the references that the production trainers, which train several heads at once on
cached or streamed frozen tokens (``train_depth_heads``, ``train_seg_heads``), must equal."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from webssl_repro.evaluate.depth import SAMPLES_PER_GPU, DepthLinearHead, _schedule, depth_loss
from webssl_repro.evaluate.segmentation import IGNORE_INDEX, LinearSegHead, _lr_factor, seg_logits


def _cycled(batches: Iterable, iters: int):
    """``batches`` repeated until ``iters`` items (a list cycles; a generator is read once)."""
    done = 0
    while done < iters:
        before = done
        for batch in batches:
            if done >= iters:
                return
            yield done, batch
            done += 1
        if done == before:
            raise ValueError("batches is empty")


def train_depth(head: DepthLinearHead, feature_fn, batches: Iterable, iters: int, lr: float = 1e-4,
                weight_decay: float = 0.01, warmup_iters: int = 12800, sig_warmup: int = 100,
                grad_clip: float = 35.0, grad_weight: float = 0.0,
                samples_per_gpu: int | None = SAMPLES_PER_GPU) -> list[float]:
    """DINOv2's NYUd recipe on (images, depth) batches: AdamW with one-cycle beta1, warm-up +
    cosine lr, gradient clipping, the loss per ``samples_per_gpu`` images."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    head.train()
    for it, (images, target) in _cycled(batches, iters):
        _schedule(opt, lr, it, iters, warmup_iters)
        pred = head(feature_fn(images))
        loss = depth_loss(pred, target.view(target.shape[0], 1, *target.shape[-2:]),
                          warm_up=it < sig_warmup, grad_weight=grad_weight, samples_per_gpu=samples_per_gpu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


def train_segmentation(head: LinearSegHead, feature_fn, batches: Iterable, iters: int, lr: float = 1e-3,
                       weight_decay: float = 1e-4, warmup: int = 1500, warmup_ratio: float = 1e-6) -> list[float]:
    """DINOv2's ADE20K linear recipe on (images, masks) batches: AdamW, mmseg poly lr with linear
    warm-up, cross-entropy of logits upsampled to the mask, averaged over every pixel (mmseg 0.x)."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    losses: list[float] = []
    head.train()
    for it, (images, masks) in _cycled(batches, iters):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(it, iters, warmup, warmup_ratio)
        logits = seg_logits(head, feature_fn, images, out_size=masks.shape[-2:])
        loss = F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX, reduction="none").mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
