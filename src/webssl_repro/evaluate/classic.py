"""Classic vision of a frozen encoder on the eval sets: IN-1k linear, ADE20K lin./+ms, NYUd lin.1/lin.4.

Images are evaluated at the encoder's pretraining resolution (paper App. A), resized from
the eval set's render size; masks and depth maps follow with nearest / bilinear resizing.
Every probe follows the DINOv2 protocol of its module; the sizes of the probe training
(epochs, iterations, learning-rate grid) come from the config, smaller at mini scale.

Cost: the encoder is frozen and the probes train without augmentation, so every image's
tokens are computed once per split (and per "+ms" scale at test time) and all heads of a
task train together on the cached tokens (the linear grid, lin./+ms, lin.1/lin.4), each
exactly as it would alone. The dense heads never keep their largest tensor (logits
upsampled to the mask / x4 depth grid): it is built in cache-sized chunks and rebuilt in
the backward pass (``segmentation.upsampled_ce``, ``depth.upsampled_bins_to_depth``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from webssl_repro.evaluate.features import BlockTokens, extract_features, feature_fn
from webssl_repro.evaluate.linear import DINOV2_LRS, linear_probe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "linear": {"epochs": 10, "epoch_length": 1250, "lrs": list(DINOV2_LRS)},
    # Dense heads: DINOv2's global batch, 2 images/GPU x 8 GPUs (ADE20K mmseg config, NYUd
    # depther); the top-level batch_size only chunks the frozen encoder's forward passes.
    # img_size: None = the pretraining resolution (see ``dense_size``).
    "segmentation": {"iters": 40000, "lr": 1e-3, "warmup": 1500, "batch_size": 16, "img_size": None},
    # sig_warmup: iterations of SigLoss's mean-only warm-up (DINOv2 warm_iter=100).
    "depth": {"iters": 38400, "lr": 1e-4, "warmup": 12800, "sig_warmup": 100, "batch_size": 16, "img_size": None},
    "seed": 0,
}


def dense_size(task_cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
    """Input size of a dense task. DINOv2 evaluates ADE20K / NYUd at their own resolution
    (512 px crops, not the 224 px of pretraining), so a task's ``img_size`` may set it; the
    encoder interpolates its position embeddings. Default: the pretraining resolution."""
    size = task_cfg.get("img_size")
    if size is None:
        return int(meta["img_size"])
    patch = int(meta["patch"])
    if int(size) % patch:
        raise ValueError(f"evaluate.classic img_size {size} is not a multiple of the encoder's patch {patch}")
    return int(size)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise KeyError(f"evaluate.classic: unknown key {key!r} (known: {sorted(base)})")
        out[key] = _merge(base[key], value) if isinstance(base[key], dict) else value
    return out


def classic_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` (an ``evaluate.classic`` section) over DEFAULTS: what each task function reads."""
    return _merge(DEFAULTS, cfg or {})


def load_split(manifest_path: str | Path, split: str) -> list[dict[str, Any]]:
    from webssl_repro.data.evalsets import load_evalset

    manifest = json.loads(Path(manifest_path).read_text())
    if manifest.get("source") == "hf":  # paper scale: ImageNet-1k, ADE20K, NYUd, WIT-1024
        from webssl_repro.data.real_evalsets import load_hf_split

        return load_hf_split(manifest, split)
    try:
        (rel,) = manifest["splits"][split].values()
    except (KeyError, ValueError):
        raise ValueError(f"{manifest_path}: no single '{split}' split in {manifest.get('splits')}") from None
    return load_evalset(str(Path(manifest_path).parent / rel))


