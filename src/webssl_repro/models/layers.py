"""Small adapters that make timm's ViT building blocks match the released Web-SSL towers.

timm's ``Block`` derives the FFN width as ``int(dim * mlp_ratio)``, which cannot express
DINOv2's rounded SwiGLU hidden size exactly for every width (float truncation), and timm's
stochastic depth grows linearly with depth, per sample, whereas DINOv2 uses one uniform rate
and, above 0.1, drops a fixed share of the batch. These helpers fix both while keeping
timm's layers themselves.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
from timm.layers import DropPath, GluMlp, LayerScale, Mlp, PatchEmbed, QuickGELU
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from webssl_repro.recipes import SUBSET_DROP_ABOVE


def fixed_hidden_mlp(kind: str, hidden: int) -> Callable[..., nn.Module]:
    """An ``mlp_layer`` factory for timm's ``Block`` that ignores its float-derived width.

    ``kind="swiglu"`` is timm's packed GLU (``fc1: D→2h``, ``silu(x1)·x2``, ``fc2: h→D``), the
    same layout as DINOv2's ``w12``/``w3`` so released weights load by renaming only;
    ``kind="gelu"`` is the plain MAE/ViT MLP with hidden ``h``, ``"quick_gelu"`` OpenAI CLIP's and
    ``"gelu_tanh"`` SigLIP's (GELU's tanh approximation, transformers' ``gelu_pytorch_tanh``).
    """
    if kind == "swiglu":
        layer, fixed = GluMlp, dict(hidden_features=2 * hidden, act_layer=nn.SiLU, gate_last=False)
    elif kind == "gelu":
        layer, fixed = Mlp, dict(hidden_features=hidden, act_layer=nn.GELU)
    elif kind == "quick_gelu":  # OpenAI CLIP's x·σ(1.702x)
        layer, fixed = Mlp, dict(hidden_features=hidden, act_layer=QuickGELU)
    elif kind == "gelu_tanh":
        layer, fixed = Mlp, dict(hidden_features=hidden, act_layer=partial(nn.GELU, approximate="tanh"))
    else:
        raise ValueError(f"unknown FFN kind {kind!r}; expected 'swiglu', 'gelu', 'quick_gelu' or 'gelu_tanh'")

    def make(in_features: int, hidden_features: int | None = None, **kwargs) -> nn.Module:
        kwargs.update(fixed)
        return layer(in_features, **kwargs)

    return make


class ValidPatchEmbed(PatchEmbed):
    """timm's patch embedding that drops the last ``H mod p`` rows and ``W mod p`` columns of an
    image off its patch grid, as SigLIP's ``Conv2d(padding="valid")`` does (384 px at patch 14:
    27 x 27 patches, 6 px unseen), where timm refuses such a size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (h, w) = self.patch_size, x.shape[-2:]
        return super().forward(x[..., :h - h % ph, :w - w % pw])




def subset_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                    rate: float) -> torch.Tensor:
    """``x + branch(x)`` with stochastic depth computed on a random subset of the batch.

    DINOv2's efficient stochastic depth: the branch runs on ``max(int(B·(1 - rate)), 1)``
    randomly chosen samples only and their residual is added with weight B / subset, so
    the expectation equals the undropped block while the dropped samples cost nothing;
    at the ViT-g recipe's 0.4 that is 40 % of the student's block compute.
    """
    b = x.shape[0]
    kept = max(int(b * (1 - rate)), 1)
    index = torch.randperm(b, device=x.device)[:kept]
    residual = branch(x.index_select(0, index)).to(x.dtype)
    return torch.index_add(x.flatten(1), 0, index, residual.flatten(1), alpha=b / kept).view_as(x)


class WebSSLBlock(Block):
    """timm's pre-norm ``Block`` whose stochastic depth follows DINOv2: per-sample DropPath
    up to ``SUBSET_DROP_ABOVE``, ``subset_residual`` above it (training only)."""

    sample_drop_ratio: float = 0.0

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # kwargs (attn_mask, is_causal) pass through only when given: older timm blocks lack them
        if not (self.training and self.sample_drop_ratio > SUBSET_DROP_ABOVE):
            return super().forward(x, **kwargs)
        if kwargs.get("attn_mask") is not None:
            raise ValueError("subset stochastic depth takes no attn_mask: the mask would "
                             "have to follow the sampled batch rows")
        kwargs.pop("attn_mask", None)
        rate = self.sample_drop_ratio
        x = subset_residual(x, lambda t: self.ls1(self.attn(self.norm1(t), **kwargs)), rate)
        return subset_residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), rate)


def set_uniform_drop_path(blocks: nn.Sequential, rate: float) -> None:
    """Give every residual branch the same stochastic-depth rate (DINOv2 ``drop_path_uniform``).

    timm's rate grows linearly with depth. Up to 0.1 each sample is kept with probability
    1 - rate (timm's ``DropPath``, as DINOv2 does there); above it ``WebSSLBlock`` uses
    ``subset_residual`` instead, as DINOv2 does.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate (pretrain.<method>.drop_path_rate) must be in [0, 1), got {rate}")
    per_sample = 0.0 < rate <= SUBSET_DROP_ABOVE
    for block in blocks:
        block.drop_path1 = DropPath(rate) if per_sample else nn.Identity()
        block.drop_path2 = DropPath(rate) if per_sample else nn.Identity()
        block.sample_drop_ratio = rate


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


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """``x`` through ``blocks`` in turn; ``checkpointed`` (a tower's ``grad_checkpointing``,
    timm's flag) keeps only each block's input and recomputes the block in the backward, while
    gradients are being recorded: the same gradients for about a third more compute."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if checkpointed and torch.is_grad_enabled() else block(x)
    return x


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Set ``grad_checkpointing`` on every tower of ``model`` that has the flag (timm's ViTs, the
    CLIP text tower, the MAE decoder); returns how many, and refuses a model with none."""
    towers = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    if not towers:
        raise ValueError(f"{type(model).__name__} has no tower with a grad_checkpointing flag")
    for tower in towers:
        tower.grad_checkpointing = True
    return len(towers)
