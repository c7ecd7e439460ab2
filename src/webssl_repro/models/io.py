"""Encoders on disk: the run directory's ``encoder.safetensors`` and its metadata.

The safetensors header carries what is needed to rebuild the module (method, arch,
image size), so an evaluation needs nothing but the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


def save_encoder(state: Mapping[str, torch.Tensor], header: Mapping[str, Any], provenance: Mapping[str, Any],
                 out_dir: str | Path) -> Path:
    """A run directory's encoder, as ``load_encoder`` reads it, trained or imported alike:
    ``encoder.safetensors`` with ``header`` (method, arch, image size) in its metadata, and
    ``provenance.json``; each written whole or not at all."""
    from safetensors.torch import save_file

    from webssl_repro.files import atomic_save, write_json

    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_save(out / "encoder.safetensors",
                lambda tmp: save_file(tensors, str(tmp), metadata={"encoder": json.dumps(dict(header))}))
    write_json(out / "provenance.json", dict(provenance), indent=2, sort_keys=True, default=str)
    return out / "encoder.safetensors"


def _unreadable(path: str | Path, err: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file (cut short, or not an encoder written by "
                      f"webssl-repro pretrain / import-released?): {err}")


def encoder_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"encoder {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from err
    if "encoder" not in meta:
        raise ValueError(f"{path}: no 'encoder' metadata (method, arch, img_size) in the safetensors header")
    return json.loads(meta["encoder"])


Stats = tuple[tuple[float, ...], tuple[float, ...]]


def pixel_stats(method: str) -> Stats:
    """(mean, std) of the pixels a method trains on: ImageNet's (DINOv2, MAE, I-JEPA), OpenAI's (CLIP,
    as MetaCLIP and open_clip normalise), 0.5 for every channel (SigLIP's [-1, 1] pixels). Every
    evaluation feeds ImageNet-normalised pixels."""
    from webssl_repro.evaluate.imagesets import IMAGENET_MEAN, IMAGENET_STD
    from webssl_repro.methods.clip import OPENAI_MEAN, OPENAI_STD

    if method == "siglip":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return (OPENAI_MEAN, OPENAI_STD) if method == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def trained_pixel_mean(encoder: nn.Module) -> tuple[float, ...]:
    """The mean pixel of the statistics ``encoder`` trained with: the colour that is zero to it, which
    Cambrian's square padding fills with (ImageNet's unless ``take_imagenet_normalised`` set others)."""
    return tuple(getattr(encoder, "input_stats", pixel_stats("dino"))[0])


def take_imagenet_normalised(encoder: nn.Module, stats: Stats) -> None:
    """Let an encoder trained on pixels normalised by ``stats`` (mean, std) take ImageNet-normalised
    ones: a pre-hook on its patch embedding (the first layer of every forward path) maps
    x -> (x * std_in + mean_in - mean) / std, the same pixels in the encoder's own statistics."""
    imagenet = pixel_stats("dino")
    if tuple(map(tuple, stats)) == imagenet:
        return
    encoder.input_stats = tuple(map(tuple, stats))  # feature caches key on it (features.encoder_fingerprint)
    (m_in, s_in), (m, s) = imagenet, stats
    scale = torch.tensor([a / b for a, b in zip(s_in, s)]).view(1, 3, 1, 1)
    shift = torch.tensor([(a - c) / b for a, c, b in zip(m_in, m, s)]).view(1, 3, 1, 1)

    def renormalise(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * scale.to(x) + shift.to(x), *args[1:])

    encoder.patch_embed.register_forward_pre_hook(renormalise)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder written by ``webssl-repro pretrain`` and load its weights (strict). It
    takes ImageNet-normalised pixels whatever statistics its method trained with (``pixel_stats``).

    The tower is built on the meta device and adopts the file's tensors (``convert.load_into_encoder``):
    a random init first would double the host memory and, at ViT-bigG, take most of the load time."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from webssl_repro.models.convert import load_into_encoder
    from webssl_repro.models.vit import METHOD_FFN, Arch

    meta = encoder_metadata(path)
    if meta.get("method") not in METHOD_FFN:
        raise ValueError(f"{path}: encoder of unknown method {meta.get('method')!r}; known: {sorted(METHOD_FFN)}")
    # the header names the FFN only where it is not the method's own (an OpenAI-CLIP tower)
    arch = Arch.from_config({"ffn": METHOD_FFN[meta["method"]], **meta["arch"]})
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from err
    encoder = load_into_encoder(state, meta["method"], arch, int(meta["img_size"]), source=str(path))
    encoder.to(device)
    take_imagenet_normalised(encoder, pixel_stats(meta["method"]))
    meta["patch"] = arch.patch
    meta["depth"] = arch.depth
    return encoder, meta