def _square(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, size, size); real eval sets (ImageNet, ADE20K, NYUd) mix image sizes."""
    if t.shape[-2:] == (size, size):
        return t
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(t.unsqueeze(0), size=(size, size), mode=mode, **extra).squeeze(0)


def images_tensor(records: list[dict[str, Any]], size: int) -> torch.Tensor:
    x = torch.stack([_square(torch.from_numpy(np.asarray(r["image"].convert("RGB"), dtype=np.float32) / 255.0)
                             .permute(2, 0, 1), size, "bicubic").clamp(0, 1) for r in records])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _targets(records: list[dict[str, Any]], key: str, size: int, mode: str) -> torch.Tensor:
    return torch.stack([_square(torch.from_numpy(np.asarray(r[key], dtype=np.float32)).unsqueeze(0), size, mode)
                        .squeeze(0) for r in records])


def segmentation_classes(manifest: str | Path) -> int:
    """Classes of a segmentation eval set: its manifest's ``n_classes`` (ADE20K: 150), else
    the mini-web world's (background, 16 objects and 3 text carriers)."""
    from webssl_repro.data.miniweb.world import SEG_CLASSES

    return int(json.loads(Path(manifest).read_text()).get("n_classes", len(SEG_CLASSES)))


CACHE_LIMIT_BYTES = 2 * 1024**3


