"""CLIP baseline (MetaCLIP / open_clip recipe) with a Web-SSL vision tower.

The paper's controlled comparison trains CLIP on the same MC-2B images with the same ViT
architectures as Web-DINO/Web-MAE; only the objective (and the text tower it needs) differs.
Loss = symmetric InfoNCE over the *global* batch with open_clip's ``local_loss`` layout: each
rank scores its own rows against all gathered columns, labels offset by ``rank·B``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from webssl_repro.models.text import CaptionTokenizer, TextTransformer
from webssl_repro.config import dataclass_from_mapping
from webssl_repro.methods.base import ModelOnlyState

__all__ = ["ClipConfig", "ClipModel", "ClipMethod", "clip_loss", "gather_with_grad",
           "clip_transform", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: A CLIP recipe's keys beside ``ClipConfig``'s, which ``train.run`` reads: the vision tower's
#: LayerScale init and the tokenizer (a file or hub repo, its commit, a learned one's vocabulary).
RECIPE_EXTRAS = ("layerscale", "tokenizer", "tokenizer_revision", "vocab_size")


@dataclass(frozen=True)
class ClipConfig:
    """MetaCLIP's largest-model recipe (paper Table 4: batch 32768, lr 4e-4, warmup 2K).

    The paper does not state the text tower of its CLIP-1B…7B; the default is MetaCLIP's
    largest (ViT-bigG-14: text 1280 wide, 32 layers, 20 heads, joint embedding 1280).
    """

    embed_dim: int = 1280
    context_length: int = 77
    text_width: int = 1280
    text_layers: int = 32
    text_heads: int = 20
    text_mlp_ratio: float = 4.0
    quick_gelu: bool = True  # MetaCLIP trains the "-quickgelu" model configs
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    batch_size: int = 32768
    lr: float = 4e-4
    warmup_iters: int = 2000
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    crop_scale: tuple[float, float] = (0.9, 1.0)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ClipConfig":
        """Build from a config section; an unknown key is an error that names it."""
        return dataclass_from_mapping(cls, mapping, "CLIP config")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Recent torch renames the flat-tensor collectives (the old names warn); keep torch 2.4 working.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class _AllGatherWithGrad(torch.autograd.Function):
    """all-gather along dim 0 whose backward returns the *sum over ranks* of the local slice.

    Every rank's loss depends on every shard, so the owner must receive all ranks' gradients
    (what open_clip's ``gather_with_grad=True`` achieves). Written here because
    ``torch.distributed.nn.functional.all_gather`` is deprecated; reduce-scatter on NCCL,
    all-reduce + slice on backends without it (gloo).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.world, ctx.n = rank, world, x.shape[0]
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _ALL_GATHER(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            local = grad.new_empty((ctx.n, *grad.shape[1:]))
            _REDUCE_SCATTER(local, grad)
            return local
        total = grad.clone()  # autograd's incoming gradient is not this function's to overwrite
        dist.all_reduce(total)
        return total[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].clone()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 keeping gradients; identity if not distributed.

    All ranks must pass the same shape (the global batch is split evenly).
    """
    _, world = _world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
              logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE; ``logit_scale`` is the multiplicative scale (e.g. 1/0.07), not its log.

    Embeddings are L2-normalised here (idempotent if already normalised); all in fp32. Under
    ``torch.distributed`` the local rows are scored against the gathered columns.
    """
    rank, _ = _world()
    # fp32 even under autocast: bf16 logits at scale 100 would carry errors of ~0.4
    with torch.autocast(image_emb.device.type, enabled=False):
        img = F.normalize(image_emb.float(), dim=-1)
        txt = F.normalize(text_emb.float(), dim=-1)
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = logit_scale.float()
        all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
        logits_per_image = logit_scale * img @ all_txt.T
        logits_per_text = logit_scale * txt @ all_img.T
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def _to_rgb(image):
    """Module-level (picklable for DataLoader workers) RGB conversion."""
    return image.convert("RGB")


def clip_transform(size: int, scale: tuple[float, float] = (0.9, 1.0),
                   mean: tuple[float, ...] = OPENAI_MEAN, std: tuple[float, ...] = OPENAI_STD):
    """MetaCLIP training augmentation: mild crop only, OpenAI normalisation."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.Lambda(_to_rgb),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class ClipModel(nn.Module):
    """Vision tower + linear projection, text tower, learnable temperature.

    The vision tower is any timm ViT: ``forward_features`` then ``forward_head`` gives the CLS
    token after the final norm (``global_pool='token'``, no head) or the head's output.
    """

    def __init__(self, vision: nn.Module, text: TextTransformer, embed_dim: int,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        width = int(getattr(vision, "num_classes", 0) or vision.embed_dim)
        self.visual_projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=width ** -0.5)
        if text.text_projection.shape[1] != embed_dim:
            raise ValueError(f"text tower projects to {text.text_projection.shape[1]}, not {embed_dim}")
        # shape (1,), not a scalar: FSDP2's fully_shard rejects 0-dim parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.vision.forward_head(self.vision.forward_features(images))
        if feats.ndim == 3:  # encoder built without pooling: take CLS
            feats = feats[:, 0]
        out = self.visual_projection(feats)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.text(tokens)
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Returns ``(image_emb, text_emb, logit_scale.exp())`` with unit-norm embeddings."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, max] (open_clip/MetaCLIP, after every optimiser step)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)


class ClipMethod(ModelOnlyState):
    """:class:`~webssl_repro.methods.base.PretrainMethod` for the CLIP baseline.

    Batches are ``{"images": (B,3,H,W), "captions": [str]}`` (tokenised here to the fixed
    context) or carry pre-tokenised ``"tokens"`` (B, context).
    """

    def __init__(self, vision: nn.Module, tokenizer: CaptionTokenizer,
                 config: ClipConfig | None = None) -> None:
        self.config = config or ClipConfig()
        c = self.config
        self.tokenizer = tokenizer
        text = TextTransformer(
            tokenizer.vocab_size, c.context_length, c.text_width, c.text_layers, c.text_heads,
            c.embed_dim, c.text_mlp_ratio, eot_token_id=tokenizer.eot_id, quick_gelu=c.quick_gelu,
        )
        self.model = ClipModel(vision, text, c.embed_dim, c.init_temperature, c.max_logit_scale)

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        """open_clip's exclusion (ndim<2, norms, biases, logit_scale) plus the timm CLS token,
        which is open_clip's 1-D class_embedding stored as (1, 1, D)."""
        return (p.ndim < 2 or "norm" in name or "ln_" in name or "bias" in name
                or "logit_scale" in name or name.endswith("cls_token"))

    def tokenize(self, captions) -> torch.Tensor:
        return self.tokenizer(list(captions), self.config.context_length)

    def training_step(self, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
        images = batch["images"]
        tokens = batch["tokens"] if "tokens" in batch else self.tokenize(batch["captions"])
        img, txt, scale = self.model(images, tokens.to(images.device))
        loss = clip_loss(img, txt, scale)
        return {"loss": loss, "logit_scale": scale.detach().reshape(())}

    def after_optimizer_step(self, step: int) -> None:
        self.bare_model().clamp_logit_scale()

    def encoder(self) -> nn.Module:
        return self.bare_model().vision

