"""The classic probes' test-time augmentation and precision as DINOv2 runs them: NYUd and ADE20K
"+ms" score the mean of an image's and its mirror's predictions, and bf16 autocasts the frozen
encoder only, never the heads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers_mini import tiny_data  # noqa: F401  (fixture)
from test_classic_streaming import DENSE, _encoder


def test_precision_autocasts_the_encoder_only(tiny_data):  # noqa: F811
    """bf16 changes the frozen features (so it is applied), but the heads train in fp32, so the
    mIoUs move by far less than 0.05 points (measured 0.0007 / 0.0016); an unknown precision is named."""
    from webssl_repro.evaluate import classic

    encoder, meta = _encoder()
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 4}}
    fp32 = classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config(cfg))
    bf16 = classic.segmentation(encoder, meta, tiny_data["segmentation"],
                                classic.classic_config({**cfg, "precision": "bf16"}))
    assert fp32 != bf16 and all(abs(bf16[k] - fp32[k]) < 0.05 for k in fp32), (fp32, bf16)
    with pytest.raises(ValueError, match="evaluate.classic.precision: 'fp8'"):
        classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config({**cfg, "precision": "fp8"}))


def test_depth_test_averages_each_image_with_its_mirror(tiny_data, monkeypatch):  # noqa: F811
    """DINOv2's NYUd flip test-time augmentation: mirroring the val set (images and depth
    maps) leaves the RMSEs unchanged, since each prediction is the mean of an image's and
    its mirror's. A ViT alone is not mirror-symmetric, so without it they would move."""
    from webssl_repro.evaluate import classic

    encoder, meta = _encoder()
    cfg = classic.classic_config(DENSE)
    plain = classic.depth(encoder, meta, tiny_data["depth"], cfg)
    split = classic._split

    def mirrored_val(manifest, name, size, target, **kw):
        images = split(manifest, name, size, target, **kw)
        if name == "val":
            images.records = [{**r, "image": r["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                               "depth": np.ascontiguousarray(np.asarray(r["depth"])[:, ::-1])} for r in images.records]
        return images

    monkeypatch.setattr(classic, "_split", mirrored_val)
    mirrored = classic.depth(encoder, meta, tiny_data["depth"], cfg)
    for name in plain:
        assert mirrored[name] == pytest.approx(plain[name], rel=1e-4), (plain, mirrored)


def test_depth_flip_tta_scores_the_mean_of_the_image_and_its_mirror(tiny_data, monkeypatch):  # noqa: F811
    """Each scored prediction is 0.5 x (head(image) + mirror(head(mirror(image)))), resized to
    the depth map; and the mirror view changes it (so the TTA is not a no-op)."""
    from webssl_repro.evaluate import classic
    from webssl_repro.evaluate import depth as depth_mod
    from webssl_repro.evaluate.features import BlockTokens
    from webssl_repro.evaluate.probe_batches import tokens_fn

    encoder, meta = _encoder()
    cfg = classic.classic_config(DENSE)
    heads, scored = [], []
    init, add = depth_mod.DepthLinearHead.__init__, depth_mod.RMSE.add

    def keep(self, *a, **kw):
        init(self, *a, **kw)
        heads.append(self)

    def record(self, pred, target, valid):
        scored.append(pred.detach().clone())
        add(self, pred, target, valid)

    monkeypatch.setattr(depth_mod.DepthLinearHead, "__init__", keep)
    monkeypatch.setattr(depth_mod.RMSE, "add", record)
    classic.depth(encoder, meta, tiny_data["depth"], cfg)

    specs = [[int(meta["depth"]) - 1], depth_mod.lin4_blocks(int(meta["depth"]))]
    blocks = sorted({b for s in specs for b in s})
    fn = tokens_fn(encoder, meta, blocks, False, cfg)
    val = classic._split(tiny_data["depth"], "val", (32, 32), "depth", native=True)
    expected, moved = [], 0.0
    bs = int(cfg["batch_size"])
    with torch.no_grad():
        for start in range(0, len(val), bs):
            items = [val[i] for i in range(start, min(start + bs, len(val)))]
            x = torch.stack([im for im, _ in items])
            plain, mirror = fn(x), fn(x.flip(-1))
            for head, chosen in zip(heads, specs):
                pos = [blocks.index(b) for b in chosen]

                def sub(bt):
                    return BlockTokens(bt.cls[pos], bt.patches[pos], bt.grid, chosen)

                p0, p1 = head.eval()(sub(plain)), head(sub(mirror)).flip(-1)
                moved = max(moved, float((p0 - p1).abs().max()))
                for p, (_, d) in zip(0.5 * (p0 + p1), items):
                    expected.append(F.interpolate(p.unsqueeze(0), size=d.shape[-2:], mode="bilinear",
                                                  align_corners=False).squeeze(1))
    assert len(scored) == len(expected) == 2 * len(val)
    assert moved > 1e-3  # the mirror's prediction differs from the image's
    for got, want in zip(scored, expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocasts_the_encoder_and_never_the_heads(tiny_data, monkeypatch):  # noqa: F811
    """Under precision bf16 the encoder's blocks compute in bf16, while every segmentation and
    depth head, in training and at test, reads float32 tokens and computes in float32."""
    from webssl_repro.evaluate import classic, depth, segmentation

    encoder, meta = _encoder()
    head_dtypes, block_dtypes = {"segmentation": set(), "depth": set()}, set()
    seg_init, depth_logits = segmentation.LinearSegHead.__init__, depth.DepthLinearHead.token_logits

    def seg_hooked(self, *a, **kw):
        seg_init(self, *a, **kw)
        self.conv.register_forward_hook(
            lambda m, i, o: head_dtypes["segmentation"].add((i[0].dtype, m.weight.dtype, o.dtype)))

    def depth_hooked(self, patches, cls, grid):  # depth's head applies its conv's weights itself
        out = depth_logits(self, patches, cls, grid)
        head_dtypes["depth"].add((patches.dtype, self.conv.weight.dtype, out.dtype))
        return out

    monkeypatch.setattr(segmentation.LinearSegHead, "__init__", seg_hooked)
    monkeypatch.setattr(depth.DepthLinearHead, "token_logits", depth_hooked)
    for module in encoder.blocks.modules():  # the blocks' matmuls (their residual sums stay float32)
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, o: block_dtypes.add(o.dtype))
    cfg = classic.classic_config({**DENSE, "precision": "bf16",
                                  "segmentation": {**DENSE["segmentation"], "iters": 4},
                                  "depth": {**DENSE["depth"], "iters": 4}})
    classic.segmentation(encoder, meta, tiny_data["segmentation"], cfg)
    classic.depth(encoder, meta, tiny_data["depth"], cfg)
    assert block_dtypes == {torch.bfloat16}, block_dtypes
    fp32 = {(torch.float32, torch.float32, torch.float32)}
    assert head_dtypes == {"segmentation": fp32, "depth": fp32}, head_dtypes


def test_ms_flip_tta_is_the_mean_of_the_image_and_its_mirror_probs():
    """"+ms" at one scale: 0.5 x (softmax(image) + mirror(softmax(mirror(image)))), with a
    feature function that is not mirror-equivariant (a position-dependent term)."""
    from helpers_probes import colour_features, seg_task
    from webssl_repro.evaluate.features import BlockTokens
    from webssl_repro.evaluate.segmentation import LinearSegHead, multiscale_probs, seg_logits

    def positional(images):
        bt = colour_features(images)
        ramp = torch.linspace(0, 3, bt.patches.shape[2]).view(1, 1, -1, 1)
        return BlockTokens(bt.cls, bt.patches + ramp, bt.grid, bt.indices)

    torch.manual_seed(0)
    images, _ = seg_task(torch.Generator().manual_seed(0), n=2)
    head = LinearSegHead(3, num_classes=3, n_layers=4).eval()
    torch.nn.init.normal_(head.conv.weight, 0.0, 1.0)
    with torch.no_grad():
        plain = seg_logits(head, positional, images).softmax(1)
        mirror = seg_logits(head, positional, images.flip(-1)).softmax(1).flip(-1)
    assert not torch.allclose(plain, mirror, atol=1e-3)
    got = multiscale_probs(head, positional, images, scales=(1.0,))
    assert torch.allclose(got, 0.5 * (plain + mirror), atol=1e-6)
