"""iBOT block masking (DINOv2 ``data/masking.py::MaskingGenerator`` + the mask part of
``collate_data_and_cast``).

Masks are unions of random rectangles rather than i.i.d. patches: predicting a whole block
needs context, whereas isolated masked patches can be interpolated from their neighbours.
All randomness comes from an explicit ``torch.Generator`` so masks are reproducible.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class _Draws:
    """``torch.rand(())`` and ``torch.randint(low, high + 1, ())`` of one generator, drawn into
    two reused 0-d tensors: the same values in the same order, without a new tensor per draw
    (a batch's masks take hundreds of draws)."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self._float = torch.empty(())
        self._int = torch.empty((), dtype=torch.int64)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._float.uniform_(generator=self.generator).item()

    def randint(self, low: int, high: int) -> int:
        """Integer in [low, high] (inclusive, like ``random.randint``)."""
        return int(self._int.random_(low, high + 1, generator=self.generator).item())


class MaskingGenerator:
    """Random block masks on a ``grid`` (h, w) of patches.

    ``__call__(n)`` keeps adding rectangles (area in [min_num_patches, budget], log-uniform
    aspect ratio in [min_aspect, 1/min_aspect]) until ``n`` patches are masked; a rectangle
    is accepted only if it adds new patches without exceeding the budget, so the result
    never exceeds ``n`` (it may stay below when no rectangle fits in 10 tries).
    """

    def __init__(self, grid: tuple[int, int], max_num_patches: int | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3,
                 max_aspect: float | None = None) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        # DINOv2 (train.py): 0.5 * img_size // patch_size * img_size // patch_size, evaluated left to
        # right: half the rows, rounded down, times the row length; half the grid only when it is even
        # (27 x 27 at 378 px: 351, not 364).
        self.max_num_patches = max_num_patches if max_num_patches is not None else (self.height // 2) * self.width
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, draws: _Draws) -> int:
        for _ in range(10):
            area = draws.uniform(self.min_num_patches, budget)
            aspect = math.exp(draws.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = draws.randint(0, self.height - h)
                left = draws.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                added = h * w - int(np.count_nonzero(block))
                if 0 < added <= budget:
                    block[...] = True
                    return added
        return 0

    def __call__(self, num_masking_patches: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool mask (h, w) with at most ``num_masking_patches`` True entries."""
        return torch.from_numpy(self._mask(num_masking_patches, _Draws(generator)))

    def _mask(self, num_masking_patches: int, draws: _Draws) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, draws)
            if added == 0:
                break
            count += added
        return mask


def sample_masks(n_images: int, grid: tuple[int, int],
                 mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
                 mask_sample_probability: float = 0.5,
                 generator: torch.Generator | None = None,
                 mask_generator: MaskingGenerator | None = None) -> torch.Tensor:
    """Masks for a batch of ``n_images`` global crops: bool (n_images, h·w).

    ``int(n_images · p)`` images are masked with ratios stratified over [min, max] (image i
    draws from the i-th of equal sub-intervals, so one batch covers the whole range), the
    rest get empty masks, and the order is shuffled — DINOv2's collate.
    """
    mask_generator = mask_generator or MaskingGenerator(grid)
    draws = _Draws(generator)
    n_patches = grid[0] * grid[1]
    n_masked = int(n_images * mask_sample_probability)
    low, high = mask_ratio_min_max
    bounds = torch.linspace(low, high, n_masked + 1).tolist()
    masks = [mask_generator._mask(int(n_patches * draws.uniform(bounds[i], bounds[i + 1])), draws)
             for i in range(n_masked)]
    masks += [np.zeros(grid, dtype=bool)] * (n_images - n_masked)
    order = torch.randperm(n_images, generator=generator)
    if not masks:  # no images: np.stack needs at least one array
        return torch.zeros(0, n_patches, dtype=torch.bool)
    return torch.from_numpy(np.stack([masks[i] for i in order.tolist()]).reshape(n_images, -1))


def masked_token_indices(masks: torch.Tensor) -> torch.Tensor:
    """Flat positions of the masked tokens of ``masks`` (bool, n_images × n_patches) in the
    (n_images·n_patches) token grid, row-major: the order of ``tokens[masks]``."""
    return masks.flatten().nonzero().flatten()


def masked_token_selection(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the masked tokens of ``masks`` (bool, n_images × n_patches).

    ``indices`` as :func:`masked_token_indices`; ``weights`` are 1 / (masked tokens of the
    token's image), so every masked image weighs the same in the iBOT loss. DINOv2's collate
    computes both on the data-loader side: selecting with ``index_select`` on known indices avoids the
    device-to-host sync that boolean indexing (``nonzero``) costs on a GPU, twice a step.
    """
    masks = masks.flatten(1).bool()
    per_image = 1.0 / masks.sum(dim=1).clamp_min(1).float()
    indices = masked_token_indices(masks)
    weights = per_image.unsqueeze(1).expand_as(masks).flatten().index_select(0, indices)
    return indices, weights
