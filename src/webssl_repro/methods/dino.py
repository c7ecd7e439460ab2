"""Web-DINO = DINOv2 (DINO CLS loss + iBOT masked-patch loss + KoLeo, Sinkhorn-Knopp
targets, multi-crop, EMA teacher) on a Web-SSL tower. The paper changes nothing in the
recipe across sizes, so ``DinoConfig`` defaults are DINOv2's ViT-g recipe
(``configs/train/vitg14.yaml``), expressed in steps instead of 1250-iteration "epochs".
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from webssl_repro.data.masking import masked_token_selection
from webssl_repro.methods.dino_heads import DINOHead, DinoModel
from webssl_repro.methods.dino_losses import (
    dino_cross_entropy,
    dino_multicrop_loss,
    ibot_patch_loss,
    koleo_loss,
    koleo_per_gpu,
    sinkhorn_knopp,
    softmax_center,
    updated_center,
)
from webssl_repro.methods.schedules import scaled_lr, teacher_temp_schedule
from webssl_repro.recipes import DINO_DROP_PATH_RATE, DINO_STEP_DEFAULTS
from webssl_repro.train.schedules import CosineSchedule
from webssl_repro.models.vit import Arch, build_encoder
from webssl_repro.config import dataclass_from_mapping

__all__ = ["DinoConfig", "DinoMethod", "dino_cross_entropy", "dino_multicrop_loss", "ema_update_", "ibot_patch_loss",
           "koleo_loss", "sinkhorn_knopp"]


#: teacher targets: Sinkhorn-Knopp (DINOv2), or softmax with an EMA centre (DINO)
CENTERINGS = ("sinkhorn_knopp", "centering")


@dataclass(frozen=True)
class DinoConfig:
    """All Web-DINO hyper-parameters; defaults = DINOv2 ViT-g (paper Table 4: batch 3072,
    lr 2e-4·√3 ≈ 3.5e-4, 100k warm-up). ``total_steps`` = 2B samples / 3072 (one MC-2B pass)."""

    # backbone
    drop_path_rate: float = DINO_DROP_PATH_RATE
    layerscale: float = 1e-5
    # heads (iBOT keeps the default bottleneck 256: vitg14.yaml only overrides the DINO one)
    dino_n_prototypes: int = 131072
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 384
    dino_nlayers: int = 3
    head_init_std: float = 0.02
    ibot_separate_head: bool = True
    ibot_n_prototypes: int = 131072
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    ibot_nlayers: int = 3
    # losses
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    # KoLeo's nearest neighbours among this many images (DINOv2: one GPU's, 12 in the ViT-g
    # recipe), in groups of at least this size (koleo_per_gpu): a rank's 24 or 48 images at
    # 224 px make groups of exactly 12, a high-res fine-tune's 16 one group of 16; None: the
    # rank's whole batch
    koleo_batch: int | None = 12
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = DINO_STEP_DEFAULTS["warmup_teacher_temp_steps"]  # 30 DINOv2 epochs
    centering: str = "sinkhorn_knopp"  # or "centering" (softmax + EMA center)
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    # teacher
    momentum_teacher: float = 0.994
    final_momentum_teacher: float = 1.0
    # optimisation (the loop reads these; DinoMethod only uses the multipliers)
    batch_size: int = 3072
    base_lr: float = 2e-4
    lr_scaling: str = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_steps: int = DINO_STEP_DEFAULTS["warmup_steps"]  # 80 DINOv2 epochs x 1250
    total_steps: int = 651_042
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    freeze_last_layer_steps: int = DINO_STEP_DEFAULTS["freeze_last_layer_steps"]
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 1.0
    no_wd_on_tokens: bool = False  # DINOv2 decays pos-embed / cls / mask tokens; True exempts them
    # crops and masking (for the data pipeline)
    global_crop_size: int = 224
    local_crop_size: int = 98
    n_local_crops: int = 8
    #: crop size whose pixels DINOv2's blur (sigma 0.1-2.0, kernel 9 at 224) is expressed in: the
    #: scale's base resolution, so a 378/518 fine-tune blurs like DINOv2's high-res phase (unscaled)
    blur_reference_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        if self.centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {self.centering!r}")
        if self.koleo_batch is not None and self.koleo_batch < 2:
            raise ValueError(f"koleo_batch must be >= 2 (a nearest neighbour needs two images), got {self.koleo_batch}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "DinoConfig":
        """Build from a config section; an unknown key is an error that names it."""
        return dataclass_from_mapping(cls, cfg, "DinoConfig")

    @property
    def lr(self) -> float:
        """Peak learning rate after batch-size scaling."""
        return scaled_lr(self.base_lr, self.batch_size, self.lr_scaling)

    def momentum_at(self, step: int) -> float:
        """Teacher EMA momentum: cosine ``momentum_teacher → 1`` over the run (the learning rate and
        weight decay are the loop's, from ``train.TrainConfig``)."""
        return CosineSchedule(self.momentum_teacher, self.final_momentum_teacher, self.total_steps)(step)

    def teacher_temp_at(self, step: int) -> float:
        return teacher_temp_schedule(step, self.warmup_teacher_temp, self.teacher_temp,
                                     self.warmup_teacher_temp_steps)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1−m)·student, parameter by parameter (same structure)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())  # no detach needed: no_grad records nothing
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def _layer_id(name: str, n_blocks: int) -> int:
    """DINOv2 layer index for layer-wise lr decay: embeddings 0, block i → i+1, rest n+1."""
    if name.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


