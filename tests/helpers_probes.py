"""Shared by the dense-probe tests: a linearly solvable patch-feature task and its batches."""
import torch
import torch.nn.functional as F

from webssl_repro.evaluate.features import BlockTokens


def seg_task(g, n=8, size=16):
    """Masks = dominant colour channel; features = 4x4-patch colour means (linearly solvable)."""
    images = torch.rand(n, 3, size, size, generator=g)
    images[:, :, : size // 2] += torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    images[:, :, size // 2:, : size // 2] += torch.tensor([0, 1.0, 0]).view(1, 3, 1, 1)
    masks = images.argmax(dim=1)
    masks[:, 0, 0] = 255
    return images, masks


def colour_features(images):
    """Four 'blocks' of 4x4-patch colour means (block i scaled by i + 1): what a dense head reads."""
    m = F.avg_pool2d(images, 4)  # (B, 3, h, w)
    B, C, h, w = m.shape
    patches = m.flatten(2).transpose(1, 2)
    layers = torch.stack([patches * (i + 1) for i in range(4)])
    return BlockTokens(layers.mean(2), layers, (h, w), [0, 1, 2, 3])


def colour_maps(images):
    """``colour_features`` as ``train_seg_heads`` takes frozen maps: (B, L*D, h, w), blocks along channels."""
    tokens = colour_features(images)
    return tokens.maps().permute(1, 0, 2, 3, 4).reshape(len(images), -1, *tokens.grid)


def index_batches(n, batch, seed):
    """Endless epochs of shuffled, full batches of indices into n samples."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]
