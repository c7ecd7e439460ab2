"""Hugging Face and native checkpoints <-> our encoders (``models.released`` reads the released ones).

The released Web-DINO towers are ``transformers`` ``Dinov2Model`` s with a SwiGLU FFN and
Web-MAE encoders are ``ViTModel`` s (paper_facts §8.1). Exporting our runs in those formats makes
them usable by any downstream code written for the released models, and importing the released
weights turns an eval-only run into a run "imported from a checkpoint" (design §1): the
imported encoder is written as an ordinary run-dir ``encoder.safetensors``, so every evaluation
reads it with ``models.io.load_encoder`` like a run trained here.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from webssl_repro.models import convert
from webssl_repro.models.vit import METHOD_FFN, Arch, WebSSLViT, arch_for

#: HF model_type -> default method; ``vit_mae`` is MAE's own release (facebook/vit-mae-*), whose
#: encoder is a ``ViTModel`` in all but name; ``clip_vision_model`` the vision tower of a ``CLIPModel``
#: (MetaCLIP's releases), an OpenAI-CLIP tower; ``ijepa`` I-JEPA's, a ``ViTModel`` without a class token;
#: ``siglip_vision_model`` the vision tower of a ``SiglipModel`` (SigLIP's and SigLIP 2's fixed-resolution releases)
KINDS = {"dinov2": "dino", "vit": "mae", "vit_mae": "mae", "clip_vision_model": "clip", "ijepa": "ijepa",
         "siglip_vision_model": "siglip"}
#: HF model_type -> the methods whose towers it can hold (a Web-DINO and a CLIP tower are both Dinov2Models)
KIND_METHODS = {"dinov2": ("dino", "clip"), "vit": ("mae",), "vit_mae": ("mae",), "clip_vision_model": ("clip",),
                "ijepa": ("ijepa",), "siglip_vision_model": ("siglip",)}
#: model_type of a two-tower release -> that of its vision tower, the one imported
VISION_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


#: What an I-JEPA import from transformers reads (provenance notes): transformers' conversion script
#: (convert_ijepa_to_hf.py) took the checkpoint's ``["encoder"]``.
IJEPA_HF_NOTE = ("transformers' IJepaModel conversions (facebook/ijepa_*) hold I-JEPA's context encoder, not "
                 "the target encoder I-JEPA evaluates (its native file's 'target_encoder')")
#: What a SigLIP import leaves out (provenance notes).
SIGLIP_HEAD_NOTE = ("SigLIP's attention-pooling (MAP) head is left out: the evaluations read the blocks' tokens, "
                    "and the mean of the patch tokens where they read a CLS")


def _hf_swiglu_hidden(width: int, ratio: float) -> int:
    """transformers' ``Dinov2SwiGLUFFN`` width rule (same in 4.x and 5.x)."""
    return (int(int(width * ratio) * 2 / 3) + 7) // 8 * 8


