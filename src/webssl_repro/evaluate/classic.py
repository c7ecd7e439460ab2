"""Classic vision of a frozen encoder on the eval sets: IN-1k linear, ADE20K lin./+ms, NYUd lin.1/lin.4.

ImageNet is evaluated at the encoder's pretraining resolution (paper App. A) with DINOv2's
eval transform (resize to 256/224 of the size, centre crop). ADE20K and NYUd use "the settings
from Oquab et al.": their own resolution, a task's ``img_size`` (paper config: ADE20K's 512 px
and NYUd's 480 x 640, centre-padded by the encoder to its patch grid). Validation scores at
each set's own resolution, as mmseg and the depth toolbox do: ADE20K's shorter side goes to
``img_size`` and ``img_size`` windows slide over it at a 2/3 stride (``test_mode: slide``;
``whole`` passes the image squashed to ``img_size``), their logits resized to the label map;
NYUd's predictions are flip-averaged, resized to the depth map and scored inside the Eigen
crop (``eigen_crop``). ADE20K's training images get mmseg's augmentation (``augment``:
random rescale, crop, flip, photometric distortion; ``dense_augment``; "+ms" at its own size
rescales by its config's 1.0-3.0), or without it are resized (aspect kept) to cover
``img_size``, their centre taken (squashed under ``whole``).
NYUd's get the depth toolbox's (``augment``: frame crop, rotation, flip, random crops of
``train_crop``, colour), or without it are squashed to ``img_size`` (4:3 either way), depth
maps alike. "+ms" trains and tests at ``ms_img_size`` (DINOv2's 640 px crops), on encoder passes of its own, or shares "lin."'s at ``img_size``; each of
its test scales is resized from the original image to a shorter side of int(size x ratio), as
mmseg's ``MultiScaleFlipAug`` does, with no cap on the longer side (``img_scale=(99999999,
640)``). Dense images are resized as mmcv does (``imagesets.DENSE_FITS``: bilinear on 8-bit
levels, as the training augmentation).
Every probe follows the DINOv2 protocol of its module; the sizes of the probe training
(epochs, iterations, learning-rate grid) come from the config, smaller at mini scale.

Cost: the encoder is frozen, so an image's tokens change only with its augmentation. The
linear probe's features are computed once per split (in memory, or on disk for ImageNet at
paper scale, where a retry continues a stopped pass: ``evaluate.classification``); a dense probe without augmentation caches its tokens when they fit in memory,
and otherwise, or with augmentation, runs the encoder on each training batch, on the seeded
batches either way. All heads
of a task train together on one encoder pass (the linear grid, lin./+ms, lin.1/lin.4), each
exactly as it would alone. Images are read lazily (``imagesets``), so no split is ever held in
memory as pixels; ``workers`` decode ahead. The dense heads never keep their largest tensor
(logits upsampled to the mask / x4 depth grid): it is built in chunks and rebuilt in the
backward pass (``segmentation.upsampled_ce``, ``depth.upsampled_bins_to_depth``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F

from webssl_repro.config import merge_known
from webssl_repro.files import read_json
from webssl_repro.evaluate.classification import FEATURES, classification
from webssl_repro.evaluate.depth import MIN_DEPTH, DepthRange
from webssl_repro.evaluate.features import BlockTokens, model_device
from webssl_repro.evaluate.imagesets import EvalImages, as_hw, collate_lists, load_split
from webssl_repro.evaluate.linear import DINOV2_LRS
from webssl_repro.evaluate.probe_batches import (TokenCache, augmented_training_batches,
                                                 in_order_batches, tokens_fn, train_batch_size, training_batches)
from webssl_repro.evaluate.progress import EvalProgress
from webssl_repro.evaluate.segmentation import SLIDE_STRIDE

DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    # Processes decoding images ahead of the encoder (0: in the job's own process).
    "workers": 0,
    # Where the linear probe's features go (evaluate.classification). null: the job's state
    # directory, where a stopped feature pass continues (or in memory without one); a folder:
    # a temporary one there, computed again by a retry.
    "scratch": None,
    # Linear probe: DINOv2's run_eval_linear on its standard 8 GPUs, 128 images each: a global
    # batch of 1024 (the lrs scale by it / 256), which one process trains alike.
    "linear": {"epochs": 10, "epoch_length": 1250, "lrs": list(DINOV2_LRS), "batch_size": 1024},
    # Dense heads: DINOv2's global batch, 2 images/GPU x 8 GPUs. ADE20K's mmseg config dump
    # records the 8 GPUs; NYUd's depther dumps say 2 per GPU but not how many GPUs (their gpu_ids
    # field is never updated by distributed training), so its 8 is assumed by analogy. The
    # top-level batch_size only chunks the frozen encoder's forward passes.
    # img_size: None = the pretraining resolution (see ``dense_size``).
    # test_mode: "slide" (mmseg's ADE20K test: img_size windows every slide_stride px, None =
    # 2/3 of img_size, over the image with its shorter side at img_size; "+ms" alike at
    # ms_img_size, with the same slide_stride where one is set) or "whole".
    # augment: mmseg's training augmentation (dense_augment; the encoder then runs on every
    # batch), or none (each image's tokens computed once, cached when they fit in memory).
    # ms_img_size: "+ms"'s own size, at which its head trains and tests (DINOv2: 640 px;
    # None: img_size, the "lin." head's, sharing its encoder passes).
    "segmentation": {"iters": 40000, "lr": 1e-3, "warmup": 1500, "batch_size": 16, "img_size": None,
                     "ms_img_size": None, "test_mode": "slide", "slide_stride": None, "augment": True},
    # sig_warmup: iterations of SigLoss's mean-only warm-up (DINOv2 warm_iter=100).
    # max_depth: top of the depth bins (DINOv2's NYUd: 10 m); None = the deepest pixel of the
    # training maps, which needs their targets in memory (the cached path). Scores count the
    # pixels strictly inside the bins' range (depth.DepthRange).
    # eigen_crop: score inside the Eigen crop (DINOv2's NYUd; true in config/paper.yaml),
    # defined on NYUd's 480 x 640 frames only.
    # augment: the depth toolbox's training augmentation (dense_augment) of random crops of
    # train_crop (None: img_size; DINOv2's NYUd: [416, 544]), after nyu_crop cuts each 480 x 640
    # frame to its content (NYUCrop; true in config/paper.yaml); else images squashed to img_size.
    # samples_per_gpu: the images of each SigLoss (DINOv2: 2 per GPU; the batch's 16 on 8 GPUs, assumed);
    # grad_weight: GradientLoss's, 0 as it acts in DINOv2's code (depth.gradient_loss).
    "depth": {"iters": 38400, "lr": 1e-4, "warmup": 12800, "sig_warmup": 100, "batch_size": 16, "img_size": None,
              "max_depth": None, "eigen_crop": False, "augment": True, "train_crop": None, "nyu_crop": False,
              "samples_per_gpu": 2, "grad_weight": 0.0},
    "seed": 0,
    # The frozen encoder's forward: fp32, or autocast to bf16 / fp16 (DINOv2's linear eval
    # autocasts to fp16) on GPUs; the probe heads always train in fp32.
    "precision": "fp32",
}

def dense_size(task_cfg: Mapping[str, Any], meta: Mapping[str, Any], key: str = "img_size") -> tuple[int, int]:
    """Input (h, w) of a dense task. DINOv2 evaluates ADE20K / NYUd at their own resolution
    (512 px crops; NYUd's 480 x 640 frames), not the 224 px of pretraining, so a task's
    ``img_size`` (``s`` or ``[h, w]``) may set it; the encoder resamples its position
    embeddings, and centre-pads a size off its patch grid with zeros (DINOv2's
    ``CenterPadding``: 512 -> 518 at patch 14). Default: the pretraining resolution."""
    size = task_cfg.get(key)
    if size is None:
        return as_hw(int(meta["img_size"]))
    hw = as_hw(size)
    if min(hw) < 1:
        raise ValueError(f"evaluate.classic {key} {size}: sizes must be positive")
    return hw


def classic_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` (an ``evaluate.classic`` section) over DEFAULTS: what each task function reads."""
    return merge_known(DEFAULTS, cfg or {}, "evaluate.classic")


def segmentation_classes(manifest: str | Path) -> int:
    """Classes of a segmentation eval set: its manifest's ``n_classes`` (ADE20K: 150), else
    the mini-web world's (background, 16 objects and 3 text carriers)."""
    from webssl_repro.data.miniweb.world import SEG_CLASSES

    return int(read_json(manifest).get("n_classes", len(SEG_CLASSES)))


def _split(manifest: str | Path, split: str, size: int | tuple[int, int], target: str, **kw) -> EvalImages:
    return EvalImages(load_split(manifest, split), size, target, **kw)


def slide_setting(seg: Mapping[str, Any], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(crop, stride)`` of the segmentation test, or None for whole images."""
    mode, stride = seg["test_mode"], seg["slide_stride"]
    if mode not in ("slide", "whole"):
        raise ValueError(f"evaluate.classic.segmentation.test_mode: {mode!r} is not 'slide' or 'whole'")
    if mode == "whole":
        return None
    stride_hw = tuple(max(1, int(v * SLIDE_STRIDE)) for v in size) if stride is None else as_hw(stride)
    if min(stride_hw) < 1 or any(st > c for st, c in zip(stride_hw, size)):
        raise ValueError(f"evaluate.classic.segmentation.slide_stride: {stride!r} must be in [1, img_size {size}]")
    return size, stride_hw


def _block_major(bt: BlockTokens) -> torch.Tensor:
    """Patch maps concatenated along channels in block order, (B, L*D, h, w)."""
    L, B, P, D = bt.patches.shape
    return bt.patches.permute(1, 0, 3, 2).reshape(B, L * D, *bt.grid)


def _seg_training_batches(encoder, meta, manifest: str | Path, size: tuple[int, int], n_layers: int,
                         cfg: Mapping[str, Any], ratio_range: tuple[float, float], start: int = 0
                         ) -> Iterator[tuple[BlockTokens, torch.Tensor]]:
    """(tokens of the last ``n_layers`` blocks, masks) of the seeded training batches from the
    ``start``-th on:
    mmseg's augmentation of each image drawn (rescale ratios from ``ratio_range``), the
    encoder run on each batch (``augment``); or each image fitted once, its aspect kept
    (resized to cover ``size``, its centre) when the test slides windows over the image,
    squashed to ``size`` when it passes it whole."""
    seg = cfg["segmentation"]
    if not seg["augment"]:
        train = _split(manifest, "train", size, "seg", fit="cover" if slide_setting(seg, size) else "squash")
        yield from training_batches(encoder, meta, train, n_layers, True, seg, cfg, start)
        return
    yield from augmented_training_batches(encoder, meta, manifest, "seg", size, n_layers, True, seg, cfg, start,
                                  ratio_range=ratio_range)


def segmentation(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any],
                 progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """ADE20K-protocol "lin." (last block) and "+ms" (last 4 blocks, multi-scale + flip TTA).

    Each head trains and tests at its task's size: ``img_size``, and ``ms_img_size`` for
    "+ms" (DINOv2's 640 px; None: ``img_size``). Heads of one size train in one loop
    (``train_seg_heads``) on the same seeded batches of frozen maps, the encoder running once
    per batch or once per image (cached): each head's training is the one it would have
    alone, with the same batches and initialisation. Augmented, "+ms" at its own size
    rescales its training images by DINOv2's "+ms" ratios (1.0-3.0); sharing "lin."'s
    batches, by "lin."'s (0.5-2.0). Each size is a part of ``progress``: its training resumes,
    its scores are kept.
    """
    from webssl_repro.evaluate.dense_augment import MS_RATIO_RANGE, RATIO_RANGE
    from webssl_repro.evaluate.segmentation import LinearSegHead, train_seg_heads

    seg, device, seed = cfg["segmentation"], model_device(encoder), int(cfg["seed"])
    progress = EvalProgress() if progress is None else progress
    size = dense_size(seg, meta)
    ms_size = size if seg["ms_img_size"] is None else dense_size(seg, meta, "ms_img_size")
    n_classes, n_ms = segmentation_classes(manifest), min(4, int(meta["depth"]))
    heads = {}
    for name, n_layers, multiscale, hw in (("ade20k_linear", 1, False, size), ("ade20k_ms", n_ms, True, ms_size)):
        torch.manual_seed(seed)
        heads[name] = (LinearSegHead(encoder.embed_dim, n_classes, n_layers=n_layers).to(device), multiscale, hw)
    scores: dict[str, float] = {}
    for hw in dict.fromkeys(h[2] for h in heads.values()):
        group = {name: h for name, h in heads.items() if h[2] == hw}
        part = f"segmentation-{hw[0]}x{hw[1]}"
        kept = progress.result(part)
        if kept is not None:
            scores.update(kept)
            continue
        n_layers = max(head.n_layers for head, _, _ in group.values())
        ratios = RATIO_RANGE if "ade20k_linear" in group else MS_RATIO_RANGE
        state = progress.torch_state(part)
        stream = _seg_training_batches(encoder, meta, manifest, hw, n_layers, cfg, ratios,
                                       start=0 if state is None else int(state["iteration"]))
        train_seg_heads([head for head, _, _ in group.values()], ((_block_major(bt), y) for bt, y in stream),
                        iters=int(seg["iters"]), lr=float(seg["lr"]), warmup=int(seg["warmup"]), state=state,
                        checkpoint=progress.torch_saver(part, int(seg["iters"])))
        scored = _seg_scores(encoder, meta, manifest, hw, n_layers, group, n_classes, cfg, progress, f"{part}-scores")
        scores.update(progress.finish(part, scored, also=[f"{part}-scores"]))
    return {name: scores[name] for name in heads}


def _seg_scores(encoder, meta, manifest: str | Path, size: tuple[int, int], n_layers: int,
                heads: Mapping[str, tuple[Any, bool, Any]], n_classes: int, cfg: Mapping[str, Any],
                progress: Optional[EvalProgress] = None, part: str = "segmentation-scores") -> dict[str, float]:
    """mIoU of ``heads`` (name -> (head, multiscale, size)) on the val set: each image with
    its shorter side at ``size`` under the sliding-window test, else squashed to it; scored
    on its own label map. A "+ms" head sees the image at each of ``MS_SCALES`` times that,
    each resized from the original; the others see it at 1.0. The counts so far are the
    state of ``part``, saved between batches (ADE20K's "+ms" test of a 7B encoder takes hours)."""
    from webssl_repro.evaluate.segmentation import MS_SCALES, IoU, predict

    progress = EvalProgress() if progress is None else progress
    device, slide = model_device(encoder), slide_setting(cfg["segmentation"], size)
    multiscale = any(ms for _, ms, _ in heads.values())
    one = MS_SCALES.index(1.0)  # the single-scale test's level
    val = _split(manifest, "val", size, "seg", fit="short" if slide else "squash", native=True,
                 scales=MS_SCALES if multiscale else None)
    fn = tokens_fn(encoder, meta, n_layers, True, cfg, out_device=device)
    scores = {name: IoU(n_classes) for name in heads}
    for head, _, _ in heads.values():
        head.eval()
    with torch.no_grad():
        for xs, ys in resumable_scoring(progress, part, val, cfg, scores):
            for x, y in zip(xs, ys):  # one image at a time: each has its own size
                levels = x.to(device) if multiscale else None  # a ScalePyramid: levels made on device
                single = None if multiscale else x.unsqueeze(0).to(device)
                y = y.unsqueeze(0).to(device)
                for name, (head, ms, _) in heads.items():
                    if not ms and single is None:
                        single = levels[one]
                    pred = predict(head, fn, levels if ms else single, ms, MS_SCALES, out_size=y.shape[-2:],
                                   slide=slide)
                    scores[name].add(pred, y)
    return {name: 100.0 * iou.mean() for name, iou in scores.items()}


def resumable_scoring(progress: EvalProgress, part: str, images, cfg: Mapping[str, Any],
                      scores: Mapping[str, Any]) -> Iterator[tuple[list, list]]:
    """In-order (images, targets) batches of a val set from the first not yet scored. Once the
    caller has added a batch to ``scores`` (accumulators with ``state_dict``), they and the images
    done are ``part``'s state: saved when due or before a stop, and timed for the stop decision."""
    state, done = progress.torch_state(part), 0  # images scored
    if state is not None:
        done = int(state["images"])
        for name, score in scores.items():
            score.load_state_dict(state["scores"][name])
    batches = in_order_batches(images, cfg, collate_lists, start=done)
    for _, xs, ys in progress.resumable_pass(part, state, batches, len(images) - done, int(cfg["batch_size"]),
                                             lambda: {"images": done,
                                                      "scores": {n: s.state_dict() for n, s in scores.items()}}):
        yield xs, ys  # the caller scores the batch before asking for the next
        done += len(xs)


def depth_range(dep: Mapping[str, Any], train: Iterable[torch.Tensor]) -> DepthRange:
    """The depth bins' range and scored pixels: up to ``max_depth``, or where null up to the
    deepest pixel of ``train`` (the probe's training maps, read only then; never val's, which
    the range would then leak into the head)."""
    if dep["max_depth"] is not None:
        return DepthRange(MIN_DEPTH, float(dep["max_depth"]))
    return DepthRange(MIN_DEPTH, max(float(t.max()) for t in train))


def depth(encoder, meta, manifest: str | Path, cfg: Mapping[str, Any],
          progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """NYUd-protocol lin.1 (last block) and lin.4 (4 evenly spaced blocks), RMSE on val.

    The encoder runs over the union of both heads' blocks; both heads then train jointly on
    the same batches (``train_depth_heads``), each exactly as it would alone; the training
    resumes from ``progress``'s ``depth`` part.
    """
    from webssl_repro.evaluate.depth import DepthLinearHead, RMSE, eigen_crop, lin4_blocks, train_depth_heads

    dep, device = cfg["depth"], model_device(encoder)
    progress = EvalProgress() if progress is None else progress
    size = dense_size(dep, meta)
    train, val = _split(manifest, "train", size, "depth"), _split(manifest, "val", size, "depth", native=True)
    batch = train_batch_size(dep, len(train))
    if batch % int(dep["samples_per_gpu"]):
        raise ValueError(f"evaluate.classic.depth: a batch of {batch} (batch_size {dep['batch_size']}, capped at the "
                         f"training set) is not a multiple of samples_per_gpu {dep['samples_per_gpu']}")
    specs = (("nyud_lin1", [int(meta["depth"]) - 1]), ("nyud_lin4", lin4_blocks(int(meta["depth"]))))
    blocks = sorted({b for _, bl in specs for b in bl})
    if dep["max_depth"] is None and not TokenCache.fits(encoder, len(train), size, int(meta["patch"]), len(blocks)):
        raise ValueError(f"evaluate.classic.depth.max_depth is null, but the {len(train)} training images are "
                         "too many to scan for their deepest pixel: set it (DINOv2's NYUd: 10.0)")
    scored = depth_range(dep, train.targets())
    heads = []
    for _, chosen in specs:
        torch.manual_seed(int(cfg["seed"]))
        heads.append(DepthLinearHead(encoder.embed_dim, n_layers=len(chosen), min_depth=scored.low,
                                     max_depth=scored.high).to(device))

    positions = [[blocks.index(b) for b in chosen] for _, chosen in specs]

    def flat(bt: BlockTokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each head's (patches, CLS) of its own blocks, concatenated block-major."""
        return [(torch.cat([bt.patches[i] for i in p], dim=-1), torch.cat([bt.cls[i] for i in p], dim=-1))
                for p in positions]

    state = progress.torch_state("depth")
    start = 0 if state is None else int(state["iteration"])
    if dep["augment"]:
        crop = as_hw(dep["train_crop"]) if dep["train_crop"] is not None else size  # the encoder pads it
        stream = augmented_training_batches(encoder, meta, manifest, "depth", crop, blocks, False, dep, cfg, start,
                                    nyu_crop=bool(dep["nyu_crop"]))
    else:
        stream = training_batches(encoder, meta, train, blocks, False, dep, cfg, start)
    batches = ((flat(bt), bt.grid, y) for bt, y in stream)
    train_depth_heads(heads, batches, iters=int(dep["iters"]), lr=float(dep["lr"]),
                      warmup_iters=int(dep["warmup"]), sig_warmup=int(dep["sig_warmup"]),
                      grad_weight=float(dep["grad_weight"]), samples_per_gpu=int(dep["samples_per_gpu"]),
                      state=state, checkpoint=progress.torch_saver("depth", int(dep["iters"])))
    fn = tokens_fn(encoder, meta, blocks, False, cfg, out_device=device)
    scores = {name: RMSE() for name, _ in specs}
    for head in heads:
        head.eval()
    with torch.no_grad():
        for xs, ds in resumable_scoring(progress, "depth-scores", val, cfg, scores):
            # DINOv2's NYUd test: the mean of the image's and its mirror's predictions (flip
            # TTA), resized to the depth map and scored where the ground truth lies inside the
            # bins' range (``DepthRange.scored``; and the Eigen crop)
            x = torch.stack(xs)  # squashed to one size
            views = [(bt.grid, flat(bt)) for bt in (fn(x), fn(x.flip(-1)))]
            targets = []  # each map once on the device, with its valid pixels (the heads share the bins)
            for d in ds:
                d = d.to(device).unsqueeze(0)
                valid = scored.scored(d)
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


#: the tasks of the classic evaluation, in the order they run, and the splits each reads
PROBE_TASKS = ("classification", "segmentation", "depth")
SPLITS = ("train", "val")


def open_every_split(data: Mapping[str, str | Path]) -> None:
    """Open every task's splits and read one record of each before the first task trains: an
    ADE20K or NYUd that cannot be read (e.g. a hub dataset with a loading script) then stops the
    job at its start, not after ImageNet's linear probe (a day at ViT-7B)."""
    missing = [task for task in PROBE_TASKS if task not in data]
    if missing:
        raise ValueError(f"the classic evaluation needs the {missing} eval set(s); got {sorted(data)}")
    for task in PROBE_TASKS:
        for split in SPLITS:
            records = load_split(data[task], split)
            if len(records) == 0:
                raise ValueError(f"{data[task]}: the {split!r} split of the {task} eval set is empty")
            records[0]  # its image and target, decoded


def run_classic(encoder, meta: Mapping[str, Any], data: Mapping[str, str | Path], cfg: Mapping[str, Any],
                progress: Optional[EvalProgress] = None) -> dict:
    """Metrics in the units of paper Tables 3/7/9: top-1 %, mIoU %, RMSE (m). With ``progress``
    (the job's, ``evaluate.progress``) a finished task is kept and the dense heads' training
    resumes, so a job stopped at its time limit continues in its retry."""
    cfg = classic_config(cfg)
    progress = EvalProgress() if progress is None else progress
    open_every_split(data)
    metrics: dict[str, Any] = {}
    progress.stop_point("classification")
    kept = progress.result("classification")
    metrics.update(kept if kept is not None else
                   progress.finish("classification", classification(encoder, meta, data["classification"], cfg,
                                                                    progress)))
    progress.drop_files(FEATURES)
    progress.stop_point("segmentation")
    metrics.update(segmentation(encoder, meta, data["segmentation"], cfg, progress))
    progress.stop_point("depth")
    kept = progress.result("depth")
    metrics.update(kept if kept is not None else
                   progress.finish("depth", depth(encoder, meta, data["depth"], cfg, progress), also=["depth-scores"]))
    return metrics
