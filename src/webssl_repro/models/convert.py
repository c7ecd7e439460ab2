"""Key layouts of the released Web-SSL checkpoints, mapped onto our timm-based encoder.

Three layouts exist besides ours: DINOv2's native backbone (``mlp.w12``/``w3``, optionally
``blocks.{chunk}.{i}`` from ``block_chunks=4``), timm's (Web-MAE native: identical to ours) and
the two generations of transformers' ``Dinov2Model`` / ``ViTModel`` naming (4.x, in which the
Hugging Face repos were uploaded: ``attention.attention.query``, fused ``mlp.weights_in``; 5.x:
``q_proj``, split ``gate_proj``/``up_proj``). Everything is a rename plus a split or
concatenation along dim 0, so a round trip is exact. Off-the-shelf OpenAI-CLIP towers (MetaCLIP)
come in transformers' ``CLIPVisionModel`` and open_clip's naming, SigLIP's in ``SiglipVisionModel``'s;
they are read, never written.
Mismatches raise ``KeyError`` naming the keys, because a silently half-loaded encoder would only
show up as bad eval numbers.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from webssl_repro.models.vit import Arch, WebSSLViT, build_encoder

Tensor = torch.Tensor

# ---- building an encoder from a state dict in our layout ---------------------------------


def load_into_encoder(state: Mapping[str, Tensor], method: str, arch: Arch, img_size: int, *,
                      source: str, dtype: torch.dtype = torch.float32) -> WebSSLViT:
    """Build ``method``'s tower on the meta device and adopt ``state`` (our key layout).

    Meta-device construction skips the random init, which at 7B is most of the load time; the
    tensors are assigned, not copied. Keys and shapes are checked first so the error names the
    offending checkpoint key instead of a bare size mismatch deep inside torch.
    """
    with torch.device("meta"):
        encoder = build_encoder(arch, method, img_size=img_size)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: checkpoint does not fit a {method} encoder {arch}: "
                       f"{len(missing)} missing key(s) {_few(missing)}, {len(unexpected)} unexpected {_few(unexpected)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            hint = ""
            if key == "pos_embed":
                side, grid = round((state[key].shape[1] - int(arch.class_token)) ** 0.5), img_size // arch.patch
                sizes = f"{side * arch.patch}-{(side + 1) * arch.patch - 1}"  # SigLIP's 384 px gives 27 x 27 at 14
                hint = (f" (the checkpoint's positions are a {side}x{side} patch grid, that of img_size {sizes}; "
                        f"img_size={img_size} gives {grid}x{grid})")
            raise KeyError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, "
                           f"expected {shape}{hint}")
    encoder.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()},
                            strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


def _few(keys: list[str], n: int = 8) -> str:
    """A key list short enough to read: a 7B checkpoint of the wrong size misses thousands."""
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return f"[{', '.join(keys[:n])}{more}]"


def _split(t: Tensor, n: int) -> list[Tensor]:
    # clone: safetensors refuses tensors that share storage
    return [p.clone() for p in t.chunk(n, dim=0)]


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# ---- DINOv2 native backbone ----------------------------------------------------------------

_NATIVE_MLP = {"mlp.fc1": "mlp.w12", "mlp.fc2": "mlp.w3"}
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def _block_parts(key: str, chunked: bool = False) -> tuple[int, str, str] | None:
    """(block index, module, parameter) of a block key, None for keys outside the blocks.
    ``chunked`` also reads DINOv2's ``blocks.{chunk}.{i}.…`` (BlockChunk) naming."""
    m = _CHUNKED.match(key) if chunked else None
    if m is not None:
        i, rest = int(m[2]), m[3]
    else:
        m = _BLOCK.match(key)
        if m is None:
            return None
        i, rest = int(m[1]), m[2]
    module, _, param = rest.rpartition(".")
    return i, module, param


def to_native(state: Mapping[str, Tensor], method: str, *, block_chunks: int = 0,
              depth: int | None = None) -> dict[str, Tensor]:
    """Our state dict in the released native layout: DINOv2 keys for dino/clip, timm's for mae.

    ``block_chunks>0`` reproduces DINOv2's ``BlockChunk`` naming ``blocks.{chunk}.{i}`` (``i``
    stays the global index, as DINOv2 pads each chunk with Identity modules).
    """
    if method in ("mae", "ijepa"):
        return dict(state)
    chunk = 0
    if block_chunks:
        if depth is None:
            raise ValueError("block_chunks needs the depth to compute the chunk size")
        chunk = depth // block_chunks
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = _block_parts(key)
        if parts is None:
            out[key] = value
            continue
        i, module, param = parts
        rest = f"{_NATIVE_MLP.get(module, module)}.{param}"
        out[f"blocks.{i // chunk}.{i}.{rest}" if chunk else f"blocks.{i}.{rest}"] = value
    return out


