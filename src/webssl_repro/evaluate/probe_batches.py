"""What the classic probe heads train and test on: the frozen encoder's block tokens per image
batch (``tokens_fn``), in order (``in_order_batches``) or as the seeded training batches from a
given iteration on, from a token cache (``TokenCache``), the encoder run per batch, or freshly
augmented images (``training_batches``, ``augmented_training_batches``). Starting at an
iteration skips the batches before it without running the encoder on them: how a stopped
dense probe resumes (``evaluate.progress``).
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from webssl_repro.evaluate import features
from webssl_repro.evaluate.features import BlockTokens, feature_fn, model_device
from webssl_repro.evaluate.imagesets import EvalImages, as_hw, image_loader, in_order, load_split, seeded_batches


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(cfg: Mapping[str, Any]) -> torch.dtype | None:
    if cfg["precision"] not in PRECISIONS:
        raise ValueError(f"evaluate.classic.precision: {cfg['precision']!r} is not one of {sorted(PRECISIONS)}")
    return PRECISIONS[cfg["precision"]]


def tokens_fn(encoder, meta, blocks, norm: bool, cfg: Mapping[str, Any], out_device="cpu"):
    """The frozen encoder's tokens of ``blocks`` per image batch (``features.feature_fn``)."""
    return feature_fn(encoder, blocks, norm=norm, patch_size=int(meta["patch"]), autocast_dtype=autocast_dtype(cfg),
                      out_device=out_device)


def in_order_batches(images: EvalImages, cfg: Mapping[str, Any], collate=None, start: int = 0):
    """(indices, images, targets) of one pass over a split, in order from sample ``start``."""
    return image_loader(images, in_order(len(images), int(cfg["batch_size"]), start), int(cfg["workers"]), collate)


class TokenCache:
    """Frozen block tokens and targets of a whole training set, indexed by sample ids.

    Without augmentation a frozen encoder's output for an image never changes: computing
    it once instead of every iteration is the same training at a fraction of the cost. Used
    when the tokens fit in memory (``fits``); larger sets stream images through the encoder
    per batch instead.
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
        tokens = -(-h // patch) * -(-w // patch) + 1  # the encoder pads to its patch grid
        return n_images * n_layers * tokens * encoder.embed_dim * 4 < features.IN_MEMORY_BYTES


def train_batch_size(task: Mapping[str, Any], n_train: int) -> int:
    """The batch a dense head trains on: the task's ``batch_size``, capped at the training set."""
    return min(int(task["batch_size"]), n_train)


def training_batches(encoder, meta, train: EvalImages, blocks: int | list[int], norm: bool, task: Mapping,
                      cfg: Mapping[str, Any], start: int = 0) -> Iterator[tuple[BlockTokens, torch.Tensor]]:
    """(tokens of ``blocks``, targets) of the seeded training batches from the ``start``-th on:
    from a token cache when the set's tokens fit in memory, else from the encoder run on each
    batch's images. Either way on the heads' device (the encoder's)."""
    patch, device = int(meta["patch"]), model_device(encoder)
    bs = train_batch_size(task, len(train))
    order = islice(seeded_batches(len(train), bs, int(cfg["seed"])), start, None)
    n_layers = blocks if isinstance(blocks, int) else len(blocks)
    if TokenCache.fits(encoder, len(train), train.size, patch, n_layers):
        cache = TokenCache(tokens_fn(encoder, meta, blocks, norm, cfg), in_order_batches(train, cfg))
        for idx in order:
            yield (BlockTokens(cache.cls[:, idx].to(device), cache.patches[:, idx].to(device), cache.grid,
                               cache.indices), cache.targets[idx].to(device))
    else:
        fn = tokens_fn(encoder, meta, blocks, norm, cfg, out_device=device)
        for _, x, y in image_loader(train, order, int(cfg["workers"])):
            yield fn(x), y.to(device)


def augmented_training_batches(encoder, meta, manifest: str | Path, target: str, crop: tuple[int, int],
                       blocks: int | list[int], norm: bool, task: Mapping[str, Any], cfg: Mapping[str, Any],
                       start: int = 0, **augment: Any) -> Iterator[tuple[BlockTokens, torch.Tensor]]:
    """(tokens, targets) of the seeded training batches from the ``start``-th on, each image
    augmented afresh (``dense_augment.AugmentedImages``, with ``augment``'s options) and the
    encoder run on every batch."""
    from webssl_repro.evaluate.dense_augment import AugmentedImages, augmented_batches

    device, seed = model_device(encoder), int(cfg["seed"])
    train = AugmentedImages(load_split(manifest, "train"), target, crop, seed, **augment)
    fn = tokens_fn(encoder, meta, blocks, norm, cfg, out_device=device)
    order = islice(augmented_batches(len(train), train_batch_size(task, len(train)), seed), start, None)
    for _, x, y in image_loader(train, order, int(cfg["workers"])):
        yield fn(x), y.to(device)
