"""Web-DINO's data side: multi-crop augmentation (DINOv2's blur convention), collation with
the iBOT masks, and the masks' block sampling and token selection."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from webssl_repro.data.augmentations import MultiCropAugmentation, collate_multicrop
from webssl_repro.data.masking import MaskingGenerator, masked_token_selection, sample_masks


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(60, 80, 3) * 255).astype("uint8"))


def test_blur_radius_scales_with_the_global_crop():
    """DINOv2's (0.1, 2.0) px sigma and 9-px kernel at 224 px; the same fraction of the crop
    at the mini scale's 32 px (a 2-px sigma there would blur like 14 px at 224)."""
    from webssl_repro.data.augmentations import blur_kernel_size, blur_probabilities, blur_sigma_range

    assert blur_sigma_range(224) == (0.1, 2.0) and blur_kernel_size(224) == 9
    assert MultiCropAugmentation().blur_sigma == (0.1, 2.0) and MultiCropAugmentation().blur_kernel == 9
    lo, hi = blur_sigma_range(32)
    assert math.isclose(lo, 0.1 / 7) and math.isclose(hi, 2.0 / 7)
    assert blur_kernel_size(32) == 3 and blur_kernel_size(448) % 2 == 1
    assert MultiCropAugmentation(32, 16, 2, blur_sigma=(0.1, 2.0)).blur_sigma == (0.1, 2.0)
    assert blur_probabilities("nominal") == (1.0, 0.1, 0.5)
    with pytest.raises(ValueError):
        blur_probabilities("other")


def test_multicrop_shapes_determinism_and_collate():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3)
    assert aug.blur_p == (0.0, 0.9, 0.5)  # DINOv2-code convention (documented in the module)
    assert MultiCropAugmentation(blur_convention="nominal").blur_p == (1.0, 0.1, 0.5)
    one = aug(_image(), generator=torch.Generator().manual_seed(3))
    two = aug(_image(), generator=torch.Generator().manual_seed(3))
    assert [t.shape for t in one["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in one["local_crops"]] == [(3, 16, 16)] * 3
    assert all(torch.equal(x, y) for x, y in zip(one["local_crops"], two["local_crops"]))
    g = torch.Generator().manual_seed(0)
    samples = [(aug(_image(i), generator=g), i) for i in range(5)]
    batch = collate_multicrop(samples, patch_size=8, generator=g)
    assert batch["global_crops"].shape == (10, 3, 32, 32)
    assert batch["local_crops"].shape == (15, 3, 16, 16)
    assert batch["masks"].shape == (10, 16) and batch["masks"].dtype == torch.bool
    # crop-major: the second half holds every image's second global crop
    assert torch.equal(batch["global_crops"][5], samples[0][0]["global_crops"][1])
    assert (batch["masks"].sum(1) > 0).sum() == 5  # int(10 global crops x 0.5) masked, the rest empty
    # the selection travels with the batch, equal to finding it from the masks
    indices, weights = masked_token_selection(batch["masks"])
    assert torch.equal(batch["mask_indices"], indices) and torch.equal(batch["mask_weights"], weights)


def test_seeded_transforms_touch_only_the_cpu_generator(monkeypatch):
    """A sample's torchvision draws run under its own seed on the CPU generator alone: the
    same crops as under ``torch.manual_seed``, the global generator restored after, and no
    accelerator generator seeded (on a GPU trainer, that reset its CUDA RNG every sample)."""
    from webssl_repro.data.augmentations import global_rng_seeded
    from webssl_repro.train.run import _seeded

    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = aug._crops(_image())
    seeded = []
    with torch.random.fork_rng(devices=[]):  # the worker's later tests keep their global state
        torch.manual_seed(5)
        before = torch.get_rng_state()
        for module in (torch.cuda, torch.xpu, torch.mtia):
            monkeypatch.setattr(module, "manual_seed_all", lambda seed, m=module.__name__: seeded.append(m))
        with global_rng_seeded(11):
            got = aug._crops(_image())
        fn = _seeded(lambda image: torch.rand(3))
        x, _ = fn(_image(), {}, torch.Generator().manual_seed(0))
        y, _ = fn(_image(), {}, torch.Generator().manual_seed(0))
        after = torch.get_rng_state()
    assert all(torch.equal(a, b) for k in got for a, b in zip(got[k], expected[k]))
    assert torch.equal(x, y) and torch.equal(after, before) and seeded == []


def test_masked_token_selection_hand_case():
    masks = torch.tensor([[False, True, True, False], [False, False, False, False], [True, False, False, False]])
    indices, weights = masked_token_selection(masks)
    assert indices.tolist() == [1, 2, 8]  # flat positions in the 3 x 4 token grid, row-major
    assert weights.tolist() == [0.5, 0.5, 1.0]  # 1 / masked tokens of the token's image
    tokens = torch.arange(12.0).view(3, 4, 1)
    assert torch.equal(tokens.flatten(0, 1).index_select(0, indices), tokens[masks])
    empty_i, empty_w = masked_token_selection(torch.zeros(2, 4, dtype=torch.bool))
    assert empty_i.shape == (0,) and empty_w.shape == (0,)


def test_masking_ratio_within_bounds():
    g = torch.Generator().manual_seed(0)
    masks = sample_masks(32, (16, 16), (0.1, 0.5), 0.5, generator=g)
    counts = masks.sum(dim=1)
    assert (counts > 0).sum() == 16  # int(32 · 0.5) images masked, the others empty
    masked = counts[counts > 0].float() / 256
    assert masked.max() <= 0.5 and masked.min() >= 0.05
    assert 0.2 <= masked.mean() <= 0.4  # stratified over [0.1, 0.5]: mean ≈ 0.3
    # one image per sixteenth of [0.1, 0.5] (a block mask may fall a few tokens short of its draw)
    bounds = torch.linspace(0.1, 0.5, 17)
    assert ((masked.sort().values >= bounds[:-1] - 0.02) & (masked.sort().values <= bounds[1:])).all()
    assert (counts > 0).nonzero().flatten().tolist() != list(range(16))  # shuffled among the empty ones
    empty = sample_masks(0, (16, 16), generator=g)
    assert empty.shape == (0, 256) and empty.dtype == torch.bool
    gen = MaskingGenerator((16, 16))
    for n in (4, 30, 100):  # at most n, and short by at most a block's last few tokens (here: 1)
        got = [int(gen(n, torch.Generator().manual_seed(seed)).sum()) for seed in range(20)]
        assert max(got) == n and min(got) >= n - max(1, n // 10), got


def test_block_cap_is_dinov2s():
    """DINOv2's train.py caps a block at 0.5 * img // patch * img // patch, read left to right:
    at 224 / 378 / 518 px with patch 14, 128 / 351 / 666 patches (not half of 729 or 1369)."""
    for img, cap in ((224, 128), (378, 351), (518, 666)):
        grid = img // 14
        assert MaskingGenerator((grid, grid)).max_num_patches == cap == 0.5 * img // 14 * img // 14