_NATIVE_PREFIXES = ("", "module.", "backbone.", "teacher.backbone.", "model.", "encoder.")


def _unwrap(obj: Any, wrappers: tuple[str, ...], expected: str) -> tuple[Mapping[str, Tensor], list[str]]:
    """The state dict under the first of ``wrappers`` a checkpoint has (or the checkpoint itself), and
    the keys beside that wrapper (an epoch, an optimizer…), which are not loaded."""
    beside: list[str] = []
    for wrapper in wrappers:
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            beside = sorted(str(k) for k in obj if k != wrapper)
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TypeError(f"expected {expected}")
    return obj, beside


def unwrap_native(obj: Any) -> tuple[dict[str, Tensor], list[str]]:
    """The backbone state dict inside a .pth and the keys left out of it.

    Handles a ``{"model"|"teacher"|"target_encoder"|"state_dict": ...}`` wrapper and a key prefix such as the
    ``backbone.`` of DINOv2's ``*_ssl_teacher.pth`` files, whose DINO/iBOT heads are not part of
    the encoder and are returned as ignored, as are the wrapper's siblings (an optimizer, I-JEPA's
    context encoder and predictor).
    """
    # "target_encoder": I-JEPA's files, which hold its context encoder ("encoder") and predictor too
    obj, beside = _unwrap(obj, ("model", "teacher", "target_encoder", "state_dict", "module"),
                          "a state dict (name -> tensor) or a known checkpoint wrapper")
    for prefix in _NATIVE_PREFIXES:
        if f"{prefix}pos_embed" in obj:
            break
    else:
        raise KeyError("no 'pos_embed' key under any known prefix "
                       f"{list(_NATIVE_PREFIXES)}: not a ViT backbone checkpoint")
    state = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    ignored = sorted(k for k in obj if not k.startswith(prefix))
    return state, [*beside, *ignored]


def from_native(state: Mapping[str, Tensor], method: str) -> tuple[dict[str, Tensor], list[str]]:
    """Native (DINOv2 / timm) keys → ours, plus notes on what had to be filled in.

    xFormers' unpacked SwiGLU (``w1``, ``w2``) is concatenated into our packed ``fc1``. A missing
    ``mask_token`` (the released files are loaded with ``strict=False``) becomes zeros: it only
    matters for iBOT masking during pretraining, never at inference.
    """
    notes: list[str] = []
    if method in ("mae", "ijepa"):  # timm's layout, as ours
        return dict(state), notes
    out: dict[str, Tensor] = {}
    pending: dict[int, dict[str, Tensor]] = {}
    inverse = {v: k for k, v in _NATIVE_MLP.items()}
    for key, value in state.items():
        parts = _block_parts(key, chunked=True)
        if parts is None:
            out[key] = value
            continue
        i, module, param = parts
        if module in ("mlp.w1", "mlp.w2"):
            pending.setdefault(i, {})[f"{module}.{param}"] = value
            continue
        out[f"blocks.{i}.{inverse.get(module, module)}.{param}"] = value
    for i, parts in pending.items():
        for param in ("weight", "bias"):
            w1, w2 = parts.get(f"mlp.w1.{param}"), parts.get(f"mlp.w2.{param}")
            if w1 is None or w2 is None:
                raise KeyError(f"block {i}: unpacked SwiGLU needs both mlp.w1.{param} and "
                               f"mlp.w2.{param}")
            out[f"blocks.{i}.mlp.fc1.{param}"] = torch.cat([w1, w2], dim=0)
    if method == "dino" and "mask_token" not in out and "pos_embed" in out:
        out["mask_token"] = torch.zeros(1, out["pos_embed"].shape[-1], dtype=out["pos_embed"].dtype)
        notes.append("mask_token absent from checkpoint: set to zeros (unused at inference)")
    if method == "clip":
        out.pop("mask_token", None)
    return out, notes


# ---- transformers Dinov2Model / ViTModel -----------------------------------------------------

_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
        "mask_token": "embeddings.mask_token", "patch_embed.proj": "embeddings.patch_embeddings.projection",
        "norm": "layernorm"}
