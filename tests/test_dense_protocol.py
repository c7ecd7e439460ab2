"""The dense probes' test protocols: mmseg's sliding windows on ADE20K, native-resolution
scoring, and the Eigen crop on NYUd."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_mini import tiny_data  # noqa: F401  (fixture)
from webssl_repro.evaluate.classic import slide_setting
from webssl_repro.evaluate.dense_augment import MS_RATIO_RANGE, RATIO_RANGE
from webssl_repro.evaluate.depth import eigen_crop
from webssl_repro.evaluate.features import BlockTokens
from webssl_repro.evaluate.imagesets import EvalImages, collate_lists, image_loader, in_order, short_side_hw
from webssl_repro.evaluate.segmentation import multiscale_probs, predict, slide_logits, window_starts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_window_starts_as_mmseg():
    # ADE20K at 512 (stride 341): a 683-px side takes two windows, the last moved back to the edge
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(1024, 512, 341) == [0, 341, 512]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]  # shorter than the crop: one (clipped) window
    assert window_starts(700, 518, 345) == [0, 182]
    with pytest.raises(ValueError, match="stride 0"):
        window_starts(10, 4, 0)


def _window_mean(images):
    """Tokens: one 2x2 grid whose every token is the window's mean of channel 0."""
    m = images[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 2)  # (B, 1, 2, 2)
    patches = m.flatten(2).transpose(1, 2).unsqueeze(0)  # (1, B, 4, 1)
    return BlockTokens(patches.mean(2), patches, (2, 2), [0])


def _identity_head(maps):
    return maps[-1]


