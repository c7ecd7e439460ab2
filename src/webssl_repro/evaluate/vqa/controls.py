"""Control encoders for the VQA probe: does the probe read images at all at this scale?

``pixels`` hands the probe each patch's raw pixels as its token (everything in the image,
nothing digested); ``blind`` hands it the same tokens zeroed. A probe that reads images scores
``pixels`` above ``blind``; where it does not, differences between encoders are the language
model's answer priors, and the claims that rest on VQA numbers cannot be tested there
(``paper.claims``). The mini scale runs both (``evaluate.vqa.controls``); at paper scale the
paper's own numbers show that the Llama-3 probe reads images, and a control costs a full
Cambrian training.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from webssl_repro.metrics import VQA_CONTROLS as CONTROLS


class ControlTokens(nn.Module):
    """A ViT-shaped encoder without weights: a zero CLS token, then ``patch_tokens(images)``,
    zeroed when ``blind`` (the same tokens, their content withheld)."""

    num_prefix_tokens = 1

    def __init__(self, embed_dim: int, blind: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.blind = int(embed_dim), bool(blind)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:  # (B, P, embed_dim)
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_tokens(images)
        if self.blind:
            tokens = torch.zeros_like(tokens)
        return torch.cat([tokens.new_zeros(tokens.shape[0], 1, tokens.shape[-1]), tokens], dim=1)


class PixelTokens(ControlTokens):
    """Each patch's raw pixels as its token (or zeros)."""

    def __init__(self, patch: int, blind: bool = False) -> None:
        super().__init__(3 * int(patch) ** 2, blind)
        self.patch = int(patch)

    def extra_repr(self) -> str:  # tells the two controls apart (feature-cache fingerprints)
        return f"patch={self.patch}, blind={self.blind}"

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)  # (B, P, 3 * patch^2)


def control_encoder(name: str, img_size: int, patch: int) -> tuple[PixelTokens, dict[str, Any]]:
    """The control ``name`` and the encoder metadata the VQA stage reads."""
    if name not in CONTROLS:
        raise ValueError(f"unknown VQA control {name!r} (known: {', '.join(CONTROLS)})")
    if img_size % patch:
        raise ValueError(f"control image size {img_size} is not a multiple of its patch {patch}")
    return PixelTokens(patch, blind=name == "blind"), {"img_size": int(img_size), "patch": int(patch), "depth": 0}