_QKV_NEW = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_QKV_OLD = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_LS = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
#: (model kind, legacy 4.x naming?) -> (block prefix, our block module -> HF module or parts)
HF_LAYOUTS: dict[tuple[str, bool], tuple[str, dict[str, str | tuple[str, ...]]]] = {
    ("dinov2", False): ("encoder.layer.", {
        "norm1": "norm1", "attn.qkv": _QKV_NEW, "attn.proj": "attention.o_proj", "norm2": "norm2",
        "mlp.fc1": ("mlp.gate_proj", "mlp.up_proj"), "mlp.fc2": "mlp.down_proj", **_LS}),
    ("dinov2", True): ("encoder.layer.", {
        "norm1": "norm1", "attn.qkv": _QKV_OLD, "attn.proj": "attention.output.dense", "norm2": "norm2",
        "mlp.fc1": "mlp.weights_in", "mlp.fc2": "mlp.weights_out", **_LS}),
    ("vit", False): ("layers.", {
        "norm1": "layernorm_before", "attn.qkv": _QKV_NEW, "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}),
    ("vit", True): ("encoder.layer.", {
        "norm1": "layernorm_before", "attn.qkv": _QKV_OLD, "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}),
}
# MAE's own HF release (``ViTMAEModel``) and I-JEPA's (``IJepaModel``, without a class token) name their
# encoder's weights as ``ViTModel`` does, in both generations.
HF_LAYOUTS.update({(kind, legacy): HF_LAYOUTS[("vit", legacy)] for kind in ("vit_mae", "ijepa")
                   for legacy in (False, True)})
# ``CLIPVisionModel`` and ``SiglipVisionModel`` (one naming in both generations; 4.x nests them under
# ``vision_model.``)
HF_LAYOUTS.update({(kind, legacy): ("encoder.layers.", {
    "norm1": "layer_norm1", "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for kind in ("clip_vision_model", "siglip_vision_model") for legacy in (False, True)})
#: non-block names of the kinds that differ from ``_TOP``: CLIP keeps its cls token and position
#: embeddings without the batch dimension (``_unbatched``), and has a LayerNorm before the blocks;
#: SigLIP has no cls token and no LayerNorm before the blocks
_TOPS = {"clip_vision_model": {
    "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding.weight",
    "patch_embed.proj": "embeddings.patch_embedding", "norm_pre": "pre_layrnorm", "norm": "post_layernorm"},
    "siglip_vision_model": {
    "pos_embed": "embeddings.position_embedding.weight", "patch_embed.proj": "embeddings.patch_embedding",
    "norm": "post_layernorm"}}
#: HF-only parameters that are not part of our encoder: ViT's tanh pooler head and SigLIP's
#: attention-pooling (MAP) head, both over the final tokens, which the evaluations read themselves.
HF_IGNORED = re.compile(r"^(pooler|head)\.")


def hf_ignored(key: str) -> bool:
    """Whether a HF key is one of ``HF_IGNORED``'s heads, also under 4.x's ``vision_model.`` nesting."""
    return HF_IGNORED.match(key.removeprefix("vision_model.")) is not None


def hf_is_legacy(keys: Any) -> bool:
    """Whether HF keys use the transformers 4.x names (those of the uploaded repos)."""
    return any(".attention.attention." in k for k in keys)


def _hf_param(table: Mapping[str, Any], our: str) -> tuple[Any, str]:
    """HF target(s) of one of our block parameters, e.g. 'attn.qkv.weight'."""
    if our in table:  # whole-parameter renames (LayerScale gamma -> lambda1)
        target = table[our]
        return target, ""
    module, _, param = our.rpartition(".")
    if module not in table:
        raise KeyError(f"no HF counterpart for encoder parameter {our!r}")
    return table[module], "." + param


def _rename_top(key: str, table: Mapping[str, str], error: str) -> str:
    """A non-block key through ``table``, matched whole or by its module (``norm.weight``)."""
    if key in table:
        return table[key]
    module, _, param = key.rpartition(".")
    if module in table:
        return f"{table[module]}.{param}"
    raise KeyError(error)


def to_hf(state: Mapping[str, Tensor], kind: str, *, legacy: bool = False) -> dict[str, Tensor]:
    """Our state dict renamed for ``Dinov2Model`` (kind 'dinov2') or ``ViTModel`` ('vit')."""
    if kind in _TOPS:
        raise ValueError(f"encoders are exported as 'dinov2' or 'vit' models, not {kind!r}")
    prefix, table = HF_LAYOUTS[(kind, legacy)]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m is None:
            out[_rename_top(key, _TOP, f"no HF counterpart for encoder parameter {key!r}")] = value
            continue
        base = f"{prefix}{m[1]}."
        target, param = _hf_param(table, m[2])
        if isinstance(target, tuple):
            for name, part in zip(target, _split(value, len(target))):
                out[f"{base}{name}{param}"] = part
        else:
            out[f"{base}{target}{param}"] = value
    return out


def from_hf(state: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """HF ``Dinov2Model`` / ``ViTModel`` / ``ViTMAEModel`` / ``IJepaModel`` / ``CLIPVisionModel`` /
    ``SiglipVisionModel`` keys (either naming generation) → ours.

    Split parameters (q/k/v, gate/up) are concatenated back in our packed order; a key that
    maps to nothing, or a part missing from a split parameter, raises ``KeyError`` naming it.
    """
    if kind in _TOPS:
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    prefix, table = HF_LAYOUTS[(kind, hf_is_legacy(state))]
    inverse: dict[str, tuple[str, int, int]] = {}
    for ours, target in table.items():
        parts = target if isinstance(target, tuple) else (target,)
        for j, name in enumerate(parts):
            inverse[name] = (ours, j, len(parts))
    top = {v: k for k, v in _TOPS.get(kind, _TOP).items()}
    block = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    gathered: dict[str, tuple[list[Tensor | None], list[str]]] = {}
    for key, value in state.items():
        if hf_ignored(key):
            continue
        m = block.match(key)
        if m is None:
            out[_rename_top(key, top, f"unexpected key {key!r} in a HF {kind} checkpoint")] = value
            continue
        rest = m[2]
        if rest in inverse:
            hit, param = inverse[rest], ""
        else:
            module, _, param = rest.rpartition(".")
            if module not in inverse:
                raise KeyError(f"unexpected key {key!r} in a HF {kind} checkpoint")
            hit, param = inverse[module], "." + param
        ours, j, n = hit
        target = table[ours] if isinstance(table[ours], tuple) else (table[ours],)
        slots, _ = gathered.setdefault(f"blocks.{m[1]}.{ours}{param}", (
            [None] * n, [f"{prefix}{m[1]}.{t}{param}" for t in target]))
        slots[j] = value
    for our_key, (parts, expected) in gathered.items():
        lost = [name for name, p in zip(expected, parts) if p is None]
        if lost:
            raise KeyError(f"missing key(s) {lost} of a split parameter in a HF {kind} checkpoint")
        out[our_key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if kind in ("vit", "vit_mae", "ijepa"):
        out.pop("mask_token", None)  # ViTModel's optional mask token is (1, 1, D) and unused by MAE
    return _unbatched(out) if kind in _TOPS else out


def _unbatched(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI CLIP's (D,) class embedding and (N+1, D) position embeddings (SigLIP's (N, D)) as our
    (1, 1, D) and (1, N+1, D) (SigLIP's (1, N, D)); a key that is not there is left for
    ``load_into_encoder`` to name."""
    for key in ("cls_token", "pos_embed"):
        if key in state:
            state[key] = state[key].reshape(1, -1, state[key].shape[-1])
    return state


# ---- open_clip (MetaCLIP's own .pt files) ----------------------------------------------------

_OPEN_CLIP_TOP = {"class_embedding": "cls_token", "positional_embedding": "pos_embed",
                  "conv1.weight": "patch_embed.proj.weight", "ln_pre": "norm_pre", "ln_post": "norm"}
_OPEN_CLIP_BLOCK = {"ln_1": "norm1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "norm2",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")


def from_open_clip(obj: Any) -> tuple[dict[str, Tensor], list[str]]:
    """The image tower of an open_clip checkpoint (``visual.*``, optionally under ``state_dict``
    and DDP's ``module.``) in our layout, and the keys left out: the text tower, ``logit_scale``
    and ``visual.proj``, the projection into the joint embedding space, which is not part of
    the encoder's tokens. ``attn.in_proj_weight`` is q, k, v stacked as our ``attn.qkv``."""
    obj, beside = _unwrap(obj, ("state_dict",), "an open_clip state dict (name -> tensor), or one under 'state_dict'")
    prefix = next((p for p in ("", "module.") if f"{p}visual.positional_embedding" in obj), None)
    if prefix is None:
        raise KeyError("no 'visual.positional_embedding' key (nor 'module.visual.…'): not an open_clip "
                       "ViT checkpoint")
    visual = f"{prefix}visual."
    out: dict[str, Tensor] = {}
    ignored = sorted(k for k in obj if not k.startswith(visual) or k == f"{visual}proj")
    for key, value in obj.items():
        if key in ignored:
            continue
        name = key[len(visual):]
        m = _RESBLOCK.match(name)
        if m is not None and m[2] in _OPEN_CLIP_BLOCK:
            out[f"blocks.{m[1]}.{_OPEN_CLIP_BLOCK[m[2]]}.{m[3]}"] = value
            continue
        try:
            out[_rename_top(name, _OPEN_CLIP_TOP, "")] = value
        except KeyError:
            raise KeyError(f"unexpected key {key!r} in an open_clip checkpoint (LayerScale, attention pooling "
                           "or another tower than OpenAI CLIP's)") from None
    return _unbatched(out), [*beside, *ignored]

