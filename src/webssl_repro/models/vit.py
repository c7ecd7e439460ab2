"""The ViT family of Web-SSL: Web-DINO / CLIP towers (SwiGLU) and Web-MAE encoders (GELU).

Architectures are those of the released code (facebookresearch/webssl), not Table 1 of the
paper: Table 1 prints an MLP of 4·D, but Web-DINO uses SwiGLU with hidden ≈ 8/3·D, which is
what the released parameter counts (1.135B … 6.450B) correspond to. Every tower is timm's
``VisionTransformer`` with the knobs DINOv2 needs (mask token, uniform drop path,
LayerScale 1e-5, dynamic image size for local crops), so timm's evaluation helpers
(``forward_intermediates``) work unchanged.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from webssl_repro.models.layers import (
    ValidPatchEmbed,
    WebSSLBlock,
    fixed_hidden_mlp,
    init_dinov2_,
    run_blocks,
    set_uniform_drop_path,
)
from webssl_repro.models.arch import MAE_ARCHS, METHOD_FFN, METHODS, PAPER_ARCHS, Arch, arch_for

__all__ = ["Arch", "PAPER_ARCHS", "MAE_ARCHS", "METHODS", "METHOD_FFN", "arch_for", "resample_pos_embed", "WebSSLViT",
           "build_encoder", "ENCODERS", "create_encoder", "count_params"]


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], n_prefix: int = 1) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding``: the patch part of a (1, n_prefix + M·M, D)
    pos-embed resampled to ``grid`` = (h, w), bicubic with ``scale_factor=(h+0.1)/M`` and no
    anti-aliasing, in float32.

    timm's ``resample_abs_pos_embed`` differs where it matters: it anti-aliases when shrinking,
    which smooths the 16×16 grid to a 7×7 one for every 98-px local crop (relative L2
    difference ~0.8 at init) and so changes what the student sees on most views.
    """
    patch = pos_embed[:, n_prefix:]
    m = math.isqrt(patch.shape[1])
    if m * m != patch.shape[1]:
        raise ValueError(f"pos-embed has {patch.shape[1]} patch positions, not a square grid")
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    dtype = pos_embed.dtype
    patch = patch.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
                          antialias=False)
    if patch.shape[-2:] != (h, w):
        raise ValueError(f"resampled pos-embed grid {tuple(patch.shape[-2:])} != {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(dtype)
    return torch.cat([pos_embed[:, :n_prefix], patch], dim=1)


class WebSSLViT(VisionTransformer):
    """timm ViT plus DINOv2's iBOT mask token, its pos-embed resampling for other input sizes
    (local crops, other resolutions) and its ``forward_features`` dictionary."""

    def __init__(self, arch: Arch, ffn: str, *, img_size: int, layerscale: float | None,
                 drop_path_rate: float, mask_token: bool, **timm_kwargs: Any) -> None:
        hidden = arch.hidden(ffn)
        super().__init__(
            img_size=img_size,
            patch_size=arch.patch,
            embed_dim=arch.width,
            depth=arch.depth,
            num_heads=arch.heads,
            mlp_ratio=hidden / arch.width,  # informational only; the factory fixes the width
            mlp_layer=fixed_hidden_mlp(ffn, hidden),
            init_values=layerscale,
            qkv_bias=True,
            class_token=arch.class_token,
            reg_tokens=0,
            pos_embed="learn",
            num_classes=0,
            global_pool="token" if arch.class_token else "avg",
            fc_norm=False,  # the final norm over every token, also when the pooling is the average
            dynamic_img_size=True,
            pre_norm=arch.pre_norm,  # timm also drops the patch embedding's bias then, as CLIP has none
            norm_layer=partial(nn.LayerNorm, eps=arch.norm_eps),
            drop_path_rate=0.0,
            block_fn=WebSSLBlock,
            weight_init="skip",
            **timm_kwargs,
        )
        self.arch, self.ffn, self.ffn_hidden = arch, ffn, hidden
        set_uniform_drop_path(self.blocks, drop_path_rate)
        device = self.pos_embed.device
        self.mask_token = nn.Parameter(torch.zeros(1, arch.width, device=device)) if mask_token else None

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, replace masked patches by the mask token, then add cls + pos-embed.

        Masking happens before the position embedding (as in DINOv2), so a masked token still
        knows where it is. ``masks``: bool (B, n_patches) or (B, h, w).
        """
        x = self.patch_embed(x)  # (B, h, w, D) because dynamic_img_size
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this encoder has no mask token (built for mae/clip)")
            m = masks.reshape(x.shape[:-1]).unsqueeze(-1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """cls token (if the tower has one) + pos-embed for (B, h, w, D) patch tokens, resampled
        by DINOv2's rule."""
        B, h, w, D = x.shape
        pos = resample_pos_embed(self.pos_embed, (h, w), self.num_prefix_tokens)
        x = x.view(B, h * w, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def forward_features_dict(self, x: torch.Tensor, masks: torch.Tensor | None = None
                              ) -> dict[str, torch.Tensor]:
        """DINOv2's output layout: normed CLS, normed patch tokens, and pre-norm tokens. A tower
        without a class token gives the mean of its normed patch tokens as CLS (I-JEPA's average
        pooling), as ``evaluate.features`` does for every block."""
        x = run_blocks(self.blocks, self.prepare_tokens(x, masks), self.grad_checkpointing)
        normed = self.norm(x)
        return {
            "x_norm_clstoken": normed[:, 0] if self.num_prefix_tokens else normed.mean(1),
            "x_norm_patchtokens": normed[:, self.num_prefix_tokens:],
            "x_prenorm": x,
        }


def build_encoder(arch: Arch, method: str = "dino", img_size: int = 224, *,
                  drop_path_rate: float = 0.0, layerscale: float | None = 1e-5,
                  **timm_kwargs: Any) -> WebSSLViT:
    """The vision tower of ``method`` with shape ``arch``.

    dino: SwiGLU, LayerScale, mask token (iBOT); clip: the same tower without mask token
    (an unused parameter would break DDP), or OpenAI CLIP's for a QuickGELU ``arch`` (pre-norm,
    no LayerScale); mae: GELU MLP, no LayerScale, no mask token
    (MAE drops masked tokens instead of replacing them); ijepa (imported only): MAE's, without a
    class token for I-JEPA's ``arch``; siglip (imported only): the same with a tanh-GELU MLP, whose
    patch embedding drops the pixels off its patch grid (``ValidPatchEmbed``). ``img_size`` fixes the stored
    pos-embed grid; other input sizes are resampled on the fly. ``layerscale`` None or 0: no
    LayerScale (through ``timm.create_model``, which drops options that are None, pass 0).
    """
    ffn = arch.tower_ffn(method)
    model = WebSSLViT(
        arch, ffn, img_size=img_size,
        layerscale=None if ffn != "swiglu" or not layerscale else layerscale,
        drop_path_rate=drop_path_rate,
        mask_token=method == "dino",
        **({"embed_layer": ValidPatchEmbed} if method == "siglip" else {}),
        **timm_kwargs,
    )
    if ffn in ("gelu", "gelu_tanh"):  # MAE (and I-JEPA, SigLIP, imported only)
        if not any(p.is_meta for p in model.parameters()):
            model.init_weights(needs_reset=False)  # timm default; MAE re-initialises its own way
    else:
        init_dinov2_(model, layerscale)
    return model


def _entrypoint(name: str, arch: Arch, method: str) -> Callable[..., WebSSLViT]:
    """A timm model entrypoint for one tower; timm's ``create_model`` passes its factory options."""

    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: Any = None, **kwargs: Any) -> WebSSLViT:
        if pretrained:
            raise ValueError(f"{name}: timm holds no weights for it; load a released checkpoint with "
                             "webssl_repro.models.released.load_released (or models.hf.import_hf) or "
                             "`webssl-repro import-released`")
        return build_encoder(arch, method, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"The {method} tower of {arch.width} wide, {arch.depth} deep ({name})."
    return entrypoint


def _register() -> dict[str, Callable[..., WebSSLViT]]:
    """Every paper tower in timm's registry (``timm.create_model("webssl_dino7b", img_size=518)``)."""
    from timm.models import register_model

    names: dict[str, Callable[..., WebSSLViT]] = {}
    for method in METHODS:
        table = MAE_ARCHS if method == "mae" else PAPER_ARCHS
        for size, arch in table.items():
            name = f"webssl_{method}{size}"
            names[name] = globals()[name] = register_model(_entrypoint(name, arch, method))
    return names


#: name → timm entrypoint (``webssl_dino7b``, ``webssl_mae300m``…), registered with timm on import.
ENCODERS: dict[str, Callable[..., WebSSLViT]] = _register()


def create_encoder(name: str, **kwargs: Any) -> WebSSLViT:
    """Build a registered tower by name through timm, e.g. ``create_encoder("webssl_dino1b", img_size=518)``."""
    import timm

    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return timm.create_model(name, **kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (works on the ``meta`` device)."""
    return sum(p.numel() for p in model.parameters())
