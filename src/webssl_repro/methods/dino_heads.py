"""DINO / iBOT projection heads (DINOv2 ``layers/dino_head.py`` semantics).

The MLP maps backbone tokens to a low-dimensional bottleneck that is L2-normalised, so the
weight-normed last layer computes (scaled) cosine similarities to ``n_prototypes`` learned
prototypes. The last layer is what DINOv2 freezes during the first epoch, hence its name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from webssl_repro.data.masking import masked_token_indices


class DINOHead(nn.Module):
    """``nlayers``-layer GELU MLP → L2-normalise → weight-normed prototypes (no bias)."""

    fsdp_unit = True  # sharded on its own (``train.distributed.transformer_blocks``)

    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, init_std: float = 0.02) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        if not any(p.is_meta for p in self.mlp.parameters()):
            for module in self.mlp:
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=init_std)
                    nn.init.zeros_(module.bias)
        # The prototype layer keeps PyTorch's default init (DINOv2 applies its trunc-normal
        # init to the MLP before the prototype layer exists); the gain starts at 1 and stays
        # trainable as in DINOv2.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        with torch.no_grad():
            g = self.last_layer.parametrizations.weight.original0
            if not g.is_meta:
                g.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # eps follows DINOv2: 1e-6 keeps fp16 away from division by ~0, 1e-12 otherwise.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


class DinoModel(nn.Module):
    """Backbone + DINO head + iBOT head in one module with one ``forward``.

    Student and EMA teacher are two instances. A single ``forward`` matters for the loop's
    data parallelism: DDP only synchronises gradients, and FSDP2 only gathers the root's
    parameters, when the wrapped module itself is called.
    """

    def __init__(self, backbone: nn.Module, dino_head: DINOHead, ibot_head: DINOHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # None: iBOT shares the DINO head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, mask_input: bool = True,
                mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``masks`` (bool, B×n_patches) selects the tokens for the iBOT head; with
        ``mask_input`` they are also replaced by the mask token (student), without it the
        image is seen whole (teacher). ``mask_indices``: the same selection as flat token
        positions (``data.masking.masked_token_indices``); found from ``masks`` if absent."""
        out = self.backbone.forward_features_dict(global_crops, masks=masks if mask_input else None)
        cls = out["x_norm_clstoken"]
        result = {"cls": cls}
        if local_crops is not None:
            # One head call over the global and local CLS tokens: the head is row-wise, and a
            # single pass halves its kernel launches, which dominate at mini widths.
            local_cls = self.backbone.forward_features_dict(local_crops)["x_norm_clstoken"]
            result["global_logits"], result["local_logits"] = self.dino_head(
                torch.cat([cls, local_cls])).split([cls.shape[0], local_cls.shape[0]])
        else:
            result["global_logits"] = self.dino_head(cls)
        if masks is not None:
            head = self.ibot_head if self.ibot_head is not None else self.dino_head
            if mask_indices is None:
                mask_indices = masked_token_indices(masks)
            # an empty selection still runs the head, so every parameter is in the graph (DDP)
            result["patch_logits"] = head(out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices))
        return result
