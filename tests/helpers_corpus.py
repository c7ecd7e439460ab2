"""The corpus tests' tiny shards and a sample / collate pair that records what a batch holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webssl_repro.data.stages import build_corpus, manifest_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    build_corpus({"n_images": 30, "shard_size": 5, "seed": 4, "size": 16}, str(root / "manifest.json"))
    return manifest_shards(str(root / "manifest.json"))


def sample_fn(image, meta, gen):
    noise = torch.rand(1, generator=gen)  # the augmentation's draw
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).mean() + noise, meta["id"], meta["index"]


def collate_fn(samples, gen):
    return {"x": torch.stack([s[0] for s in samples]), "ids": [s[1] for s in samples],
            "index": [s[2] for s in samples], "mask_draw": torch.rand(1, generator=gen)}


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return a["ids"] == b["ids"] and a["index"] == b["index"] and torch.equal(a["x"], b["x"]) \
        and torch.equal(a["mask_draw"], b["mask_draw"])
