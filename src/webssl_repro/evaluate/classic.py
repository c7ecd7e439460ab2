"""Classic vision of a frozen encoder on the eval sets: IN-1k linear, ADE20K lin./+ms, NYUd lin.1/lin.4.

ImageNet is evaluated at the encoder's pretraining resolution (paper App. A) with DINOv2's
eval transform (resize to 256/224 of the size, centre crop). ADE20K and NYUd use "the settings
from Oquab et al.": their own resolution, a task's ``img_size`` (paper config: ADE20K's 512 px
and NYUd's 480 x 640 at the nearest patch multiples, 518 and 476 x 644). Validation scores at
each set's own resolution, as mmseg and the depth toolbox do: ADE20K's shorter side goes to
``img_size`` and ``img_size`` windows slide over it at a 2/3 stride (``test_mode: slide``;
``whole`` passes the image squashed to ``img_size``), their logits resized to the label map;
NYUd's predictions are flip-averaged, resized to the depth map and scored inside the Eigen
crop (``eigen_crop``). Training images: ADE20K's resized (aspect kept) to cover ``img_size``,
its centre taken (squashed to it under ``whole``), NYUd's squashed to it (4:3 either way),
their masks and depth maps alike (nearest / bilinear). Deviations from DINOv2's dense
protocols, for cost: no training-time augmentation (random rescale, crop, flip, photometric
distortion, rotation), and "+ms" trains and tests at ``img_size`` like "lin.", where DINOv2's
"+ms" uses 640 px crops (its head then trains on its own encoder pass), each of its scales
resized from the image at ``img_size`` rather than from the original.
Every probe follows the DINOv2 protocol of its module; the sizes of the probe training
(epochs, iterations, learning-rate grid) come from the config, smaller at mini scale.

Cost: the encoder is frozen and the probes train without augmentation, so an image's tokens
never change. The linear probe's features are computed once per split (in memory, or on disk
for ImageNet at paper scale); the dense probes cache their tokens when they fit in memory and
otherwise run the encoder on each training batch, on the seeded batches either way. All heads
of a task train together on one encoder pass (the linear grid, lin./+ms, lin.1/lin.4), each
exactly as it would alone. Images are read lazily (``imagesets``), so no split is ever held in
memory as pixels; ``workers`` decode ahead. The dense heads never keep their largest tensor
(logits upsampled to the mask / x4 depth grid): it is built in chunks and rebuilt in the
backward pass (``segmentation.upsampled_ce``, ``depth.upsampled_bins_to_depth``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from webssl_repro.config import merge_known
from webssl_repro.evaluate import features
from webssl_repro.evaluate.features import BlockTokens, feature_fn, linear_features, model_device
from webssl_repro.evaluate.imagesets import (EvalImages, as_hw, collate_lists, image_loader, in_order, load_split,
                                             seeded_batches)
from webssl_repro.evaluate.segmentation import SLIDE_STRIDE
from webssl_repro.evaluate.linear import DINOV2_LRS, linear_probe

DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    # Processes decoding images ahead of the encoder (0: in the job's own process).
    "workers": 0,
    # Where the linear probe's features go when they do not fit in memory (null: $TMPDIR).
    "scratch": None,
    "linear": {"epochs": 10, "epoch_length": 1250, "lrs": list(DINOV2_LRS)},
    # Dense heads: DINOv2's global batch, 2 images/GPU x 8 GPUs (ADE20K mmseg config, NYUd
    # depther); the top-level batch_size only chunks the frozen encoder's forward passes.
    # img_size: None = the pretraining resolution (see ``dense_size``).
    # test_mode: "slide" (mmseg's ADE20K test: img_size windows every slide_stride px, None =
    # 2/3 of img_size, over the image with its shorter side at img_size) or "whole".
    "segmentation": {"iters": 40000, "lr": 1e-3, "warmup": 1500, "batch_size": 16, "img_size": None,
                     "test_mode": "slide", "slide_stride": None},
    # sig_warmup: iterations of SigLoss's mean-only warm-up (DINOv2 warm_iter=100).
    # max_depth: top of the depth bins (DINOv2's NYUd: 10 m); None = the deepest pixel of the
    # train and val maps, which needs their targets in memory (the cached path).
    # eigen_crop: score inside the Eigen crop (DINOv2's NYUd; true in config/paper.yaml),
    # defined on NYUd's 480 x 640 frames only.
    "depth": {"iters": 38400, "lr": 1e-4, "warmup": 12800, "sig_warmup": 100, "batch_size": 16, "img_size": None,
              "max_depth": None, "eigen_crop": False},
    "seed": 0,
    # The frozen encoder's forward: fp32, or autocast to bf16 / fp16 as DINOv2's evaluations
    # run it on GPUs (the probe heads always train in fp32).
    "precision": "fp32",
}

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def dense_size(task_cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[int, int]:
    """Input (h, w) of a dense task. DINOv2 evaluates ADE20K / NYUd at their own resolution
    (512 px crops; NYUd's 480 x 640 frames), not the 224 px of pretraining, so a task's
    ``img_size`` (``s`` or ``[h, w]``) may set it; the encoder resamples its position
    embeddings. Default: the pretraining resolution."""
    size = task_cfg.get("img_size")
    if size is None:
        return as_hw(int(meta["img_size"]))
    hw, patch = as_hw(size), int(meta["patch"])
    if any(v % patch for v in hw):
        raise ValueError(f"evaluate.classic img_size {size} is not a multiple of the encoder's patch {patch}")
    return hw


def classic_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` (an ``evaluate.classic`` section) over DEFAULTS: what each task function reads."""
    return merge_known(DEFAULTS, cfg or {}, "evaluate.classic")


def segmentation_classes(manifest: str | Path) -> int:
    """Classes of a segmentation eval set: its manifest's ``n_classes`` (ADE20K: 150), else
    the mini-web world's (background, 16 objects and 3 text carriers)."""
    from webssl_repro.data.miniweb.world import SEG_CLASSES

    return int(json.loads(Path(manifest).read_text()).get("n_classes", len(SEG_CLASSES)))


def _autocast(cfg: Mapping[str, Any]) -> torch.dtype | None:
    if cfg["precision"] not in PRECISIONS:
        raise ValueError(f"evaluate.classic.precision: {cfg['precision']!r} is not one of {sorted(PRECISIONS)}")
    return PRECISIONS[cfg["precision"]]


def _tokens_fn(encoder, meta, blocks, norm: bool, cfg: Mapping[str, Any], out_device="cpu"):
    """The frozen encoder's tokens of ``blocks`` per image batch (``features.feature_fn``)."""
    return feature_fn(encoder, blocks, norm=norm, patch_size=int(meta["patch"]), autocast_dtype=_autocast(cfg),
                      out_device=out_device)


def _split(manifest: str | Path, split: str, size: int | tuple[int, int], target: str, **kw) -> EvalImages:
    return EvalImages(load_split(manifest, split), size, target, **kw)


def _in_order(images: EvalImages, cfg: Mapping[str, Any], collate=None):
    """(indices, images, targets) of one pass over a split, in order."""
    return image_loader(images, in_order(len(images), int(cfg["batch_size"])), int(cfg["workers"]), collate)


def slide_setting(seg: Mapping[str, Any], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(crop, stride)`` of the segmentation test, or None for whole images."""
    mode, stride = seg["test_mode"], seg["slide_stride"]
    if mode not in ("slide", "whole"):
        raise ValueError(f"evaluate.classic.segmentation.test_mode: {mode!r} is not 'slide' or 'whole'")
    if mode == "whole":
        return None
    stride_hw = tuple(max(1, round(v * SLIDE_STRIDE)) for v in size) if stride is None else as_hw(stride)
    if min(stride_hw) < 1 or any(st > c for st, c in zip(stride_hw, size)):
        raise ValueError(f"evaluate.classic.segmentation.slide_stride: {stride!r} must be in [1, img_size {size}]")
    return size, stride_hw


class TokenCache:
    """Frozen block tokens and targets of a whole training set, indexed by sample ids.

    The dense probes train without augmentation on a frozen encoder, so the encoder's
    output for an image never changes: computing it once instead of every iteration is
    the same training at a fraction of the cost. Used when the tokens fit in memory
    (``fits``: mini scale); larger sets stream images through the encoder per batch instead.
    """

    def __init__(self, fn, batches) -> None:
        parts, targets = [], []
        for _, x, y in batches:
            parts.append(fn(x))
            targets.append(y)
        self.cls = torch.cat([p.cls for p in parts], dim=1)
        self.patches = torch.cat([p.patches for p in parts], dim=1)
        self.targets = torch.cat(targets)
        self.grid, self.indices = parts[0].grid, parts[0].indices

    @staticmethod
    def fits(encoder, n_images: int, img_size: int | tuple[int, int], patch: int, n_layers: int) -> bool:
        h, w = as_hw(img_size)
        tokens = (h // patch) * (w // patch) + 1
        return n_images * n_layers * tokens * encoder.embed_dim * 4 < features.IN_MEMORY_BYTES


def classification(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    size, n_blocks = int(meta["img_size"]), min(4, int(meta["depth"]))
    with tempfile.TemporaryDirectory(dir=cfg["scratch"], prefix="linear_features_") as scratch:
        feats = {}
        for split in ("train", "val"):
            images = _split(manifest, split, size, "label")
            (Path(scratch) / split).mkdir()
            feats[split] = linear_features(encoder, _in_order(images, cfg), len(images), n_blocks,
                                           scratch=Path(scratch) / split, autocast_dtype=_autocast(cfg))
        n_classes = int(max(feats["train"]["labels"].max(), feats["val"]["labels"].max())) + 1
        lin = cfg["linear"]
        result = linear_probe(feats["train"], feats["val"], n_classes, n_last_blocks=(1, n_blocks),
                              lrs=lin["lrs"], batch_size=min(128, len(feats["train"]["labels"])),
                              epochs=int(lin["epochs"]), epoch_length=int(lin["epoch_length"]),
                              seed=int(cfg["seed"]), device=model_device(encoder))
    setting = result.setting
    return {"in1k_linear": float(result.top1),  # already a percentage
            "_in1k_linear_setting": {"n_last_blocks": setting.n_last_blocks, "avgpool": setting.avgpool,
                                     "lr": setting.lr}}


def _training_batches(encoder, meta, train: EvalImages, blocks: int | list[int], norm: bool, task: Mapping,
                      cfg: Mapping[str, Any]) -> Iterator[tuple[BlockTokens, torch.Tensor]]:
    """(tokens of ``blocks``, targets) of the seeded training batches: from a token cache when
    the set's tokens fit in memory, else from the encoder run on each batch's images. Either
    way on the heads' device (the encoder's)."""
    patch, device = int(meta["patch"]), model_device(encoder)
    bs = min(int(task["batch_size"]), len(train))
    order = seeded_batches(len(train), bs, int(cfg["seed"]))
    n_layers = blocks if isinstance(blocks, int) else len(blocks)
    if TokenCache.fits(encoder, len(train), train.size, patch, n_layers):
        cache = TokenCache(_tokens_fn(encoder, meta, blocks, norm, cfg), _in_order(train, cfg))
        for idx in order:
            yield (BlockTokens(cache.cls[:, idx].to(device), cache.patches[:, idx].to(device), cache.grid,
                               cache.indices), cache.targets[idx].to(device))
    else:
        fn = _tokens_fn(encoder, meta, blocks, norm, cfg, out_device=device)
        for _, x, y in image_loader(train, order, int(cfg["workers"])):
            yield fn(x), y.to(device)


def _block_major(bt: BlockTokens) -> torch.Tensor:
    """Patch maps concatenated along channels in block order, (B, L*D, h, w)."""
    L, B, P, D = bt.patches.shape
    return bt.patches.permute(1, 0, 3, 2).reshape(B, L * D, *bt.grid)


def segmentation(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ADE20K-protocol "lin." (last block) and "+ms" (last 4 blocks, multi-scale + flip TTA).

    Both heads train in one loop (``train_seg_heads``) on the same seeded batches of frozen
    maps, the encoder running once per batch or once per image (cached): each head's training
    is the one it would have alone, with the same batches and initialisation.
    """
    from webssl_repro.evaluate.segmentation import IoU, LinearSegHead, predict, train_seg_heads

    seg, device = cfg["segmentation"], model_device(encoder)
    size = dense_size(seg, meta)
    slide = slide_setting(seg, size)
    # Sliding windows see the image at its own aspect, so the head trains on it too (the
    # centre of the image resized to cover img_size; mmseg: random crops of a random rescale).
    train = _split(manifest, "train", size, "seg", fit="cover" if slide else "squash")
    val = _split(manifest, "val", size, "seg", fit="short" if slide else "squash", native=True)
    n_classes, n_ms = segmentation_classes(manifest), min(4, int(meta["depth"]))
    specs = (("ade20k_linear", 1, False), ("ade20k_ms", n_ms, True))
    heads = []
    for _, n_layers, _ in specs:
        torch.manual_seed(int(cfg["seed"]))
        heads.append(LinearSegHead(encoder.embed_dim, n_classes, n_layers=n_layers).to(device))
    batches = ((_block_major(bt), y) for bt, y in _training_batches(encoder, meta, train, n_ms, True, seg, cfg))
    train_seg_heads(heads, batches, iters=int(seg["iters"]), lr=float(seg["lr"]), warmup=int(seg["warmup"]))
    fn = _tokens_fn(encoder, meta, n_ms, True, cfg, out_device=device)
    scores = {name: IoU(n_classes) for name, _, _ in specs}
    for head in heads:
        head.eval()
    with torch.no_grad():
        for _, xs, ys in _in_order(val, cfg, collate_lists):
            for x, y in zip(xs, ys):  # one image at a time: each has its own size
                x, y = x.unsqueeze(0).to(device), y.unsqueeze(0).to(device)
                for (name, _, multiscale), head in zip(specs, heads):
                    scores[name].add(predict(head, fn, x, multiscale, out_size=y.shape[-2:], slide=slide), y)
    return {name: 100.0 * iou.mean() for name, iou in scores.items()}


def depth(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """NYUd-protocol lin.1 (last block) and lin.4 (4 evenly spaced blocks), RMSE on val.

    The encoder runs over the union of both heads' blocks; both heads then train jointly on
    the same batches (``train_depth_heads``), each exactly as it would alone.
    """
    from webssl_repro.evaluate.depth import DepthLinearHead, RMSE, eigen_crop, lin4_blocks, train_depth_heads

    dep, device = cfg["depth"], model_device(encoder)
    size = dense_size(dep, meta)
    train, val = _split(manifest, "train", size, "depth"), _split(manifest, "val", size, "depth", native=True)
    specs = (("nyud_lin1", [int(meta["depth"]) - 1]), ("nyud_lin4", lin4_blocks(int(meta["depth"]))))
    blocks = sorted({b for _, bl in specs for b in bl})
    max_depth = dep["max_depth"]
    if max_depth is None:
        if not TokenCache.fits(encoder, len(train), size, int(meta["patch"]), len(blocks)):
            raise ValueError(f"evaluate.classic.depth.max_depth is null, but the {len(train)} training images are "
                             "too many to scan for their deepest pixel: set it (DINOv2's NYUd: 10.0)")
        max_depth = max(float(split.target_of(i).max()) for split in (train, val) for i in range(len(split)))
    heads = []
    for _, chosen in specs:
        torch.manual_seed(int(cfg["seed"]))
        heads.append(DepthLinearHead(encoder.embed_dim, n_layers=len(chosen), max_depth=float(max_depth)).to(device))

    positions = [[blocks.index(b) for b in chosen] for _, chosen in specs]

    def flat(bt: BlockTokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each head's (patches, CLS) of its own blocks, concatenated block-major."""
        return [(torch.cat([bt.patches[i] for i in p], dim=-1), torch.cat([bt.cls[i] for i in p], dim=-1))
                for p in positions]

    batches = ((flat(bt), bt.grid, y) for bt, y in _training_batches(encoder, meta, train, blocks, False, dep, cfg))
    train_depth_heads(heads, batches, iters=int(dep["iters"]), lr=float(dep["lr"]),
                      warmup_iters=int(dep["warmup"]), sig_warmup=int(dep["sig_warmup"]))
    fn = _tokens_fn(encoder, meta, blocks, False, cfg, out_device=device)
    scores = {name: RMSE() for name, _ in specs}
    for head in heads:
        head.eval()
    with torch.no_grad():
        for _, xs, ds in _in_order(val, cfg, collate_lists):
            # DINOv2's NYUd test: the mean of the image's and its mirror's predictions (flip
            # TTA), resized to the depth map and scored where the ground truth lies inside the
            # bins' range (and the Eigen crop)
            x = torch.stack(xs)  # squashed to one size
            views = [(bt.grid, flat(bt)) for bt in (fn(x), fn(x.flip(-1)))]
            targets = []  # each map once on the device, with its valid pixels (the heads share the bins)
            for d in ds:
                d = d.to(device).unsqueeze(0)
                valid = (d > heads[0].min_depth) & (d <= heads[0].max_depth)
                targets.append((d, valid & eigen_crop(d.shape).to(device) if dep["eigen_crop"] else valid))
            for k, ((name, _), head) in enumerate(zip(specs, heads)):
                pred = 0.0
                for flipped, (grid, inputs) in enumerate(views):
                    p = head.from_logits(head.token_logits(*inputs[k], grid))
                    pred = pred + 0.5 * (p.flip(-1) if flipped else p)
                for p, (d, valid) in zip(pred, targets):
                    p = F.interpolate(p.unsqueeze(0), size=d.shape[-2:], mode="bilinear", align_corners=False)
                    scores[name].add(p.squeeze(1), d, valid)
    return {name: score.value() for name, score in scores.items()}


def run_classic(encoder, meta: Mapping[str, Any], data: Mapping[str, str | Path], cfg: Mapping[str, Any]) -> dict:
    """Metrics in the units of paper Tables 3/7/9: top-1 %, mIoU %, RMSE (m)."""
    cfg = classic_config(cfg)
    metrics: dict[str, Any] = {}
    metrics.update(classification(encoder, meta, data["classification"], cfg))
    metrics.update(segmentation(encoder, meta, data["segmentation"], cfg))
    metrics.update(depth(encoder, meta, data["depth"], cfg))
    return metrics
