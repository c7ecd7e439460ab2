"""Web-MAE: masked autoencoding on a plain timm ViT (He et al. 2022, as used by Web-SSL).

Follows facebookresearch/mae ``models_mae.py`` so that an encoder trained here is laid out like
the released ``webssl-mae*`` checkpoints: the encoder is an ordinary timm ``VisionTransformer``
whose learned ``pos_embed`` slot holds frozen 2-D sin-cos values; the decoder exists only
during pretraining and is never exported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import numpy as np
import torch
from webssl_repro.config import dataclass_from_mapping
from webssl_repro.methods.base import ModelOnlyState
from webssl_repro.models.layers import run_blocks
from webssl_repro.recipes import mae_kept
from torch import nn
from timm.models.vision_transformer import Block

__all__ = [
    "MaeConfig", "MaeMethod", "MaskedAutoencoder", "mae_loss", "mae_transform", "patchify",
    "unpatchify", "random_masking", "sincos_pos_embed_2d",
]


@dataclass(frozen=True)
class MaeConfig:
    """Web-MAE recipe (paper Table 4 + MAE defaults the paper does not override).

    ``lr`` is the absolute learning rate, used as given (Table 4: 1.6e-3 at batch 4096, MAE's
    base 1e-4 x 4096/256); a config that changes ``batch_size`` sets ``lr`` with it. The
    decoder is MAE's default (512-d, 8 blocks, 16 heads): Web-SSL does not state its decoder,
    and the released code only contains encoders.
    """

    mask_ratio: float = 0.75
    norm_pix: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    batch_size: int = 4096
    lr: float = 1.6e-3
    min_lr: float = 0.0
    warmup_iters: int = 80_000
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mae_init: bool = True  # re-initialise the encoder with MAE's xavier scheme (as the reference)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "MaeConfig":
        """Build from a config section; an unknown key is an error that names it."""
        return dataclass_from_mapping(cls, mapping, "MAE config")


# ----------------------------------------------------------------------------- pure functions

def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, L, p·p·C), patches row-major, pixels in (p, q, c) order as MAE."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`; ``grid`` (rows, cols) defaults to a square grid."""
    b, length, _ = x.shape
    p = patch_size
    if grid is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{length} patches is not a square grid; pass grid=")
        grid = (side, side)
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int] | int, num_prefix: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (L, dim), bit-compatible with MAE ``util/pos_embed.py``.

    The first dim/2 channels encode the column (x) and the last dim/2 the row (y) of token
    ``row*cols + col``; each half is [sin(pos·ω), cos(pos·ω)] with ω_i = 10000^(-i/(dim/4)).
    ``num_prefix`` zero rows are prepended for CLS/register slots, as MAE does for CLS.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                             indexing="ij")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    emb = np.concatenate([np.zeros((num_prefix, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subset of tokens by argsort of uniform noise (MAE).

    Returns ``(kept (B, K, D), mask (B, L) with 1 = removed, ids_restore (B, L))``, K =
    ``recipes.mae_kept(L, ratio)``.
    """
    b, length, d = x.shape
    keep = mae_kept(length, mask_ratio)
    gen_device = generator.device if generator is not None else x.device
    noise = torch.rand(b, length, generator=generator, device=gen_device).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE.

    ``pred``/``target`` are patchified (B, L, p·p·C); ``mask`` (B, L) has 1 = masked. With
    ``norm_pix`` each target patch is standardised by its own mean and *unbiased* variance
    (``Tensor.var`` default, exactly as the MAE reference), eps 1e-6 inside the sqrt.
    Computed in fp32 so autocast does not change the objective.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mae_transform(size: int, scale: tuple[float, float] = (0.2, 1.0),
                  mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                  std: tuple[float, ...] = (0.229, 0.224, 0.225)):
    """MAE pretraining augmentation: crop + flip only (no colour jitter), ImageNet statistics."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# ----------------------------------------------------------------------------- model

def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskedAutoencoder(nn.Module):
    """Any timm-ViT-like encoder + MAE's lightweight decoder.

    The encoder needs ``patch_embed`` (with ``patch_size``, ``grid_size``), ``cls_token``,
    ``pos_embed``, ``blocks``, ``norm`` and ``embed_dim``; register tokens and
    ``no_embed_class`` are honoured so the same code drives any timm variant.
    """

    #: state entries that are functions of the grid, not learned: a model at another resolution
    #: keeps its own (``train.run._load_parent``)
    fixed_tables = ("encoder.pos_embed",)

    def __init__(self, encoder: nn.Module, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, decoder_mlp_ratio: float = 4.0,
                 norm_pix: bool = True, mae_init: bool = True) -> None:
        super().__init__()
        self.grad_checkpointing = False  # the decoder's; the encoder's is its own (timm's flag)
        self.encoder = encoder
        self.norm_pix = norm_pix
        pe = encoder.patch_embed
        ps = pe.patch_size
        self.patch_size = int(ps[0]) if isinstance(ps, (tuple, list)) else int(ps)
        self.grid = tuple(int(g) for g in pe.grid_size)
        self.in_chans = int(pe.proj.in_channels)
        self.num_patches = self.grid[0] * self.grid[1]
        has_cls = encoder.cls_token is not None
        self.num_prefix = int(getattr(encoder, "num_prefix_tokens", 1 if has_cls else 0))
        self.pos_prefix = 0 if getattr(encoder, "no_embed_class", False) else self.num_prefix
        width = int(encoder.embed_dim)

        # Encoder positions: MAE stores fixed sin-cos in the learned slot and freezes it, which
        # is also how the released checkpoints ship (plain ViT with a pos_embed tensor).
        if encoder.pos_embed is None:
            raise ValueError("MAE needs an encoder with an absolute pos_embed slot")
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed_2d(width, self.grid, self.pos_prefix).unsqueeze(0))
        encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(width, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed_2d(decoder_embed_dim, self.grid, self.num_prefix).unsqueeze(0),
            persistent=False,
        )
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_chans, bias=True)
        self._init_weights(mae_init)

    def _init_weights(self, init_encoder: bool) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        for module in decoder:
            module.apply(_xavier_init)
        if init_encoder:
            enc = self.encoder
            enc.apply(_xavier_init)
            w = enc.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if enc.cls_token is not None:
                nn.init.normal_(enc.cls_token, std=0.02)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None):
        """Encode only the visible patches: embed → +pos → drop masked → prepend CLS → blocks."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        if x.ndim == 4:  # dynamic_img_size encoders return NHWC
            x = x.flatten(1, 2)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"expected {self.num_patches} patches, got {x.shape[1]}")
        pos = enc.pos_embed
        x = x + pos[:, self.pos_prefix:]
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)
        prefix = []
        if enc.cls_token is not None:
            prefix.append(enc.cls_token.expand(x.shape[0], -1, -1))
        if getattr(enc, "reg_token", None) is not None:
            prefix.append(enc.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            tokens = torch.cat(prefix, dim=1)
            if self.pos_prefix:
                tokens = tokens + pos[:, : self.pos_prefix]
            x = torch.cat([tokens, x], dim=1)
        x = getattr(enc, "norm_pre", nn.Identity())(x)
        x = run_blocks(enc.blocks, x, getattr(enc, "grad_checkpointing", False))
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Re-insert mask tokens in original order, add decoder positions, predict pixels."""
        x = self.decoder_embed(latent)
        npf = self.num_prefix
        b, length = ids_restore.shape
        n_mask = length - (x.shape[1] - npf)
        # Under autocast the fp32 mask token and positions promote the residual stream to fp32,
        # as in MAE's forward_decoder; the blocks' matmuls still run in bf16.
        body = torch.cat([x[:, npf:], self.mask_token.expand(b, n_mask, -1)], dim=1)
        body = torch.gather(body, 1, ids_restore.unsqueeze(-1).expand(-1, -1, body.shape[2]))
        x = torch.cat([x[:, :npf], body], dim=1) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))[:, npf:]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None):
        """Returns ``(loss, pred (B, L, p²C), mask (B, L))``."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(pred, patchify(imgs, self.patch_size), mask, self.norm_pix)
        return loss, pred, mask


class MaeMethod(ModelOnlyState):
    """:class:`~webssl_repro.methods.base.PretrainMethod` for Web-MAE."""

    def __init__(self, encoder: nn.Module, config: MaeConfig | None = None) -> None:
        self.config = config or MaeConfig()
        c = self.config
        self.model = MaskedAutoencoder(
            encoder, c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads,
            c.decoder_mlp_ratio, norm_pix=c.norm_pix, mae_init=c.mae_init,
        )

    def training_step(self, batch: Mapping[str, Any], step: int,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images = batch["images"]
        loss, _, mask = self.model(images, self.config.mask_ratio, generator)
        return {"loss": loss, "mask_fraction": mask.detach().mean()}

    def after_optimizer_step(self, step: int) -> None:
        """MAE has no teacher, no temperature and no schedule besides the loop's lr."""

    def encoder(self) -> nn.Module:
        return self.bare_model().encoder

