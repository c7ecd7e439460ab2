"""The best image-blind constant of each classic task: where an encoder's number starts to mean something.

A probe that ignores its image can at best answer one class for every image (IN-1k), one class
for every pixel (ADE20K) or one depth everywhere (NYUd). The best such constant is found on the
split the probes are scored on (val) and scored by the probes' own scorers on the same pixels,
so it bounds every image-blind predictor from above: a classic number that does not clear it
shows nothing of the encoder. At paper scale it is far below every published number (ImageNet's
val is balanced: 0.1 %); at a run scale, with tiny encoders and short probe training, it need
not be, and the tables say so (``paper.tables``).

Cost: the val labels and maps once (and NYUd's training maps where ``max_depth`` is null, as
the depth probe reads them); no encoder, no training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from webssl_repro.evaluate.imagesets import EvalImages, load_split


def split_targets(manifest: str | Path, split: str, target: str) -> list[torch.Tensor]:
    """A split's targets at their native size (the scorers' resolution)."""
    return list(EvalImages(load_split(manifest, split), 1, target, native=True).targets())


def best_class_top1(labels: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Top-1 % of answering the most common of ``labels`` for every image, and that class."""
    labels = torch.stack([torch.as_tensor(t).reshape(()) for t in labels]).long()
    best = int(torch.bincount(labels).argmax())
    return 100.0 * float((labels == best).double().mean()), best


def best_class_miou(maps: Sequence[torch.Tensor], n_classes: int) -> tuple[float, int]:
    """mIoU % (mmseg's, ``segmentation.IoU``) of labelling every pixel of ``maps`` with their
    most common class, and that class: of all one-class answers it scores the most, since its
    IoU, its pixel share, is the only non-zero term of a mean over the classes the maps hold."""
    from webssl_repro.evaluate.segmentation import IGNORE_INDEX, IoU

    counts = sum(torch.bincount(m[m != IGNORE_INDEX].flatten().long(), minlength=n_classes)[:n_classes]
                 for m in maps)
    best = int(counts.argmax())
    iou = IoU(n_classes)
    for m in maps:
        iou.add(torch.full_like(m, best), m)  # ignored pixels are dropped by the target
    return 100.0 * iou.mean(), best


def best_depth_rmse(maps: Sequence[torch.Tensor], low: float, high: float, crop: bool = False,
                    iterations: int = 100) -> tuple[float, float]:
    """RMSE (m), per image then averaged as the depth probe is scored, of the one depth that
    minimises it over ``maps``, and that depth; on the pixels the probe is scored on: inside
    (``low``, ``high``), and the Eigen crop with ``crop``. The score is convex in the depth,
    so a ternary search over the range finds it."""
    from webssl_repro.evaluate.depth import RMSE, eigen_crop

    scored, moments = [], []
    for d in maps:
        d = d.double()
        valid = (d > low) & (d < high)
        if crop:
            valid &= eigen_crop(d.shape)
        if valid.any():
            scored.append((d, valid))
            moments.append((d[valid].mean(), (d[valid] ** 2).mean()))
    if not scored:
        raise ValueError(f"no depth pixel lies inside the scored range ({low:g}, {high:g})")
    m1, m2 = (torch.stack(m) for m in zip(*moments))

    def score(c: float) -> float:
        return float(torch.sqrt((c * c - 2 * c * m1 + m2).clamp_min(0)).mean())

    lo, hi = low, high
    for _ in range(iterations):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if score(a) <= score(b) else (a, hi)
    best = 0.5 * (lo + hi)
    rmse = RMSE()
    for d, valid in scored:  # one image each: RMSE.add takes a batch
        rmse.add(torch.full_like(d, best)[None], d[None], valid[None])
    return rmse.value(), best


def classic_reference(data: Mapping[str, str | Path], cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The classic metrics of the best constants (``run_classic``'s keys and units); the constants
    themselves as details (``_``-prefixed)."""
    from webssl_repro.evaluate.classic import classic_config, segmentation_classes

    from webssl_repro.evaluate.classic import depth_range

    dep = classic_config(cfg)["depth"]
    top1, label = best_class_top1(split_targets(data["classification"], "val", "label"))
    miou, seg_class = best_class_miou(split_targets(data["segmentation"], "val", "seg"),
                                      segmentation_classes(data["segmentation"]))
    val = split_targets(data["depth"], "val", "depth")
    train = EvalImages(load_split(data["depth"], "train"), 1, "depth", native=True).targets()  # read if no max_depth
    low, high = depth_range(dep, [train, val])
    rmse, depth = best_depth_rmse(val, low, high, bool(dep["eigen_crop"]))
    return {"in1k_linear": top1, "ade20k_linear": miou, "ade20k_ms": miou, "nyud_lin1": rmse, "nyud_lin4": rmse,
            "_constant": {"class": label, "seg_class": seg_class, "depth_m": depth}}