def swiglu_mlp_ratio(width: int, hidden: int) -> int:
    """The ``mlp_ratio`` for which HF's SwiGLU is ``hidden`` wide (4 for every paper arch).

    transformers 5 validates ``mlp_ratio`` as an int, and HF rounds the SwiGLU width up to a
    multiple of 8, so only widths ``(int(D·r·2/3)+7)//8·8`` for an integer ``r`` can be
    exported; anything else raises rather than export a differently shaped model.
    """
    for ratio in (4, *range(1, 4 * hidden // width + 9)):
        if _hf_swiglu_hidden(width, ratio) == hidden:
            return ratio
    raise ValueError(f"SwiGLU hidden size {hidden} (width {width}) cannot be expressed by "
                     "transformers' Dinov2Config.mlp_ratio (an integer r gives "
                     "(int(width*r*2/3)+7)//8*8)")


def hf_config(arch: Arch, method: str, img_size: int):
    """``Dinov2Config`` (dino/clip towers) or ``ViTConfig`` (mae) describing our encoder.

    The run metadata rides along as ``config.webssl`` so a round trip restores the method
    (a CLIP tower and a Web-DINO tower are both ``Dinov2Model`` s).
    """
    from transformers import Dinov2Config, ViTConfig

    webssl = {"method": method, "arch": arch_header(arch, method), "img_size": int(img_size)}
    common = dict(hidden_size=arch.width, num_hidden_layers=arch.depth,
                  num_attention_heads=arch.heads, patch_size=arch.patch, image_size=int(img_size),
                  layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, webssl=webssl)
    if method == "mae":
        return ViTConfig(hidden_act="gelu", intermediate_size=arch.hidden("gelu"), **common)
    return Dinov2Config(use_swiglu_ffn=True, layerscale_value=1e-5,
                        mlp_ratio=swiglu_mlp_ratio(arch.width, arch.hidden("swiglu")),
                        use_mask_token=method == "dino", drop_path_rate=0.0, **common)


def arch_header(arch: Arch, method: str) -> dict[str, Any]:
    """``arch`` as the run-dir header and ``config.webssl`` record it for ``method``'s tower."""
    return arch.header(arch.tower_ffn(method))


def _meta(method: str, arch: Arch, img_size: int, **extra: Any) -> dict[str, Any]:
    """The run-dir metadata (as ``train.run`` writes it) plus ``load_encoder``'s extras."""
    return {"method": method, "arch": arch_header(arch, method), "img_size": int(img_size),
            "patch": arch.patch, "depth": arch.depth, **extra}


def _new_hf_model(config) -> nn.Module:
    from transformers import Dinov2Model, ViTModel

    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    return Dinov2Model(config)


def export_hf(encoder: WebSSLViT, meta: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``encoder`` as a transformers model directory (config.json + model.safetensors).

    The HF model is built on the meta device and adopts our tensors, so exporting a 7B run
    does not hold a second randomly initialised copy. ``from_pretrained(out_dir)`` then gives
    ``last_hidden_state`` = our final-norm tokens (CLS first) at the stored resolution. At
    another size the two differ by ~0.5 % (relative): we resample the position embeddings by
    DINOv2's rule (``vit.resample_pos_embed``, bit-equal to the released webssl code),
    transformers' ``interpolate_pos_encoding`` to the exact grid. transformers 5 writes the file
    in the 4.x names of the uploaded ``facebook/webssl-*`` repos, so either version loads it.
    """
    method = meta["method"]
    if encoder.ffn == "quick_gelu" or not encoder.arch.class_token:
        raise ValueError("an imported off-the-shelf tower (MetaCLIP's OpenAI-CLIP, I-JEPA's or SigLIP's) is not "
                         "exported: its own release is a transformers model already")
    if method not in ("dino", "clip", "mae"):
        raise ValueError(f"unknown method {method!r}")
    if (method == "mae") != (encoder.ffn == "gelu"):
        raise ValueError(f"meta says method {method!r} but the encoder has a {encoder.ffn} FFN")
    if (method == "dino") != (encoder.mask_token is not None):
        raise ValueError(f"meta says method {method!r} but the encoder "
                         f"{'has' if encoder.mask_token is not None else 'lacks'} a mask token")
    img_size = int(meta["img_size"])
    config = hf_config(encoder.arch, method, img_size)
    with torch.device("meta"):
        model = _new_hf_model(config)
    kind = config.model_type
    state = convert.to_hf({k: v.detach() for k, v in encoder.state_dict().items()}, kind,
                          legacy=convert.hf_is_legacy(model.state_dict()))
    model.load_state_dict(state, strict=True, assign=True)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _load_hf_model(path: str | Path, *, allow_download: bool, revision: str | None) -> nn.Module:
    from transformers import (AutoConfig, CLIPVisionModel, Dinov2Model, IJepaModel, SiglipVisionModel, ViTMAEModel,
                              ViTModel)
    from transformers.utils import logging as hf_logging

    local = Path(path).is_dir()
    if not local and not allow_download:
        raise FileNotFoundError(f"{path}: no such local HF model directory (pass allow_download=True "
                                "to fetch a hub id, which is meant for paper-scale runs only)")
    kw = {"revision": revision} if revision and not local else {}
    config = AutoConfig.from_pretrained(str(path), **kw)
    if config.model_type == "vit":
        model, info = ViTModel.from_pretrained(str(path), add_pooling_layer=False, output_loading_info=True, **kw)
    elif config.model_type == "dinov2":
        model, info = Dinov2Model.from_pretrained(str(path), output_loading_info=True, **kw)
    elif config.model_type == "vit_mae":  # the encoder alone; the pixel decoder's weights are left out
        model, info = ViTMAEModel.from_pretrained(str(path), output_loading_info=True, **kw)
    elif config.model_type == "ijepa":
        model, info = IJepaModel.from_pretrained(str(path), add_pooling_layer=False, output_loading_info=True, **kw)
    elif config.model_type in (*VISION_TOWERS, *VISION_TOWERS.values()):
        # the vision tower; transformers would list each weight of the text tower it leaves out as a
        # warning, and the missing and mismatched weights, the ones that matter, are checked below
        tower = CLIPVisionModel if config.model_type.startswith("clip") else SiglipVisionModel
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = tower.from_pretrained(str(path), output_loading_info=True, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not a Web-SSL tower (expected 'dinov2' "
                         "for Web-DINO, 'vit' for Web-MAE, 'vit_mae' for MAE, 'clip' for MetaCLIP, 'ijepa' or "
                         "'siglip' for SigLIP and SigLIP 2's fixed-resolution releases)")
    # from_pretrained fills a weight the files lack with random values and only logs it: the
    # encoder converted from the model would then be half random, with no error. The pooling heads
    # over the final tokens (ViT's pooler, SigLIP's MAP head) are not imported.
    missing = sorted(k for k in info.get("missing_keys", ()) if not convert.hf_ignored(k))
    if missing:
        raise KeyError(f"{path}: the checkpoint lacks {len(missing)} of the {config.model_type} model's weights, "
                       f"e.g. {', '.join(missing[:5])}")
    mismatched = info.get("mismatched_keys", ())
    if mismatched:
        raise ValueError(f"{path}: weights of another shape than its config.json says: "
                         f"{', '.join(str(m) for m in list(mismatched)[:5])}")
    return model


def import_hf(path_or_model: str | Path | nn.Module, *, allow_download: bool = False,
              revision: str | None = None, method: str | None = None
              ) -> tuple[WebSSLViT, dict[str, Any]]:
    """Our encoder from a HF ``Dinov2Model``/``ViTModel``/``ViTMAEModel``/``IJepaModel``/``CLIPModel``/
    ``SiglipModel`` (a local directory or a model object).

    The method comes from ``config.webssl`` (our exports), else ``method``, else the model
    type (Dinov2 → dino, ViT and ViTMAE → mae, CLIP → clip, an OpenAI-CLIP tower: QuickGELU,
    pre-norm; IJepa → ijepa; Siglip → siglip, its vision tower without the attention-pooling head).
    Both transformers naming generations are accepted. The
    fused q/k/v and SwiGLU gate/up weights are copies (``convert.from_hf`` concatenates them);
    the import job's memory allows for them (``workflow_pretrain.import_resources``).
    """
    if isinstance(path_or_model, nn.Module):
        model, source = path_or_model, type(path_or_model).__name__
        if model.config.model_type == "vit_mae" and hasattr(model, "vit"):
            model = model.vit  # a ViTMAEForPreTraining: its encoder
        elif model.config.model_type in (*VISION_TOWERS, *VISION_TOWERS.values()) and hasattr(model, "vision_model"):
            model = model.vision_model  # a CLIPModel, CLIPVisionModelWithProjection or SiglipModel: its vision tower
    else:
        model = _load_hf_model(path_or_model, allow_download=allow_download, revision=revision)
        source = str(path_or_model)
    config = model.config
    kind = config.model_type
    if kind not in KINDS:
        raise ValueError(f"{source}: model_type {kind!r} is not a Web-SSL tower")
    ours = getattr(config, "webssl", None) or {}
    method = method or ours.get("method") or KINDS[kind]
    if method not in KIND_METHODS[kind]:
        raise ValueError(f"{source}: method {method!r} does not match a HF {kind} model")
    width = config.hidden_size
    eps = 1e-6
    if kind == "clip_vision_model":
        if config.hidden_act != "quick_gelu":
            raise ValueError(f"{source}: CLIP hidden_act {config.hidden_act!r}; the OpenAI-CLIP towers here "
                             "are MetaCLIP's, with 'quick_gelu'")
        hidden, eps = config.intermediate_size, float(config.layer_norm_eps)  # built as it is: no warning
    elif kind == "siglip_vision_model":
        if config.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"{source}: SigLIP hidden_act {config.hidden_act!r}; SigLIP's towers use "
                             "'gelu_pytorch_tanh'")
        hidden, eps = config.intermediate_size, float(config.layer_norm_eps)
    elif kind == "dinov2":
        if not config.use_swiglu_ffn:
            raise ValueError(f"{source}: Dinov2 with a GELU MLP (e.g. the original DINOv2 ViT-L) is "
                             "not a Web-DINO tower; Web-DINO uses SwiGLU")
        hidden = _hf_swiglu_hidden(width, config.mlp_ratio)
    else:
        if config.hidden_act != "gelu":
            raise ValueError(f"{source}: ViT hidden_act {config.hidden_act!r}, {method} uses 'gelu'")
        hidden = config.intermediate_size
        if kind == "ijepa":
            eps = float(config.layer_norm_eps)  # built as it is: I-JEPA's 1e-6, transformers' default 1e-12
    if not getattr(config, "qkv_bias", True):
        raise ValueError(f"{source}: qkv_bias=False, but every Web-SSL tower has q/k/v biases")
    if abs(config.layer_norm_eps - eps) > 1e-12:
        warnings.warn(f"{source}: layer_norm_eps={config.layer_norm_eps}, our encoder uses 1e-6 "
                      "(a negligible difference for trained weights)", stacklevel=2)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    img = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    ffn = "quick_gelu" if kind == "clip_vision_model" else METHOD_FFN[method]
    arch = Arch(width, config.num_hidden_layers, config.num_attention_heads, hidden, patch, ffn,
                pre_norm=ffn == "quick_gelu", norm_eps=eps, class_token=kind not in ("ijepa", "siglip_vision_model"))
    hf_state = model.state_dict()
    state = convert.from_hf(hf_state, kind)
    if method == "clip":
        state.pop("mask_token", None)
    elif method == "dino" and "mask_token" not in state:
        state["mask_token"] = torch.zeros(1, width)
    encoder = convert.load_into_encoder(state, method, arch, img, source=source)
    notes = [IJEPA_HF_NOTE] if kind == "ijepa" else []
    if kind == "siglip_vision_model" and any(convert.hf_ignored(k) for k in hf_state):
        notes.append(SIGLIP_HEAD_NOTE)
    return encoder, _meta(method, arch, img, source=source, notes=notes)


#: numpy's one-letter codes of the numeric dtypes (bool, ints, floats, complex): the only ones a
#: scalar in a checkpoint may have. Void (structured) dtypes are left out on purpose: a crafted
#: state can give one an object field that points anywhere, which numpy then dereferences.
NUMERIC_DTYPE_CODES = "?bhilqBHILQefdgFDG"


def _numpy_globals() -> list[Any]:
    """The numpy objects a training script's checkpoint pickles beside its tensors: scalars of a
    numeric dtype (e.g. a learning rate in the optimizer state, as MetaCLIP's files hold), under
    numpy 2's and numpy 1's module names (files from before 2024 name ``numpy.core``)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtypes = list(dict.fromkeys(type(np.dtype(c)) for c in NUMERIC_DTYPE_CODES))
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *dtypes]


def load_checkpoint_file(path: str | Path) -> Any:
    """A released ``.pth``/``.pt`` read with ``weights_only`` (tensors and plain containers, never
    arbitrary objects), numpy's numeric scalars allowed (``_numpy_globals``), memory-mapped. Anything
    else pickled in it is refused, naming the file and what torch refused."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: holds objects other than tensors, containers and numpy scalars, which are "
                         f"not loaded (torch.load weights_only): {_refusal(err)}") from None


def _refusal(err: Exception) -> str:
    """What torch's weights_only error says it refused (its first sentence after ``WeightsUnpickler
    error:``), on one line and without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    detail = text.partition("WeightsUnpickler error:")[2] or text
    detail = " ".join(detail.split("Check the documentation")[0].split())
    return detail.split(". ")[0] or "(no reason given)"


def import_native(path_or_state_dict: str | Path | Mapping[str, Any], method: str,
                  arch: Arch | str, img_size: int) -> tuple[WebSSLViT, dict[str, Any]]:
    """Our encoder from a released native ``.pth`` (DINOv2 backbone keys, timm keys for MAE and for
    I-JEPA's target encoder, or open_clip's for an OpenAI-CLIP ``arch``: MetaCLIP's own files).

    ``arch`` is an ``Arch`` or a released size ('7b', '700m', 'h14'…). Flat and ``block_chunks``
    layouts both load; heads in ``*_ssl_teacher.pth`` files (open_clip's text tower and projection,
    I-JEPA's context encoder and predictor) are skipped and listed in ``meta['ignored_keys']``.
    """
    if isinstance(arch, str):
        arch = arch_for(method, arch)
    if method == "siglip":
        raise ValueError(f"{path_or_state_dict if isinstance(path_or_state_dict, (str, Path)) else 'state dict'}: "
                         "SigLIP's own checkpoints are big_vision .npz files, which are not read here; give the "
                         "directory of its transformers release (a SiglipModel, e.g. google/siglip-so400m-patch14-384)")
    if isinstance(path_or_state_dict, Mapping):
        obj, source = path_or_state_dict, "state dict"
    else:
        source = str(path_or_state_dict)
        if Path(source).suffix == ".safetensors":  # most likely the weights file of a HF model directory
            raise ValueError(f"{source}: a native checkpoint is a .pth / .pt file; for a transformers model "
                             f"give its directory ({Path(source).parent}), which holds config.json")
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such checkpoint file")
        obj = load_checkpoint_file(source)
    try:
        if arch.ffn == "quick_gelu":
            state, ignored = convert.from_open_clip(obj)
            notes: list[str] = []
        else:
            state, ignored = convert.unwrap_native(obj)
            state, notes = convert.from_native(state, method)
            if method == "ijepa" and "encoder" in ignored:
                notes.append("I-JEPA's target encoder, the one I-JEPA evaluates; the file's context encoder "
                             "('encoder') and predictor are left out")
    except (TypeError, KeyError) as err:
        raise type(err)(f"{source}: {err.args[0] if err.args else err}") from None
    encoder = convert.load_into_encoder(state, method, arch, int(img_size), source=source)
    return encoder, _meta(method, arch, img_size, source=source, ignored_keys=ignored, notes=notes)
