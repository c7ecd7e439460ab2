"""Per-block tokens of a frozen encoder, and cached feature extraction for the probes.

Every classic/alignment protocol reads intermediate blocks, but each reads them differently
(DINOv2 linear: normed CLS of the last 4 blocks + avg-pooled last-block patches; depth: UN-normed
CLS + patch maps; PRH alignment: un-normed CLS of every block). One accessor serves them all:
``block_tokens`` works with any model exposing timm's ``forward_intermediates`` or with a plain
callable that returns the token sequence after every block.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from webssl_repro.files import write_json

Indices = Union[None, int, Sequence[int]]

__all__ = ["BlockTokens", "block_tokens", "resolve_indices", "extract_features",
           "pad_to_multiple", "feature_fn", "interp_matrix", "chunk_size", "model_device", "linear_features",
           "linear_files", "linear_files_intact", "encoder_fingerprint", "save_atomic", "IN_MEMORY_BYTES"]

#: Frozen features or tokens up to this size stay in memory; larger ones go to disk (features)
#: or are recomputed per batch (dense tokens).
IN_MEMORY_BYTES = 2 * 1024**3


@dataclass
class BlockTokens:
    """Tokens of the selected blocks: ``cls`` (L, B, D), ``patches`` (L, B, P, D), grid (h, w)."""

    cls: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]
    indices: list[int]

    def maps(self) -> torch.Tensor:
        """Patch tokens as spatial maps (L, B, D, h, w), the layout dense heads consume."""
        L, B, P, D = self.patches.shape
        h, w = self.grid
        return self.patches.permute(0, 1, 3, 2).reshape(L, B, D, h, w)


@functools.lru_cache(maxsize=64)
def interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear resizing, ``align_corners=False``, as ``F.interpolate``.

    Bilinear resizing of an (h, w) map to (H, W) is ``U_H @ x @ U_W.T``: two small matmuls
    whose backward is two more, where torch's CPU ``upsample_bilinear2d`` backward is a slow
    scalar kernel. Each row has at most 2 non-zeros and sums to 1. Do not modify the result
    (it is cached).
    """
    eye = torch.eye(n_in).unsqueeze(1)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False).squeeze(1).T.contiguous()


