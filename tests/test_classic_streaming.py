"""Dense probes on sets whose tokens do not fit the cache stream the encoder per batch, and
give the cached path's numbers (the same seeded batches and heads; float rounding only)."""
from __future__ import annotations

import pytest
import torch

from helpers_mini import tiny_data  # noqa: F401  (fixture)

DENSE = {"batch_size": 64, "seed": 0,
         "segmentation": {"iters": 12, "lr": 0.01, "warmup": 2, "batch_size": 16, "img_size": 32},
         "depth": {"iters": 12, "lr": 0.03, "warmup": 2, "sig_warmup": 0, "batch_size": 16, "img_size": 32}}


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_streaming_equals_cached(tiny_data, monkeypatch, task):  # noqa: F811
    from webssl_repro.evaluate import classic
    from webssl_repro.models.vit import Arch, build_encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = build_encoder(Arch(width=32, depth=4, heads=2, patch=8), "dino", img_size=32, layerscale=1.0)
    encoder.eval().requires_grad_(False)
    meta = {"img_size": 32, "patch": 8, "depth": 4}
    cfg = classic.classic_config(DENSE)
    cached = getattr(classic, task)(encoder, meta, tiny_data[task], cfg)
    monkeypatch.setattr(classic, "CACHE_LIMIT_BYTES", 0)
    streamed = getattr(classic, task)(encoder, meta, tiny_data[task], cfg)
    assert cached.keys() == streamed.keys() and len(cached) == 2
    for name in cached:
        assert streamed[name] == pytest.approx(cached[name], rel=1e-3, abs=1e-3), (name, cached, streamed)