def test_slide_averages_overlapping_windows_by_hand():
    # Channel 0 holds the column index: windows of 4 columns every 3 over 10 columns start at
    # 0, 3, 6 and read means 1.5, 4.5, 7.5; columns 3 and 6 lie in two windows each.
    image = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 3, 4, 10).contiguous()
    logits = slide_logits(_identity_head, _window_mean, image, crop=(4, 4), stride=(3, 3))
    expected = torch.tensor([1.5, 1.5, 1.5, 3.0, 4.5, 4.5, 6.0, 7.5, 7.5, 7.5])
    assert logits.shape == (1, 1, 4, 10)
    assert torch.allclose(logits[0, 0], expected.expand(4, 10))
    # batched images and windows split over passes give each image what it gets alone
    batch = torch.randn(3, 3, 9, 13, generator=torch.Generator().manual_seed(0))
    together = slide_logits(_identity_head, _window_mean, batch, (4, 6), (3, 4), windows_per_pass=2)
    alone = torch.cat([slide_logits(_identity_head, _window_mean, batch[i:i + 1], (4, 6), (3, 4)) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_slide_over_one_window_is_the_whole_image_and_out_size_is_the_label_map():
    from helpers_probes import colour_features, seg_task
    from webssl_repro.evaluate.segmentation import LinearSegHead

    torch.manual_seed(0)
    images, _ = seg_task(torch.Generator().manual_seed(0))
    head = LinearSegHead(3, num_classes=3).eval()
    whole = predict(head, colour_features, images)
    assert torch.equal(predict(head, colour_features, images, slide=((16, 16), (11, 11))), whole)
    assert predict(head, colour_features, images, out_size=(20, 30), slide=((16, 16), (11, 11))).shape == (8, 20, 30)
    probs = multiscale_probs(head, colour_features, images[:2], scales=(1.0, 1.5), out_size=(20, 30),
                             slide=((16, 16), (11, 11)))
    assert probs.shape == (2, 3, 20, 30) and torch.allclose(probs.sum(1), torch.ones(2, 20, 30), atol=1e-5)


def test_slide_setting_defaults_to_two_thirds_and_names_bad_values():
    seg = {"test_mode": "slide", "slide_stride": None}
    assert slide_setting(seg, (518, 518)) == ((518, 518), (345, 345))
    assert slide_setting(seg, (512, 512)) == ((512, 512), (341, 341))  # mmseg's ADE20K numbers
    assert slide_setting(seg, (640, 640)) == ((640, 640), (426, 426))  # and its 640-px configs'
    assert slide_setting({**seg, "slide_stride": 100}, (518, 518)) == ((518, 518), (100, 100))
    assert slide_setting({**seg, "test_mode": "whole"}, (518, 518)) is None
    with pytest.raises(ValueError, match="test_mode: 'tile'"):
        slide_setting({**seg, "test_mode": "tile"}, (518, 518))
    with pytest.raises(ValueError, match="slide_stride: 600"):
        slide_setting({**seg, "slide_stride": 600}, (518, 518))


def test_short_side_fit_and_native_targets():
    assert short_side_hw(480, 640, 518) == (518, 691)
    assert short_side_hw(512, 683, 512) == (512, 683)
    assert short_side_hw(100, 1000, 50) == (50, 500)  # no cap, as DINOv2's (99999999, 512)
    seg = np.zeros((30, 40), dtype=np.uint8)
    seg[:, 20:] = 7
    records = [{"image": Image.new("RGB", (40, 30)), "seg": seg},
               {"image": Image.new("RGB", (20, 30)), "seg": np.ones((30, 20), dtype=np.uint8)}]
    images = EvalImages(records, 24, "seg", fit="short", native=True)
    (x0, y0), (x1, y1) = images[0], images[1]
    assert x0.shape == (3, 24, 32) and x1.shape == (3, 36, 24)
    assert torch.equal(y0, torch.from_numpy(seg).long()) and y1.shape == (30, 20)
    (_, xs, ys), = list(image_loader(images, in_order(2, 2), collate=collate_lists))
    assert [tuple(x.shape) for x in xs] == [(3, 24, 32), (3, 36, 24)] and [tuple(y.shape) for y in ys] == [(30, 40), (30, 20)]
    with pytest.raises(ValueError, match="use native=True"):
        EvalImages(records, 24, "seg", fit="short")
    # Training: resized to cover 24 x 24 (30 x 40 -> 24 x 32), the centre 24 columns, mask alike
    x, y = EvalImages(records, 24, "seg", fit="cover")[0]
    assert x.shape == (3, 24, 24) and y.shape == (24, 24)
    assert torch.equal(y[:, :12], torch.zeros(24, 12, dtype=torch.long)) and (y[:, 12:] == 7).all()
    x, y = EvalImages(records, (16, 24), "seg", fit="cover")[1]  # 30 x 20 -> 36 x 24, centre 16 rows
    assert x.shape == (3, 16, 24) and y.shape == (16, 24) and (y == 1).all()


def test_eigen_crop_on_nyud_frames_only():
    mask = eigen_crop((480, 640))
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600] and not mask[44, 41] and not mask[45, 601]
    with pytest.raises(ValueError, match=r"not \(64, 64\).*eigen_crop to false"):
        eigen_crop((64, 64))


def _native_val(monkeypatch, classic, hw, edit=None):
    """Serve the val split at a native size ``hw`` (images resized, masks / depth maps nearest),
    optionally edited, as a real set at its own resolution."""
    split = classic._split

    def resized(manifest, name, size, target, **kw):
        images = split(manifest, name, size, target, **kw)
        if name == "val":
            out = []
            for r in images.records:
                t = np.asarray(r[target])
                rows = np.arange(hw[0]) * t.shape[0] // hw[0]
                cols = np.arange(hw[1]) * t.shape[1] // hw[1]
                t = np.ascontiguousarray(t[rows][:, cols])
                out.append({**r, "image": r["image"].resize(hw[::-1], Image.BICUBIC),
                            target: edit(t) if edit else t})
            images.records = out
        return images

    monkeypatch.setattr(classic, "_split", resized)


def test_nyud_scores_at_480x640_inside_the_eigen_crop(tiny_data, monkeypatch):  # noqa: F811
    """Depth outside the Eigen crop changes nothing once the crop is on, and does without it."""
    from test_classic_streaming import DENSE, _encoder
    from webssl_repro.evaluate import classic

    encoder, meta = _encoder()
    on = classic.classic_config({**DENSE, "depth": {**DENSE["depth"], "eigen_crop": True}})
    off = classic.classic_config(DENSE)

    def far_border(d):
        d = d.copy()
        d[~eigen_crop(d.shape).numpy()] = 9.5
        return d

    with monkeypatch.context() as m:
        _native_val(m, classic, (480, 640))
        clean_on, clean_off = (classic.depth(encoder, meta, tiny_data["depth"], c) for c in (on, off))
    with monkeypatch.context() as m:
        _native_val(m, classic, (480, 640), far_border)
        border_on, border_off = (classic.depth(encoder, meta, tiny_data["depth"], c) for c in (on, off))
    for name in clean_on:
        assert border_on[name] == pytest.approx(clean_on[name], rel=1e-6), (clean_on, border_on)
        assert border_off[name] > 1.01 * clean_off[name], (clean_off, border_off)  # it does count there
    with pytest.raises(ValueError, match="eigen_crop to false"):  # the tiny set's own 32-px maps
        classic.depth(encoder, meta, tiny_data["depth"], on)


def test_ade20k_slides_over_each_image_and_scores_its_own_label_map(tiny_data, monkeypatch):  # noqa: F811
    from test_classic_streaming import DENSE, _encoder
    from webssl_repro.evaluate import classic, segmentation

    encoder, meta = _encoder()
    scored = []

    class Recording(segmentation.IoU):
        def add(self, pred, target):
            scored.append(tuple(target.shape))
            super().add(pred, target)

    monkeypatch.setattr(segmentation, "IoU", Recording)
    _native_val(monkeypatch, classic, (40, 72))
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 6}}
    slide = classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config(cfg))
    assert scored and set(scored) == {(1, 40, 72)}
    whole = classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config(
        {**cfg, "segmentation": {**cfg["segmentation"], "test_mode": "whole"}}))
    assert all(0.0 < v <= 100.0 for v in (*slide.values(), *whole.values())), (slide, whole)
    assert slide != whole  # 32 x 58 px, two windows, against the image squashed to 32 x 32