def chunk_size(per_item: int, target: int = 1 << 19) -> int:
    """Batch items per chunk so that one chunk's large intermediate has about ``target``
    elements (2 MB in float32): small enough to stay in cache, where the elementwise passes
    of the dense heads run several times faster than on a whole batch."""
    return max(1, target // max(per_item, 1))


def resolve_indices(indices: Indices, depth: int) -> list[int]:
    """timm semantics: None = all blocks, int n = last n blocks, sequence = those (negatives ok)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices} but the encoder has {depth} blocks")
        return list(range(depth - indices, depth))
    out = [i + depth if i < 0 else i for i in indices]
    if any(not 0 <= i < depth for i in out):
        raise ValueError(f"indices {list(indices)} out of range for {depth} blocks")
    return out


def _grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """Patch grid from the token count and image aspect (no patch size needed)."""
    h = round(math.sqrt(num_patches * height / width))
    w = num_patches // max(h, 1)
    if h * w != num_patches:
        raise ValueError(f"cannot lay {num_patches} patches on a {height}x{width} image")
    return h, w


def global_token(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The CLS of (B, T, D) block tokens: the class token, or for a tower without prefix tokens
    (I-JEPA's, SigLIP's) the mean of its patch tokens, the global representation I-JEPA is
    evaluated with (average pooling). ``WebSSLViT.forward_features_dict`` follows the same rule."""
    return tokens[:, 0] if num_prefix_tokens else tokens.mean(1)


def block_tokens(model: Union[nn.Module, Callable], images: torch.Tensor, indices: Indices = None,
                 norm: bool = False, num_prefix_tokens: Optional[int] = None) -> BlockTokens:
    """CLS and patch tokens after the selected blocks.

    ``norm`` applies the encoder's final norm to each block (DINOv2 linear/segmentation use
    ``norm=True``; depth and PRH alignment use the raw residual stream, ``norm=False``).
    A model without ``forward_intermediates`` must return a list with the (B, T, D) tokens after
    every block; its prefix (CLS + registers) length comes from ``num_prefix_tokens`` or the
    model's attribute (default 1), and ``norm=True`` then uses ``model.norm``. A model without
    prefix tokens gets the mean of each block's patch tokens as its CLS (``global_token``).
    """
    n_prefix = num_prefix_tokens if num_prefix_tokens is not None else \
        int(getattr(model, "num_prefix_tokens", 1))
    if hasattr(model, "forward_intermediates"):
        depth = len(model.blocks) if hasattr(model, "blocks") else None
        idx = resolve_indices(indices, depth) if depth is not None else indices
        # no prefix tokens to return for a tower without them (timm before 1.0.15 fails if asked)
        out = model.forward_intermediates(images, indices=idx, norm=norm, output_fmt="NLC",
                                          return_prefix_tokens=n_prefix > 0, intermediates_only=True)
        if n_prefix:
            patches, cls = [o[0] for o in out], [o[1][:, 0] for o in out]
        else:
            patches, cls = list(out), [global_token(o, 0) for o in out]
        idx = list(idx) if idx is not None else list(range(len(out)))
    else:
        every = list(model(images))
        idx = resolve_indices(indices, len(every))
        chosen = [every[i] for i in idx]
        if norm:
            chosen = [model.norm(t) for t in chosen]
        cls = [global_token(t, n_prefix) for t in chosen]
        patches = [t[:, n_prefix:] for t in chosen]
    grid = _grid(patches[0].shape[1], images.shape[-2], images.shape[-1])
    cls_tokens, patch_tokens = torch.stack(cls), torch.stack(patches)
    require_finite(cls_tokens, patch_tokens, idx)
    return BlockTokens(cls_tokens, patch_tokens, grid, idx)


def require_finite(cls: torch.Tensor, patches: torch.Tensor, blocks: list[int]) -> None:
    """A NaN or inf token fails the evaluation, named: the probes would turn it into a plausible
    wrong number (a NaN row's logits all argmax to class 0: a linear probe then scores the share
    of class 0, a segmentation head paints class 0), not an error."""
    bad = (~torch.isfinite(cls)).any(-1) | (~torch.isfinite(patches)).flatten(2).any(-1)  # (blocks, images)
    if bad.any():
        where = [blocks[i] for i in bad.any(1).nonzero().flatten().tolist()]
        raise FloatingPointError(f"the encoder's tokens after block(s) {where} are not finite (NaN/inf) for "
                                 f"{int(bad.any(0).sum())} of {cls.shape[1]} images: an overflow under bf16 "
                                 "autocast (evaluate.*.precision: fp32), or a checkpoint that diverged")


def block_cls(model: Union[nn.Module, Callable], images: torch.Tensor) -> torch.Tensor:
    """The un-normed CLS token after every block, (L, B, D), as ``block_tokens(model, images).cls``.

    A hook on each block keeps only its CLS, where ``forward_intermediates`` keeps every
    block's tokens for the whole batch: at ViT-7B and 518 px, 40 blocks x 1,370 tokens per image
    of which alignment reads one (the mean of them for a model without a class token, as in
    ``block_tokens``). Models without ``blocks`` and a features forward go through
    ``block_tokens``."""
    forward = getattr(model, "forward_features_dict", None) or getattr(model, "forward_features", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "blocks") or forward is None:
        return block_tokens(model, images).cls
    kept: list[torch.Tensor] = []
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))

    def keep(_module, _inputs, out):
        kept.append(global_token(out, n_prefix).clone())  # a copy: a view would hold the whole output

    hooks = [block.register_forward_hook(keep) for block in model.blocks]
    try:
        forward(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(kept)


def pad_to_multiple(images: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Centre-pad H and W up to a multiple of the patch size, as DINOv2's dense evals do."""
    H, W = images.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


def model_device(model: Union[nn.Module, Callable]) -> torch.device:
    """Where a module's weights are (CPU for a plain callable or a weightless module)."""
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next(params, torch.empty(0)).device


def feature_fn(model: nn.Module, indices: Indices, norm: bool, patch_size: int,
               autocast_dtype: Optional[torch.dtype] = None, out_device: Union[str, torch.device] = "cpu"
               ) -> Callable[[torch.Tensor], BlockTokens]:
    """Frozen, no-grad ``images -> BlockTokens`` closure for the dense heads: the encoder runs
    where its weights are (a GPU at paper scale) and returns float32 tokens on ``out_device``
    (the CPU for a token cache, the heads' device when they train on streamed tokens)."""
    model.eval().requires_grad_(False)
    device = model_device(model)

    def fn(images: torch.Tensor) -> BlockTokens:
        images = pad_to_multiple(images.to(device), patch_size)
        with torch.no_grad(), torch.autocast(images.device.type, dtype=autocast_dtype,
                                             enabled=autocast_dtype is not None):
            bt = block_tokens(model, images, indices=indices, norm=norm)
        return BlockTokens(bt.cls.float().to(out_device), bt.patches.float().to(out_device), bt.grid, bt.indices)

    return fn


def encoder_fingerprint(encoder) -> str:
    """A digest of an encoder's structure and weights: a feature cache is only reused for the
    encoder that wrote it (two evaluations sharing a work dir must not share features)."""
    import hashlib

    digest = hashlib.sha1(repr(encoder).encode())
    # the statistics a loaded encoder converts its inputs to (models.io.take_imagenet_normalised)
    digest.update(repr(getattr(encoder, "input_stats", None)).encode())
    for name, tensor in (encoder.state_dict().items() if hasattr(encoder, "state_dict") else ()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extract_features(model: Union[nn.Module, Callable], batches: Iterable, indices: Indices = None,
                     norm: bool = False, cache: Optional[Union[str, Path]] = None,
                     device: Union[str, torch.device, None] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """Run a frozen encoder over ``batches`` (images or (images, labels)) and keep compact features.

    Returns ``{"cls": (L, N, D), "avgpool": (L, N, D), "labels": (N,) or None, "indices": [...],
    "norm": bool}`` in float32 on CPU; ``avgpool`` is the mean of each block's patch tokens. If
    ``cache`` exists with the same ``indices``/``norm`` from the same encoder it is loaded instead (the probes train many
    epochs on the same frozen features, so the encoder runs once); otherwise it is written there.
    """
    requested = indices if indices is None or isinstance(indices, int) else list(indices)
    fingerprint = encoder_fingerprint(model) if cache is not None else None
    if cache is not None and Path(cache).exists():
        data = torch.load(cache, map_location="cpu", weights_only=False)
        if data.get("norm") == norm and data.get("requested") == requested and data.get("encoder") == fingerprint:
            return data
    if isinstance(model, nn.Module):
        model.eval()
    device = model_device(model) if device is None else device
    cls, avg, labels, idx = [], [], [], None
    with torch.no_grad():
        for batch in batches:
            images, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
            images = images.to(device)
            with torch.autocast(images.device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                bt = block_tokens(model, images, indices=indices, norm=norm)
            idx = bt.indices
            cls.append(bt.cls.float().cpu())
            avg.append(bt.patches.float().mean(dim=2).cpu())
            if y is not None:
                labels.append(torch.as_tensor(y).cpu())
    if not cls:
        raise ValueError("batches is empty")
    data = {"cls": torch.cat(cls, dim=1), "avgpool": torch.cat(avg, dim=1),
            "labels": torch.cat(labels) if labels else None, "indices": idx, "norm": norm,
            "requested": requested, "encoder": fingerprint}
    if cache is not None:
        save_atomic(data, cache)
    return data


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` through ``files.atomic_write``: a file that other jobs read (the LM
    features of the alignment jobs, cached tokens) is never read half-written."""
    from webssl_repro.files import atomic_write

    atomic_write(path, lambda f: torch.save(obj, f))


def linear_features(model: nn.Module, batches: Iterable, n_items: int, n_blocks: int,
                    scratch: Optional[Union[str, Path]] = None,
                    autocast_dtype: Optional[torch.dtype] = None, *,
                    files: Optional[tuple[Union[str, Path], int]] = None,
                    after_batch: Optional[Callable[[int, Callable[[], None]], None]] = None) -> dict:
    """The linear probe's inputs for a whole split: normed CLS of the last ``n_blocks`` blocks
    and the last block's mean patch token, written by sample index from ``batches`` of
    (indices, images, labels).

    Returns ``{"cls": (n_blocks, N, D), "avgpool": (N, D), "labels": (N,)}`` like
    ``extract_features``, but only what the DINOv2 grid reads, preallocated: float32 in memory
    up to ``IN_MEMORY_BYTES``, else float16 in a memory-mapped file under ``scratch`` (ImageNet
    at ViT-7B width: 1.28M x 5 x 4096 values, 52 GB), which the probe reads batch by batch.
    The store is sample-major, (N, n_blocks + 1, D), with ``cls`` and ``avgpool`` views of it:
    a batch is written as one run of bytes, and each sample the probe draws at random is one
    read of 40 KB at 7B rather than five scattered ones.
    With ``files=(directory, D)`` they are always memory-mapped files there (``linear_files``),
    and whole files of that shape already there are written on: a pass stopped after its first
    rows continues with in-order ``batches`` of the rest. ``after_batch(batches done, flush)``
    follows each batch; ``flush()`` makes the rows written so far durable, as the end of the
    pass does.
    """
    model.eval()
    device = model_device(model)
    store = labels = None
    flush: Callable[[], None] = _nothing
    if files is not None:
        store, labels, flush = linear_files(files[0], (n_items, n_blocks + 1, int(files[1])), resume=True)
    done = 0
    with torch.no_grad():
        for idx, images, y in batches:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                bt = block_tokens(model, images.to(device), indices=n_blocks, norm=True)
            rows = torch.cat([bt.cls.float(), bt.patches[-1:].float().mean(dim=2)]).cpu()  # (n+1, B, D)
            if store is None:
                shape = (n_items, n_blocks + 1, rows.shape[-1])
                if _fits_in_memory(shape):
                    store, labels = torch.empty(shape), torch.full((n_items,), -1, dtype=torch.long)
                elif scratch is None:
                    raise ValueError(f"features of {n_items} images need {2 * math.prod(shape) / 1e9:.1f} GB "
                                     "on disk: pass a scratch directory")
                else:
                    store, labels, flush = linear_files(scratch, shape)
            elif rows.shape[-1] != store.shape[-1]:
                raise ValueError(f"the encoder's features are {rows.shape[-1]} wide, the store {store.shape[-1]}")
            store[idx] = rows.transpose(0, 1).to(store.dtype)
            labels[idx] = torch.as_tensor(y).long()
            done += 1
            if after_batch is not None:
                after_batch(done, flush)
    if store is None:
        raise ValueError("batches is empty")
    flush()
    if (labels < 0).any():
        raise ValueError(f"batches covered {int((labels >= 0).sum())} of {n_items} images")
    return {"cls": store[:, :n_blocks].transpose(0, 1), "avgpool": store[:, n_blocks], "labels": labels}


def _nothing() -> None:
    pass


def linear_files_intact(directory: Union[str, Path], shape: tuple[int, int, int]) -> bool:
    """Whether ``directory`` holds whole files of ``shape`` as ``linear_files`` makes them (what
    a stopped pass continues on, or a finished one is read back from)."""
    directory = Path(directory)
    try:
        header = json.loads((directory / "shape.json").read_text())
    except (OSError, ValueError):
        return False
    name, dtype = _store_file(shape)
    path, labels = directory / name, directory / "labels.i64"
    return (header == {"shape": list(shape), "file": name} and path.exists() and labels.exists()
            and path.stat().st_size == dtype().itemsize * math.prod(shape)
            and labels.stat().st_size == 8 * shape[0])


def _fits_in_memory(shape: tuple[int, int, int]) -> bool:
    return 4 * math.prod(shape) <= IN_MEMORY_BYTES


def _store_file(shape: tuple[int, int, int]) -> tuple[str, type]:
    """The features file's name and numpy dtype: float32 where the in-memory store would hold
    them (the numbers do not depend on where they are), float16 beyond."""
    import numpy as np

    return ("linear_features.f32", np.float32) if _fits_in_memory(shape) else ("linear_features.f16", np.float16)


def linear_files(directory: Union[str, Path], shape: tuple[int, int, int], resume: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, Callable[[], None]]:
    """Memory-mapped (N, n_blocks + 1, D) features and (N,) labels in ``directory``: float32
    up to ``IN_MEMORY_BYTES``, else float16, and a ``flush()`` that writes their dirty pages
    (``msync``). New files are created (labels -1: not written yet), unless ``resume`` finds
    whole ones of ``shape`` there (``linear_files_intact``) to write on."""
    import numpy as np

    directory, (name, dtype) = Path(directory), _store_file(shape)
    fresh = not (resume and linear_files_intact(directory, shape))
    if fresh:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "shape.json", {"shape": list(shape), "file": name})
    store = np.memmap(directory / name, dtype=dtype, mode="w+" if fresh else "r+", shape=shape)
    labels = np.memmap(directory / "labels.i64", dtype=np.int64, mode="w+" if fresh else "r+", shape=(shape[0],))
    if fresh:
        labels[:] = -1

    def flush() -> None:
        store.flush()
        labels.flush()

    return torch.from_numpy(store), torch.from_numpy(labels), flush