class TokenCache:
    """Frozen block tokens of a whole training set, indexed by sample ids.

    The dense probes train without augmentation on a frozen encoder, so the encoder's
    output for an image never changes: computing it once instead of every iteration is
    the same training at a fraction of the cost. Used when the tokens fit in memory
    (``fits``: mini scale); larger sets stream images through the encoder per batch instead.
    """

    def __init__(self, fn, images: torch.Tensor, batch: int) -> None:
        parts = [fn(images[i:i + batch]) for i in range(0, len(images), batch)]
        self.cls = torch.cat([p.cls for p in parts], dim=1)
        self.patches = torch.cat([p.patches for p in parts], dim=1)
        self.grid, self.indices = parts[0].grid, parts[0].indices

    def __call__(self, idx: torch.Tensor) -> BlockTokens:
        return BlockTokens(self.cls[:, idx], self.patches[:, idx], self.grid, self.indices)

    @staticmethod
    def fits(encoder, n_images: int, img_size: int, patch: int, n_layers: int) -> bool:
        tokens = (img_size // patch) ** 2 + 1
        return n_images * n_layers * tokens * encoder.embed_dim * 4 < CACHE_LIMIT_BYTES


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int,
             by_index: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            yield (idx if by_index else x[idx]), y[idx]


def _chunks(x: torch.Tensor, y: torch.Tensor, batch: int):
    for i in range(0, len(x), batch):
        yield x[i:i + batch], y[i:i + batch]


def classification(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    size, batch = int(meta["img_size"]), int(cfg["batch_size"])
    feats = {}
    for split in ("train", "val"):
        records = load_split(manifest, split)
        x = images_tensor(records, size)
        y = torch.tensor([int(r["label"]) for r in records])
        feats[split] = extract_features(encoder, _chunks(x, y, batch), indices=min(4, meta["depth"]), norm=True)
    n_classes = int(max(feats["train"]["labels"].max(), feats["val"]["labels"].max())) + 1
    lin = cfg["linear"]
    result = linear_probe(feats["train"], feats["val"], n_classes, n_last_blocks=(1, min(4, meta["depth"])),
                          lrs=lin["lrs"], batch_size=min(128, len(feats["train"]["labels"])),
                          epochs=int(lin["epochs"]), epoch_length=int(lin["epoch_length"]), seed=int(cfg["seed"]))
    setting = result.setting
    return {"in1k_linear": float(result.top1),  # already a percentage
            "_in1k_linear_setting": {"n_last_blocks": setting.n_last_blocks, "avgpool": setting.avgpool,
                                     "lr": setting.lr}}


def _cached_tokens(encoder, meta, x: torch.Tensor, indices, norm: bool, batch: int) -> TokenCache:
    """Frozen tokens of every image in ``x`` for the blocks ``indices``, computed once."""
    return TokenCache(feature_fn(encoder, indices, norm=norm, patch_size=int(meta["patch"])), x, batch)


def segmentation(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ADE20K-protocol "lin." (last block) and "+ms" (last 4 blocks, multi-scale + flip TTA).

    Both heads train on the same cached frozen maps (the encoder runs once over the training
    set, not once per iteration) and in one loop (``train_seg_heads``): each head's training is
    the one it would have alone, with the same seeded batches and initialisation.
    """
    from webssl_repro.evaluate.segmentation import (LinearSegHead, mean_iou, predict,
                                                    train_seg_heads)

    batch, seg, seed = int(cfg["batch_size"]), cfg["segmentation"], int(cfg["seed"])
    size = dense_size(seg, meta)
    train, val = load_split(manifest, "train"), load_split(manifest, "val")
    x_tr, y_tr = images_tensor(train, size), _targets(train, "seg", size, "nearest").long()
    x_va, y_va = images_tensor(val, size), _targets(val, "seg", size, "nearest").long()
    n_classes, n_ms = segmentation_classes(manifest), min(4, int(meta["depth"]))
    specs = (("ade20k_linear", 1, False), ("ade20k_ms", n_ms, True))
    fn = feature_fn(encoder, n_ms, norm=True, patch_size=int(meta["patch"]))
    bs = min(int(seg["batch_size"]), len(x_tr))
    if not TokenCache.fits(encoder, len(x_tr), size, int(meta["patch"]), 2 * n_ms):  # cache + block-major copy
        return _segmentation_streaming(encoder, fn, specs, n_classes, seg, seed, bs, batch, x_tr, y_tr, x_va, y_va)
    tr = TokenCache(fn, x_tr, batch)
    L, N, P, D = tr.patches.shape
    maps_tr = tr.patches.permute(1, 0, 3, 2).reshape(N, L * D, *tr.grid)  # block-major channels
    del tr
    heads = []
    for _, n_layers, _ in specs:
        torch.manual_seed(seed)
        heads.append(LinearSegHead(encoder.embed_dim, n_classes, n_layers=n_layers))
    train_seg_heads(heads, maps_tr, y_tr,
                    _batches(x_tr, y_tr, bs, seed, by_index=True),
                    iters=int(seg["iters"]), lr=float(seg["lr"]), warmup=int(seg["warmup"]))
    out = {}
    va = TokenCache(fn, x_va, batch)
    maps_va = va.patches.permute(1, 0, 3, 2).reshape(len(x_va), L * D, *va.grid)
    for (name, _, multiscale), head in zip(specs, heads):
        head.eval()
        with torch.no_grad():
            if multiscale:
                preds = torch.cat([predict(head, fn, xb, multiscale=True) for xb, _ in _chunks(x_va, y_va, batch)])
            else:
                logits = head.forward_concat(maps_va)
                preds = F.interpolate(logits, size=y_va.shape[-2:], mode="bilinear",
                                      align_corners=False).argmax(dim=1)
        out[name] = 100.0 * mean_iou(preds, y_va, n_classes)
    return out


def _segmentation_streaming(encoder, fn, specs, n_classes, seg, seed, bs, batch, x_tr, y_tr, x_va, y_va):
    """Each head trained alone with the encoder in the loop (sets whose tokens do not fit)."""
    from webssl_repro.evaluate.segmentation import LinearSegHead, mean_iou, predict, train_segmentation

    out = {}
    for name, n_layers, multiscale in specs:
        torch.manual_seed(seed)
        head = LinearSegHead(encoder.embed_dim, n_classes, n_layers=n_layers)
        train_segmentation(head, fn, _batches(x_tr, y_tr, bs, seed), iters=int(seg["iters"]), lr=float(seg["lr"]),
                           warmup=int(seg["warmup"]))
        head.eval()
        with torch.no_grad():
            preds = torch.cat([predict(head, fn, xb, multiscale=multiscale) for xb, _ in _chunks(x_va, y_va, batch)])
        out[name] = 100.0 * mean_iou(preds, y_va, n_classes)
    return out


def depth(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """NYUd-protocol lin.1 (last block) and lin.4 (4 evenly spaced blocks), RMSE on val.

    The encoder runs once over the union of both heads' blocks; both heads then train jointly
    on the cached tokens (``train_depth_heads``), each exactly as it would alone.
    """
    from webssl_repro.evaluate.depth import DepthLinearHead, lin4_blocks, rmse, train_depth_heads

    batch, dep, seed = int(cfg["batch_size"]), cfg["depth"], int(cfg["seed"])
    size = dense_size(dep, meta)
    train, val = load_split(manifest, "train"), load_split(manifest, "val")
    x_tr, d_tr = images_tensor(train, size), _targets(train, "depth", size, "bilinear")
    x_va, d_va = images_tensor(val, size), _targets(val, "depth", size, "bilinear")
    max_depth = float(max(d_tr.max(), d_va.max()))
    specs = (("nyud_lin1", [int(meta["depth"]) - 1]), ("nyud_lin4", lin4_blocks(int(meta["depth"]))))
    blocks = sorted({b for _, bl in specs for b in bl})
    bs = min(int(dep["batch_size"]), len(x_tr))
    # the cache holds the union of blocks, and each head's concatenation once more
    if not TokenCache.fits(encoder, len(x_tr), size, int(meta["patch"]), len(blocks) + len(specs[-1][1]) + 1):
        return _depth_streaming(encoder, meta, specs, dep, seed, bs, batch, max_depth, x_tr, d_tr, x_va, d_va)
    tr = _cached_tokens(encoder, meta, x_tr, blocks, False, batch)
    va = _cached_tokens(encoder, meta, x_va, blocks, False, batch)

    def flat(cache: TokenCache, chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = [blocks.index(b) for b in chosen]
        return (torch.cat([cache.patches[i] for i in pos], dim=-1).contiguous(),
                torch.cat([cache.cls[i] for i in pos], dim=-1).contiguous())

    heads, inputs = [], []
    for _, chosen in specs:
        torch.manual_seed(seed)
        heads.append(DepthLinearHead(encoder.embed_dim, n_layers=len(chosen), max_depth=max_depth))
        inputs.append(flat(tr, chosen))
    train_depth_heads(heads, inputs, tr.grid,
                      _batches(x_tr, d_tr.unsqueeze(1), bs, seed, by_index=True),
                      iters=int(dep["iters"]), lr=float(dep["lr"]), warmup_iters=int(dep["warmup"]),
                      sig_warmup=int(dep["sig_warmup"]))
    out = {}
    for (name, chosen), head in zip(specs, heads):
        head.eval()
        patches, cls = flat(va, chosen)
        with torch.no_grad():
            pred = head.from_logits(head.token_logits(patches, cls, va.grid))
        pred = F.interpolate(pred, size=d_va.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        out[name] = float(rmse(pred, d_va, d_va > 0))
    return out


def _depth_streaming(encoder, meta, specs, dep, seed, bs, batch, max_depth, x_tr, d_tr, x_va, d_va):
    """Each head trained alone with the encoder in the loop (sets whose tokens do not fit)."""
    from webssl_repro.evaluate.depth import DepthLinearHead, rmse, train_depth

    out = {}
    for name, chosen in specs:
        fn = feature_fn(encoder, chosen, norm=False, patch_size=int(meta["patch"]))
        torch.manual_seed(seed)
        head = DepthLinearHead(encoder.embed_dim, n_layers=len(chosen), max_depth=max_depth)
        train_depth(head, fn, _batches(x_tr, d_tr.unsqueeze(1), bs, seed), iters=int(dep["iters"]),
                    lr=float(dep["lr"]), warmup_iters=int(dep["warmup"]), sig_warmup=int(dep["sig_warmup"]))
        head.eval()
        with torch.no_grad():
            pred = torch.cat([head(fn(xb)) for xb, _ in _chunks(x_va, d_va, batch)])
        pred = F.interpolate(pred, size=d_va.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        out[name] = float(rmse(pred, d_va, d_va > 0))
    return out


def run_classic(encoder, meta: Mapping[str, Any], data: Mapping[str, str | Path], cfg: Mapping[str, Any]) -> dict:
    """Metrics in the units of paper Tables 3/7/9: top-1 %, mIoU %, RMSE (m)."""
    cfg = classic_config(cfg)
    metrics: dict[str, Any] = {}
    metrics.update(classification(encoder, meta, data["classification"], cfg))
    metrics.update(segmentation(encoder, meta, data["segmentation"], cfg))
    metrics.update(depth(encoder, meta, data["depth"], cfg))
    return metrics
