"""Encoders on disk: the run directory's ``encoder.safetensors`` and its metadata.

The safetensors header carries what is needed to rebuild the module (method, arch,
image size), so an evaluation needs nothing but the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def encoder_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "encoder" not in meta:
        raise ValueError(f"{path}: no 'encoder' metadata (method, arch, img_size) in the safetensors header")
    return json.loads(meta["encoder"])


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder written by ``webssl-repro pretrain`` and load its weights (strict)."""
    from safetensors.torch import load_file

    from webssl_repro.models.vit import Arch, build_encoder

    meta = encoder_metadata(path)
    arch = Arch.from_config({**meta["arch"], "ffn": "gelu" if meta["method"] == "mae" else "swiglu"})
    encoder = build_encoder(arch, meta["method"], img_size=int(meta["img_size"]))
    state = load_file(str(path), device="cpu")
    encoder.load_state_dict(state, strict=True)
    encoder.to(device).eval().requires_grad_(False)
    meta["patch"] = arch.patch
    meta["depth"] = arch.depth
    return encoder, meta
