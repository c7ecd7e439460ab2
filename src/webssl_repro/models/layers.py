"""Small adapters that make timm's ViT building blocks match the released Web-SSL towers.

timm's ``Block`` derives the FFN width as ``int(dim * mlp_ratio)``, which cannot express
DINOv2's rounded SwiGLU hidden size exactly for every width (float truncation), and timm's
stochastic depth grows linearly with depth whereas DINOv2 uses one uniform rate. These
helpers fix both without re-implementing the layers themselves.
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.layers import DropPath, GluMlp, LayerScale, Mlp
from torch import nn


def fixed_hidden_mlp(kind: str, hidden: int) -> Callable[..., nn.Module]:
    """An ``mlp_layer`` factory for timm's ``Block`` that ignores its float-derived width.

    ``kind="swiglu"`` is timm's packed GLU (``fc1: D→2h``, ``silu(x1)·x2``, ``fc2: h→D``), the
    same layout as DINOv2's ``w12``/``w3`` so released weights load by renaming only;
    ``kind="gelu"`` is the plain MAE/ViT MLP with hidden ``h``.
    """
    if kind == "swiglu":
        layer, fixed = GluMlp, dict(hidden_features=2 * hidden, act_layer=nn.SiLU, gate_last=False)
    elif kind == "gelu":
        layer, fixed = Mlp, dict(hidden_features=hidden, act_layer=nn.GELU)
    else:
        raise ValueError(f"unknown FFN kind {kind!r}; expected 'swiglu' or 'gelu'")

    def make(in_features: int, hidden_features: int | None = None, **kwargs) -> nn.Module:
        kwargs.update(fixed)
        return layer(in_features, **kwargs)

    return make


def set_uniform_drop_path(blocks: nn.Sequential, rate: float) -> None:
    """Give every residual branch the same stochastic-depth rate (DINOv2 ``drop_path_uniform``).

    timm's ``DropPath`` keeps each sample with probability 1 - rate and rescales it. DINOv2,
    above rate 0.1, computes the branch on a random subset of int(B·(1 - rate)) samples and
    rescales by B / subset: the same expectation and a slightly lower variance, and it is
    a speed-up on GPU. The per-sample form is kept because it is the one timm's blocks take.
    """
    for block in blocks:
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


@torch.no_grad()
def init_dinov2_(model: nn.Module, layerscale: float | None) -> None:
    """DINOv2 initialisation: trunc-normal(0.02) Linear weights and pos-embed, zero biases,
    cls token N(0, 1e-6), zero mask token, LayerScale gains at ``layerscale``.

    Done by hand rather than with timm's ``init_weights`` because timm's GLU init zeroes the
    gate half of ``fc1`` (a fine-tuning trick), which DINOv2's from-scratch recipe does not do.
    Skipped on the ``meta`` device, where there are no values to set.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LayerScale) and layerscale is not None:
            module.gamma.fill_(layerscale)
    if getattr(model, "pos_embed", None) is not None:
        nn.init.trunc_normal_(model.pos_embed, std=0.02)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    if getattr(model, "mask_token", None) is not None:
        nn.init.zeros_(model.mask_token)
