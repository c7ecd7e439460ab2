"""The VQA oracle diagnostic (benchmarks/probe_vqa_oracle.py) hands the probe the scene's truth.

Its conclusion, that not even a perfect encoder beats zeros on the mini probe, rests on the
oracle being the truth: these tests hold its class channels to the renderer's own
segmentation, its MMVP twins to the images the eval set drew, and its lookup to the exact
tensors the VQA stage feeds the encoder.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probe_vqa_oracle as oracle  # benchmarks/ is on pytest's pythonpath
from webssl_repro.data.evalsets import vqa_items
from webssl_repro.data.miniweb import OBJECT_CLASSES, SEG_ID, WORDS, MiniWebConfig, render, sample_spec
from webssl_repro.evaluate.imagesets import images_tensor


def test_class_channels_are_the_renderers_segmentation():
    """Per patch, each class channel is the area fraction that class covers in the rendered mask
    (exactly: both paint the same shape masks far to near, and signs cover what lies under them)."""
    cfg, checked = MiniWebConfig(), 0
    for index in range(24):
        spec = sample_spec(0, index, cfg)
        if not spec["objects"]:
            continue
        _, seg, _ = render(spec, oracle.RENDER)
        truth = oracle.truth_map(spec, 4)
        for c, name in enumerate(OBJECT_CLASSES):
            seg_frac = F.adaptive_avg_pool2d(torch.from_numpy((seg == SEG_ID[name]).astype(np.float32))[None], 4)[0]
            torch.testing.assert_close(truth[c], seg_frac, rtol=0, atol=1e-6)
        sign = F.adaptive_avg_pool2d(torch.from_numpy((seg == SEG_ID["sign"]).astype(np.float32))[None], 4)[0]
        words = truth[-1 - len(WORDS):-1].sum(0)
        torch.testing.assert_close(words, sign, rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 20


def test_redrawn_vqa_specs_are_the_eval_images():
    """Every MMVP item (half of them the turned twin) redraws to the image the eval set holds."""
    items = vqa_items("mmvp", "test", 6)
    assert any(str(it["image_id"]).endswith("-flip") for it in items)
    for it in items:
        spec = oracle.vqa_spec(it, "test")
        redrawn, _, _ = render(spec, 64, MiniWebConfig().noise)
        assert np.array_equal(np.asarray(redrawn), np.asarray(it["image"])), it["image_id"]
    with pytest.raises(RuntimeError, match="is not image"):
        oracle.vqa_spec({**items[0], "benchmark": "gqa"}, "test")  # a different benchmark's world draw


def test_truth_tokens_look_up_the_stage_tensors():
    """The encoder finds each image by its exact input tensor; blind zeroes the same tokens;
    an image outside the table is an error, not a silent zero."""
    items = vqa_items("cvbench3d", "test", 3)
    table = {oracle._key(images_tensor([{"image": it["image"]}], 32)[0]): oracle.truth_map(oracle.vqa_spec(it, "test"), 4)
             for it in items}
    batch = images_tensor([{"image": it["image"]} for it in items], 32)
    tokens = oracle.TruthTokens(table, blind=False).forward_features(batch)
    assert tokens.shape == (3, 17, oracle.CHANNELS)
    assert torch.equal(tokens[:, 0], torch.zeros(3, oracle.CHANNELS))
    expected = torch.stack([oracle.truth_map(oracle.vqa_spec(it, "test"), 4) for it in items])
    assert torch.equal(tokens[:, 1:], expected.flatten(2).transpose(1, 2))
    assert float(tokens[:, 1:, :len(OBJECT_CLASSES)].sum()) > 0  # the scenes have objects
    assert not oracle.TruthTokens(table, blind=True).forward_features(batch).any()
    with pytest.raises(KeyError):
        oracle.TruthTokens(table, blind=False).forward_features(torch.zeros(1, 3, 32, 32))