@pytest.mark.parametrize("augment", [False, True])
def test_ms_head_trains_and_tests_at_its_own_size(tiny_data, monkeypatch, augment):  # noqa: F811
    """``ms_img_size``: "+ms" gets its own encoder passes at its size (DINOv2's 640 px for
    512-px "lin."), in training and at test; "lin." is then the head it was beside "+ms"."""
    from test_classic_streaming import DENSE, _encoder
    from webssl_repro.evaluate import classic

    encoder, meta = _encoder()
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 6, "augment": augment}}
    trained, tested, seen = [], [], []
    stream, scores = classic._seg_training_batches, classic._seg_scores
    def batches(e, m, man, hw, n, c, ratios, start=0):
        trained.append((hw, n, ratios))
        for bt, y in stream(e, m, man, hw, n, c, ratios, start):
            seen.append((hw, tuple(y.shape[-2:])))  # the training masks are at the stream's size
            yield bt, y

    monkeypatch.setattr(classic, "_seg_training_batches", batches)
    monkeypatch.setattr(classic, "_seg_scores",
                        lambda e, m, man, hw, n, heads, k, c, *rest: tested.append((hw, n, sorted(heads)))
                        or scores(e, m, man, hw, n, heads, k, c, *rest))

    shared = classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config(cfg))
    # sharing "lin."'s batches, "+ms" sees its rescale ratios; at its own size, DINOv2's "+ms" ones
    assert trained == [((32, 32), 4, RATIO_RANGE)] and tested == [((32, 32), 4, ["ade20k_linear", "ade20k_ms"])]
    trained.clear(), tested.clear(), seen.clear()
    own = classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config(
        {**cfg, "segmentation": {**cfg["segmentation"], "ms_img_size": 48}}))
    assert trained == [((32, 32), 1, RATIO_RANGE), ((48, 48), 4, MS_RATIO_RANGE)]
    assert set(seen) == {(hw, hw) for hw, _, _ in trained}
    assert tested == [((32, 32), 1, ["ade20k_linear"]), ((48, 48), 4, ["ade20k_ms"])]
    assert own["ade20k_linear"] == pytest.approx(shared["ade20k_linear"], rel=1e-4)
    assert own["ade20k_ms"] != shared["ade20k_ms"]


def test_ms_test_scales_are_resized_from_the_original():
    """mmseg's ``MultiScaleFlipAug``: each "+ms" scale is one resize of the original image. A
    1-px checkerboard at 96 px keeps every pixel at 3x a 32-px fit, which a 32-px copy scaled
    up cannot; the 1.0 level is the single-scale test's image."""
    from webssl_repro.evaluate.imagesets import ScalePyramid, image_tensor
    from webssl_repro.evaluate.segmentation import MS_SCALES

    board = ((np.indices((96, 96)).sum(0) % 2) * 255).astype(np.uint8)
    records = [{"image": Image.fromarray(board).convert("RGB"), "seg": np.zeros((96, 96), dtype=np.uint8)}]
    pyramid, y = EvalImages(records, 32, "seg", fit="short", native=True, scales=(1.0, 3.0))[0]
    assert len(pyramid) == 2 and pyramid.original.shape == (3, 96, 96) and y.shape == (96, 96)
    assert [tuple(x.shape) for x in pyramid] == [(1, 3, 32, 32), (1, 3, 96, 96)]  # one-image batches
    assert torch.equal(pyramid[0][0], EvalImages(records, 32, "seg", fit="short", native=True)[0][0])
    assert torch.equal(pyramid[1][0], image_tensor(records[0]["image"], 96, "short"))
    sign = torch.from_numpy(board[None].astype(np.float32) * 2 / 255 - 1)  # +1 white, -1 black
    assert (pyramid[1][0] * sign > 0).all()  # every pixel on its side of the mean
    upscaled = torch.nn.functional.interpolate(pyramid[0], size=(96, 96), mode="bilinear")[0]
    assert (upscaled * sign > 0).float().mean() < 0.75
    squash, _ = EvalImages(records, (16, 24), "seg", fit="squash", native=True, scales=(1.0, 1.5))[0]
    assert [tuple(x.shape[-2:]) for x in squash] == [(16, 24), (24, 36)]
    # DINOv2's "+ms" at 644 px on a 512 x 683 ADE20K image: shorter sides int(644 x ratio),
    # mmseg's rescale (int(683 x factor + 0.5)), worked by hand
    ade = ScalePyramid(torch.empty(3, 512, 683, device="meta"), (644, 644), "short", MS_SCALES)
    assert [tuple(x.shape[-2:]) for x in ade] == [(644, 859), (850, 1134), (1114, 1486), (1468, 1958), (1932, 2577)]
    moved = squash.to("meta")  # the levels are made where the original is (the encoder's device)
    assert moved.original.device.type == "meta" and moved[1].device.type == "meta" and moved[1].shape == squash[1].shape
    with pytest.raises(ValueError, match="scales need native targets"):
        EvalImages(records, 32, "seg", fit="squash", scales=(1.0, 2.0))
    with pytest.raises(ValueError, match="scale 2.0 needs fit 'short' or 'squash'"):
        image_tensor(records[0]["image"], 32, "crop", scale=2.0)


