"""ViT shapes of Web-SSL (width, depth, heads, FFN hidden, patch) without torch, so that the
workflow plan checks a config's ``labels.sizes`` at the dry run; ``models.vit`` builds them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from webssl_repro.config import check_keys
from webssl_repro.resources import swiglu_hidden

METHODS = ("dino", "mae", "clip")
#: Methods whose encoders are only imported (off-the-shelf baselines), never trained here.
IMPORTED_METHODS = ("ijepa", "siglip")
#: FFN kind of each method's tower (CLIP reuses the Web-DINO vision towers; I-JEPA's is a plain ViT's,
#: SigLIP's one with the tanh approximation of GELU).
METHOD_FFN = {"dino": "swiglu", "mae": "gelu", "clip": "swiglu", "ijepa": "gelu", "siglip": "gelu_tanh"}
FFN_KINDS = ("swiglu", "gelu", "quick_gelu", "gelu_tanh")


@dataclass(frozen=True)
class Arch:
    """Shape of one ViT. ``ffn_hidden=None`` derives the hidden size from the width for the
    FFN kind the method uses; ``ffn`` records which kind an explicit ``ffn_hidden`` is for, so
    a SwiGLU size is never silently used as a GELU size.

    ``ffn="quick_gelu"`` with ``pre_norm`` and ``norm_eps=1e-5`` is OpenAI CLIP's vision tower
    (MetaCLIP's ``-quickgelu`` models): a LayerNorm after the embeddings, a bias-free patch
    embedding, no LayerScale. ``class_token=False`` is a tower whose tokens are all patches
    (I-JEPA's, SigLIP's). Only off-the-shelf encoders have either; ours never train them."""

    width: int
    depth: int
    heads: int
    ffn_hidden: int | None = None
    patch: int = 14
    ffn: str | None = None
    pre_norm: bool = False
    norm_eps: float = 1e-6
    class_token: bool = True

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "patch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Arch.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"Arch.width={self.width} is not divisible by heads={self.heads}")
        if self.ffn_hidden is not None and (not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0):
            raise ValueError(f"Arch.ffn_hidden must be a positive int or None, got {self.ffn_hidden!r}")
        if self.ffn not in (None, *FFN_KINDS):
            raise ValueError(f"Arch.ffn must be one of {FFN_KINDS} or None, got {self.ffn!r}")
        for name in ("pre_norm", "class_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Arch.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"Arch.norm_eps must be a positive number, got {self.norm_eps!r}")

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any]) -> "Arch":
        """Build from a config mapping (e.g. ``config/mini.yaml``), naming any unknown key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        check_keys(mapping, fields, "arch")
        missing = sorted({"width", "depth", "heads"} - set(mapping))
        if missing:
            raise KeyError(f"Arch config is missing key(s) {missing}")
        return cls(**dict(mapping))

    def hidden(self, ffn: str) -> int:
        """FFN hidden size for ``ffn`` ('swiglu': DINOv2 rounding rule; 'gelu', 'quick_gelu', 'gelu_tanh': 4·D)."""
        if ffn not in FFN_KINDS:
            raise ValueError(f"unknown FFN kind {ffn!r}")
        if self.ffn_hidden is not None and self.ffn in (None, ffn):
            return self.ffn_hidden
        if self.ffn_hidden is not None:
            raise ValueError(
                f"this Arch's ffn_hidden={self.ffn_hidden} is a {self.ffn} size, not {ffn}; "
                f"use {'MAE_ARCHS' if ffn == 'gelu' else 'PAPER_ARCHS'} (or arch_for) instead")
        return swiglu_hidden(self.width) if ffn == "swiglu" else 4 * self.width

    def header(self, ffn: str) -> dict[str, Any]:
        """The shape as a run directory's ``encoder.safetensors`` header records it (with the FFN
        width of ``ffn``); what a Web-SSL tower leaves at its default is left out, so those
        headers stay as they were before the off-the-shelf towers (OpenAI CLIP's, I-JEPA's) existed."""
        out: dict[str, Any] = {"width": self.width, "depth": self.depth, "heads": self.heads,
                               "ffn_hidden": self.hidden(ffn), "patch": self.patch}
        if ffn == "quick_gelu":
            out["ffn"] = ffn
        if self.pre_norm:
            out["pre_norm"] = True
        if self.norm_eps != 1e-6:
            out["norm_eps"] = self.norm_eps
        if not self.class_token:
            out["class_token"] = False
        return out

    def tower_ffn(self, method: str) -> str:
        """The FFN kind of ``method``'s tower of this shape: the method's own (``METHOD_FFN``),
        except for an OpenAI-CLIP tower, which only CLIP has."""
        if method not in METHOD_FFN:
            raise ValueError(f"unknown method {method!r}; expected one of {(*METHODS, *IMPORTED_METHODS)}")
        if self.ffn == "quick_gelu":
            if method != "clip":
                raise ValueError(f"a QuickGELU (OpenAI-CLIP) tower is a clip encoder, not {method}")
            return "quick_gelu"
        return METHOD_FFN[method]


def _dino(width: int, depth: int, heads: int) -> Arch:
    return Arch(width, depth, heads, swiglu_hidden(width), 14, "swiglu")


#: Web-DINO (and CLIP vision) towers, as in ``webssl/dinov2/vision_transformer.py``.
PAPER_ARCHS: dict[str, Arch] = {
    "300m": _dino(1024, 24, 16),
    "1b": _dino(1536, 40, 24),
    "2b": _dino(2688, 24, 21),
    "3b": _dino(3072, 26, 24),
    "5b": _dino(3584, 32, 28),
    "7b": _dino(4096, 32, 32),
}

#: Web-MAE encoders (``webssl/mae/mae.py``): GELU MLP ratio 4; 300m keeps MAE's patch 16.
#: 5b/7b are not released but follow Table 1 (MLP = 4·D, patch 14).
MAE_ARCHS: dict[str, Arch] = {
    "300m": Arch(1024, 24, 16, 4096, 16, "gelu"),
    "700m": Arch(1280, 32, 16, 5120, 14, "gelu"),
    **{s: Arch(a.width, a.depth, a.heads, 4 * a.width, 14, "gelu")
       for s, a in PAPER_ARCHS.items() if s != "300m"},
}


#: OpenAI-CLIP vision towers of the off-the-shelf MetaCLIP encoders (open_clip's
#: ``ViT-H-14-quickgelu`` and ``ViT-bigG-14-quickgelu``: width 1664, head width 104, MLP ratio 4.9231,
#: i.e. 8192), by size label; ``arch_for("clip", "h14")``.
OPENAI_CLIP_ARCHS: dict[str, Arch] = {
    "h14": Arch(1280, 32, 16, 5120, 14, "quick_gelu", pre_norm=True, norm_eps=1e-5),
    "bigG14": Arch(1664, 48, 16, 8192, 14, "quick_gelu", pre_norm=True, norm_eps=1e-5),
}


#: I-JEPA's ViT-H/14 (``vit_huge``, patch 14): a plain GELU ViT without a class token, whose fixed
#: sine-cosine position embeddings are stored as weights.
IJEPA_ARCHS: dict[str, Arch] = {"h14": Arch(1280, 32, 16, 5120, 14, "gelu", class_token=False)}

#: SigLIP's and SigLIP 2's shape-optimised ViT-SO400M/14 (``So400m/14``: width 1152, depth 27, MLP 4304):
#: no class token, a tanh-GELU MLP, a patch embedding with bias and no LayerScale, as transformers'
#: ``SiglipVisionModel``; its attention-pooling (MAP) head is not part of the tower.
SIGLIP_ARCHS: dict[str, Arch] = {"so400m14": Arch(1152, 27, 16, 4304, 14, "gelu_tanh", class_token=False)}


def arch_for(method: str, size: str) -> Arch:
    """The released architecture of ``{method}{size}`` (MAE has its own table; CLIP's sizes
    include the off-the-shelf OpenAI-CLIP towers; I-JEPA's and SigLIP's are imported only)."""
    tables = {"mae": MAE_ARCHS, "clip": {**PAPER_ARCHS, **OPENAI_CLIP_ARCHS}, "ijepa": IJEPA_ARCHS,
              "siglip": SIGLIP_ARCHS}
    table = tables.get(method, PAPER_ARCHS)
    if method not in METHOD_FFN:
        raise ValueError(f"unknown method {method!r}; expected one of {(*METHODS, *IMPORTED_METHODS)}")
    if size not in table:
        raise KeyError(f"no {method} architecture of size {size!r}; known: {sorted(table)}")
    return table[size]