class DinoMethod(nn.Module):
    """Student (``model``: backbone + DINO head + iBOT head) and its EMA teacher.

    Batch: ``{"global_crops": (2B,3,H,W) crop-major, "local_crops": (nB,3,h,w),
    "masks": bool (2B, n_patches), "mask_indices", "mask_weights"}`` as produced by
    ``data.augmentations.collate_multicrop`` (the last two are optional).
    """

    def __init__(self, arch: Arch, config: DinoConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or DinoConfig()
        backbone = build_encoder(arch, "dino", img_size=cfg.global_crop_size,
                                 drop_path_rate=cfg.drop_path_rate, layerscale=cfg.layerscale)
        dino_head = DINOHead(arch.width, cfg.dino_n_prototypes, cfg.dino_hidden_dim,
                             cfg.dino_bottleneck_dim, cfg.dino_nlayers, cfg.head_init_std)
        ibot_head = (DINOHead(arch.width, cfg.ibot_n_prototypes, cfg.ibot_hidden_dim,
                              cfg.ibot_bottleneck_dim, cfg.ibot_nlayers, cfg.head_init_std)
                     if cfg.ibot_separate_head else None)
        self.model = DinoModel(backbone, dino_head, ibot_head)
        # The teacher starts as an exact copy; it only ever changes by EMA.
        self.teacher = copy.deepcopy(self.model)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if cfg.centering == "centering":
            self.register_buffer("dino_center", torch.zeros(1, cfg.dino_n_prototypes))
            ibot_k = cfg.ibot_n_prototypes if cfg.ibot_separate_head else cfg.dino_n_prototypes
            self.register_buffer("ibot_center", torch.zeros(1, ibot_k))
        self._frozen_last_layer: list[torch.Tensor] | None = None

    # -- helpers ---------------------------------------------------------------------------
    def _student(self) -> DinoModel:
        """The student's parameters even if the loop wrapped ``model`` in DDP (``.module``)."""
        from webssl_repro.train.distributed import unwrap

        return unwrap(self.model)

    def shadow_modules(self) -> list[nn.Module]:
        """The loop's hook for non-optimised copies: it broadcasts / shards the teacher too."""
        return [self.teacher]

    def clip_groups(self) -> dict[str, list[torch.Tensor]]:
        """The loop's hook: DINOv2 clips the backbone's and each head's gradient norm on its own
        (``for v in student.values(): v.clip_grad_norm_(clip_grad)``). At init the backbone's
        norm is ~1000x the heads', so one global norm would scale the heads' gradients by ~1e-3."""
        student = self._student()
        parts = {"backbone": student.backbone, "dino_head": student.dino_head, "ibot_head": student.ibot_head}
        return {name: [p for p in part.parameters() if p.requires_grad]
                for name, part in parts.items() if part is not None}

    def _last_layer_params(self) -> list[torch.Tensor]:
        return [p for n, p in self._student().named_parameters() if "last_layer" in n]

    def train(self, mode: bool = True) -> "DinoMethod":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses drop-path
        return self

    def model_patches(self, images: torch.Tensor) -> int:
        """Number of patch tokens the backbone makes of ``images``."""
        h, w = self._student().backbone.patch_embed.dynamic_feat_size(images.shape[-2:])
        return h * w

    def _targets(self, logits: torch.Tensor, temp: float, center: str) -> torch.Tensor:
        cfg = self.config
        if cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, cfg.sinkhorn_iterations)
        buf = getattr(self, center)
        probs = softmax_center(logits, buf, temp)
        buf.copy_(updated_center(buf, logits, cfg.center_momentum))
        return probs

    # -- PretrainMethod ---------------------------------------------------------------------
    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """DINOv2 groups: lr ×0.2 for the patch embedding, (optional) layer-wise decay, no wd
        on biases / norms / LayerScale gammas; ``is_last_layer`` marks the prototype layers."""
        cfg = self.config
        student = self._student()
        n_blocks = len(student.backbone.blocks)
        groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
        for full_name, p in student.named_parameters():
            if not p.requires_grad:
                continue
            part, name = full_name.split(".", 1)
            lr_mult = 1.0
            if part == "backbone":
                lr_mult = cfg.layerwise_decay ** (n_blocks + 1 - _layer_id(name, n_blocks))
                if name.startswith("patch_embed"):
                    lr_mult *= cfg.patch_embed_lr_mult
            no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
            if cfg.no_wd_on_tokens and name in ("pos_embed", "cls_token", "mask_token"):
                no_wd = True
            wd_mult = 0.0 if no_wd else 1.0
            last = "last_layer" in name
            key = (lr_mult, wd_mult, last)
            if key not in groups:
                groups[key] = {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                               "is_last_layer": last, "lr": base_lr * lr_mult,
                               "weight_decay": weight_decay * wd_mult}
            groups[key]["params"].append(p)
        return list(groups.values())

    def training_step(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        student = self._student()
        device = next(student.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        if step < cfg.freeze_last_layer_steps and self._frozen_last_layer is None:
            self._frozen_last_layer = [p.detach().clone() for p in self._last_layer_params()]

        global_crops = batch["global_crops"].to(device, non_blocking=True)
        n_images = global_crops.shape[0]
        if n_images % 2:
            raise ValueError("global_crops must hold 2 crops per image (crop-major)")
        local_crops = batch.get("local_crops")
        if local_crops is not None and local_crops.numel() == 0:
            local_crops = None
        local_crops = local_crops.to(device, non_blocking=True) if local_crops is not None else None
        masks = batch.get("masks")
        if masks is None:  # no iBOT this step; an all-false mask keeps the head in the graph
            masks = torch.zeros(n_images, self.model_patches(global_crops), dtype=torch.bool)
        masks = masks.flatten(1).bool()
        if "mask_indices" in batch and "mask_weights" in batch:
            indices, weights = batch["mask_indices"], batch["mask_weights"]
        else:  # a batch from another collate: select where the masks are (on the host, as a rule)
            indices, weights = masked_token_selection(masks)
        masks, indices, weights = (t.to(device, non_blocking=True) for t in (masks, indices, weights))
        temp = cfg.teacher_temp_at(step)

        # Teacher: whole global crops; CLS targets swapped so that view A learns from view B
        # (the heads act row-wise, so swapping logits equals swapping tokens).
        with torch.no_grad():
            t_out = self.teacher(global_crops, masks=masks, mask_input=False, mask_indices=indices)
            t_logits = torch.cat(t_out["global_logits"].chunk(2)[::-1])
            p_cls = self._targets(t_logits, temp, "dino_center")
            p_patch = self._targets(t_out["patch_logits"], temp, "ibot_center")

        # Student: masked global crops, local crops in a second pass (the same math as
        # DINOv2's packed xFormers pass over both).
        s_out = self.model(global_crops, local_crops, masks=masks, mask_indices=indices)
        global_loss, local_loss = dino_multicrop_loss(s_out["global_logits"], s_out.get("local_logits"),
                                                      p_cls, cfg.student_temp)
        n_local = 0 if local_crops is None else local_crops.shape[0] // (n_images // 2)
        # (student view, teacher view) pairs, same view excluded; DINOv2 counts at least one
        # local term (max(n_local * 2, 1)), so without local crops the global term is / 3.
        n_terms = 2 * 1 + max(2 * n_local, 1)
        dino_global, dino_local = global_loss / n_terms, local_loss / n_terms
        dino = cfg.dino_loss_weight * (dino_global + dino_local)

        koleo = cfg.koleo_loss_weight * sum(koleo_per_gpu(c, cfg.koleo_batch) for c in s_out["cls"].chunk(2))

        ibot = cfg.ibot_loss_weight * ibot_patch_loss(s_out["patch_logits"], p_patch, weights,
                                                      n_images, cfg.student_temp)

        loss = dino + ibot + koleo
        return {"loss": loss, "dino_loss": dino.detach(), "dino_global_loss": dino_global.detach(),
                "dino_local_loss": dino_local.detach(), "ibot_loss": ibot.detach(),
                "koleo_loss": koleo.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Undo any update of the prototype layers while frozen, then EMA-update the teacher.

        Restoring the values (instead of zeroing gradients) is exactly DINOv2's "last-layer
        lr = 0": gradients still enter the clip norm and the AdamW moments, and weight decay
        does not touch the frozen layers either.
        """
        if step < self.config.freeze_last_layer_steps and self._frozen_last_layer is not None:
            for param, frozen in zip(self._last_layer_params(), self._frozen_last_layer):
                param.copy_(frozen)  # one by one: FSDP2's sharded DTensors have no _foreach_copy_
        else:
            self._frozen_last_layer = None
        ema_update_(self.teacher, self._student(), self.config.momentum_at(step))

    def encoder(self) -> nn.Module:
        """Evaluations use the EMA teacher's backbone, as DINOv2 does."""
        return self.teacher.backbone