def test_a_pyramid_gives_the_ms_test_its_levels_as_they_are():
    from helpers_probes import colour_features, seg_task
    from webssl_repro.evaluate.imagesets import ScalePyramid
    from webssl_repro.evaluate.segmentation import LinearSegHead

    torch.manual_seed(0)
    images, _ = seg_task(torch.Generator().manual_seed(0), n=2)
    head = LinearSegHead(3, num_classes=3, n_layers=4).eval()
    scales = (1.0, 1.5, 2.0)
    rescaled = [images] + [torch.nn.functional.interpolate(images, scale_factor=s, mode="bilinear")
                           for s in scales[1:]]
    assert torch.allclose(multiscale_probs(head, colour_features, rescaled, scales),
                          multiscale_probs(head, colour_features, images, scales), atol=1e-6)
    sharper = [images, torch.rand(2, 3, 24, 24), torch.rand(2, 3, 32, 32)]  # other content: other output
    assert not torch.allclose(multiscale_probs(head, colour_features, sharper, scales),
                              multiscale_probs(head, colour_features, images, scales), atol=1e-3)
    with pytest.raises(ValueError, match="a pyramid of 2 levels for 3 scales"):
        multiscale_probs(head, colour_features, rescaled[:2], scales)
    made = ScalePyramid(images[0], (16, 16), "squash", (1.0, 1.25, 2.0))
    assert [tuple(x.shape[-2:]) for x in made] == [(16, 16), (20, 20), (32, 32)]
    with pytest.raises(ValueError, match=r"made at scales \(1.0, 1.25, 2.0\) for scales \(1.0, 1.5, 2.0\)"):
        multiscale_probs(head, colour_features, made, scales)
    with pytest.raises(TypeError, match="not a pyramid"):
        predict(head, colour_features, rescaled)


@pytest.mark.parametrize("ms_img_size", [None, 48])
def test_ade20k_ms_head_reads_each_scale_from_the_original(tiny_data, monkeypatch, ms_img_size):  # noqa: F811
    """In ``classic.segmentation`` "+ms" gets the 40 x 72 val images resized once per scale,
    at "lin."'s 32 px or its own 48; "lin." gets its single-scale test (the 1.0 level)."""
    from test_classic_streaming import DENSE, _encoder
    from webssl_repro.evaluate import classic, segmentation
    from webssl_repro.evaluate.imagesets import image_tensor, load_split

    encoder, meta = _encoder()
    _native_val(monkeypatch, classic, (40, 72))
    seen = []
    predict_ = segmentation.predict

    def recording(head, fn, images, multiscale=False, *args, **kw):
        seen.append((multiscale, images))
        return predict_(head, fn, images, multiscale, *args, **kw)

    monkeypatch.setattr(segmentation, "predict", recording)
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 2, "augment": False,
                                      "ms_img_size": ms_img_size}}
    classic.segmentation(encoder, meta, tiny_data["segmentation"], classic.classic_config(cfg))
    n_val = len(load_split(tiny_data["segmentation"], "val"))
    first = load_split(tiny_data["segmentation"], "val")[0]["image"].resize((72, 40), Image.BICUBIC)
    (lin_ms, lin), (ms_ms, levels) = seen[0], seen[1 if ms_img_size is None else n_val]
    assert not lin_ms and ms_ms and len(levels) == len(segmentation.MS_SCALES) and len(seen) == 2 * n_val
    size = ms_img_size or 32
    for s, level in zip(segmentation.MS_SCALES, levels):
        assert torch.equal(level[0], image_tensor(first, size, "short", scale=s)), s
    assert torch.equal(lin[0], image_tensor(first, 32, "short"))
    # 1.32: a shorter side of int(size x 1.32), the longer int(72 x that / 40 + 0.5), by hand
    assert [tuple(levels[i].shape[-2:]) for i in (1, 4)] == ([(42, 76), (96, 173)] if ms_img_size is None
                                                           else [(63, 113), (144, 259)])
