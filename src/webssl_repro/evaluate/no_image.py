"""Answers that ignore the image, for each classic task: where an encoder's number starts to mean something.

Two such answers, each scored by the probes' own scorers on the pixels they score:

* **uniform**: one class for every image (IN-1k) or every pixel (ADE20K), one depth everywhere
  (NYUd), the best of its kind on val (the most common class; the depth by a ternary search,
  the per-image RMSE being convex in it);
* **position prior** (dense tasks): each pixel's most common class, or mean depth, at its
  place in the frame over the training maps (on a ``PRIOR_GRID`` square in relative
  coordinates). A dense probe can learn this much without reading the image: its tokens carry
  their position. In the mini world depth is mostly a function of the row (a ground plane, sky
  above the horizon), so this prior is a far stronger bar there than one depth.

The reference of a metric is the better of the two: a classic number that does not beat it
does not show that the probe read its encoder. Neither bounds every predictor that ignores the
image (one could combine position with other statistics), so beating it is necessary, not
sufficient. ImageNet's val is balanced (0.1 % for one class); the real ADE20K and NYUd answers
have not been computed here. At a run scale, with tiny encoders and short probe training, the
runs' numbers need not beat them, and the tables say so (``paper.tables``).

Cost: each map is read as it is asked for (ADE20K's 2,000 val maps at int64 would take ~6 GB at
once): each task's training maps once and its val maps twice (statistics, then one scoring pass
for both answers), plus one more pass over NYUd's training maps where ``max_depth`` is null; no encoder, no
training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from webssl_repro.evaluate.depth import DepthRange
from webssl_repro.evaluate.imagesets import EvalImages, load_split

#: side of the square on which position priors are kept (maps resized to it, nearest / area)
PRIOR_GRID = 64

Maps = Callable[[], Iterator[torch.Tensor]]


def split_targets(manifest: str | Path, split: str, target: str) -> Maps:
    """A split's targets at their native size (the scorers' resolution), read afresh on each call."""
    images = EvalImages(load_split(manifest, split), 1, target, native=True)
    return images.targets


def best_class_top1(labels: Iterable[torch.Tensor]) -> tuple[float, int]:
    """Top-1 % of answering the most common of ``labels`` for every image, and that class."""
    labels = torch.stack([torch.as_tensor(t).reshape(()) for t in labels]).long()
    best = int(torch.bincount(labels).argmax())
    return 100.0 * float((labels == best).double().mean()), best


def _to_grid(t: torch.Tensor, mode: str) -> torch.Tensor:
    """An (H, W) map on the ``PRIOR_GRID`` square: its relative positions, whatever its size."""
    return F.interpolate(t.double()[None, None], size=(PRIOR_GRID, PRIOR_GRID), mode=mode)[0, 0]


def _from_grid(prior: torch.Tensor, shape: torch.Size, mode: str) -> torch.Tensor:
    return F.interpolate(prior.double()[None, None], size=tuple(shape[-2:]), mode=mode)[0, 0]


def class_answers(train: Maps, val: Maps, n_classes: int) -> dict[str, tuple[float, Any]]:
    """mIoU % (mmseg's, ``segmentation.IoU``) of the uniform answer (val's most common class:
    the only non-zero term of the mean is its pixel share) and of the position prior (each
    position's most common class over ``train``), each with what it answers."""
    from webssl_repro.evaluate.segmentation import IGNORE_INDEX, IoU

    def counts(m: torch.Tensor) -> torch.Tensor:
        return torch.bincount(m[m != IGNORE_INDEX].flatten().long(), minlength=n_classes)[:n_classes]

    at = torch.zeros(n_classes, PRIOR_GRID, PRIOR_GRID, dtype=torch.float64)  # class counts per position
    for m in train():
        grid = _to_grid(m, "nearest").long()
        kept = grid != IGNORE_INDEX
        at += F.one_hot(torch.where(kept, grid, 0), n_classes).permute(2, 0, 1) * kept
    prior = at.argmax(0)
    totals = sum(counts(m) for m in val())
    uniform = int(totals.argmax())
    scores = {"uniform": IoU(n_classes), "position": IoU(n_classes)}
    for m in val():
        scores["uniform"].add(torch.full_like(m, uniform), m)  # ignored pixels are dropped by the target
        scores["position"].add(_from_grid(prior, m.shape, "nearest").to(m.dtype), m)
    return {"uniform": (100.0 * scores["uniform"].mean(), uniform),
            "position": (100.0 * scores["position"].mean(), sorted(set(prior.flatten().tolist())))}


def _scored(d: torch.Tensor, scored: DepthRange, crop: bool) -> torch.Tensor:
    """The pixels ``classic.depth`` scores: inside the bins' range, and the Eigen crop."""
    from webssl_repro.evaluate.depth import eigen_crop

    valid = scored.scored(d)
    return valid & eigen_crop(d.shape) if crop else valid


def best_depth(val: Maps, scored: DepthRange, crop: bool = False, iterations: int = 100) -> float:
    """The one depth whose RMSE (m), per image then averaged as the depth probe is scored, is
    least over ``val``, on the pixels the probe scores (``_scored``). The score is convex in the
    depth, so a ternary search over the range finds it from each map's first two moments."""
    moments = []
    for d in val():
        d = d.double()
        valid = _scored(d, scored, crop)
        if valid.any():
            moments.append((d[valid].mean(), (d[valid] ** 2).mean()))
    if not moments:
        raise ValueError(f"no depth pixel lies inside the scored range {scored}")
    m1, m2 = (torch.stack(m) for m in zip(*moments))

    def score(c: float) -> float:
        return float(torch.sqrt((c * c - 2 * c * m1 + m2).clamp_min(0)).mean())

    lo, hi = scored.low, scored.high
    for _ in range(iterations):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if score(a) <= score(b) else (a, hi)
    return 0.5 * (lo + hi)


def depth_prior(train: Maps, scored: DepthRange, crop: bool = False) -> torch.Tensor:
    """Each place's mean depth over ``train``'s scored pixels, on the ``PRIOR_GRID`` square (the
    overall mean where a place has none)."""
    total = torch.zeros(PRIOR_GRID, PRIOR_GRID, dtype=torch.float64)
    count = torch.zeros_like(total)
    for d in train():
        valid = _scored(d.double(), scored, crop)
        total += _to_grid(torch.where(valid, d.double(), 0.0), "area")
        count += _to_grid(valid.double(), "area")
    if not count.any():
        raise ValueError(f"no training depth pixel lies inside the scored range {scored}")
    return torch.where(count > 0, total / count.clamp_min(1e-12), total.sum() / count.sum())


def depth_answers(train: Maps, val: Maps, scored: DepthRange, crop: bool = False) -> dict[str, tuple[float, Any]]:
    """RMSE (m) on ``val``, scored by the probes' own ``RMSE`` in one pass, of the best single
    depth and of the position prior (``depth_prior`` over ``train``), each with what it answers."""
    from webssl_repro.evaluate.depth import RMSE

    best, prior = best_depth(val, scored, crop), depth_prior(train, scored, crop)
    scores = {"uniform": RMSE(), "position": RMSE()}
    for d in val():  # one image each: RMSE.add takes a batch
        d = d.double()
        valid = _scored(d, scored, crop)[None]
        scores["uniform"].add(torch.full_like(d, best)[None], d[None], valid)
        scores["position"].add(_from_grid(prior, d.shape, "bilinear")[None], d[None], valid)
    return {"uniform": (scores["uniform"].value(), best), "position": (scores["position"].value(), prior)}


def classic_reference(data: Mapping[str, str | Path], cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``run_classic``'s keys and units: each metric's better answer without the image; both
    answers and what they answer as details (``_``-prefixed). Where ``max_depth`` is null the
    depth range's top is the deepest pixel of the native training maps; the probe reads them
    resized to its ``img_size``, whose deepest pixel may be shallower (the same at mini, 64 px
    both; the paper sets ``max_depth``)."""
    from webssl_repro.evaluate.classic import classic_config, depth_range, segmentation_classes

    dep = classic_config(cfg)["depth"]
    top1, label = best_class_top1(split_targets(data["classification"], "val", "label")())
    seg = class_answers(split_targets(data["segmentation"], "train", "seg"),
                        split_targets(data["segmentation"], "val", "seg"), segmentation_classes(data["segmentation"]))
    train, val = split_targets(data["depth"], "train", "depth"), split_targets(data["depth"], "val", "depth")
    scored = depth_range(dep, train())  # the maps are read only where max_depth is null
    dense = depth_answers(train, val, scored, bool(dep["eigen_crop"]))
    (uniform, depth), position = dense["uniform"], dense["position"][0]
    miou = max(seg["uniform"][0], seg["position"][0])
    rmse = min(uniform, position)
    return {"in1k_linear": top1, "ade20k_linear": miou, "ade20k_ms": miou, "nyud_lin1": rmse, "nyud_lin4": rmse,
            "_uniform": {"in1k_linear": top1, "class": label, "ade20k": seg["uniform"][0],
                         "seg_class": seg["uniform"][1], "nyud": uniform, "depth_m": depth},
            "_position_prior": {"ade20k": seg["position"][0], "seg_classes": seg["position"][1], "nyud": position,
                                "grid": PRIOR_GRID}}
