"""The batched photometric ops equal torchvision's tensor kernels crop by crop."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from webssl_repro.data import photometric as P


@pytest.fixture
def crops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 12, 10, generator=g)
    x[0] = 0.5  # a gray image: hue is undefined, saturation 0
    return x


@pytest.mark.parametrize("name,tv,factors", [
    ("adjust_brightness", TF.adjust_brightness, [0.6, 1.0, 1.4, 0.8, 1.2]),
    ("adjust_contrast", TF.adjust_contrast, [0.6, 1.0, 1.4, 0.8, 1.2]),
    ("adjust_saturation", TF.adjust_saturation, [0.8, 1.0, 1.2, 0.9, 1.1]),
    ("adjust_hue", TF.adjust_hue, [-0.1, 0.0, 0.1, 0.05, -0.07]),
])
def test_colour_ops_match_torchvision(crops, name, tv, factors):
    out = getattr(P, name)(crops.clone(), torch.tensor(factors))
    want = torch.stack([tv(c, f) for c, f in zip(crops, factors)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_grayscale_and_blur_match_torchvision(crops):
    torch.testing.assert_close(P.grayscale(crops), TF.rgb_to_grayscale(crops), atol=1e-6, rtol=0)
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0]
    out = P.gaussian_blur(crops.clone(), torch.tensor(sigmas))
    want = torch.stack([TF.gaussian_blur(c, [9, 9], [s, s]) for c, s in zip(crops, sigmas)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_pipeline_probabilities_and_determinism():
    x = torch.rand(2000, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    always = P.Photometric(jitter_p=0.0, grayscale_p=1.0)
    y = always(x.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    never = P.Photometric(jitter_p=0.0, grayscale_p=0.0)
    assert torch.equal(never(x.clone(), torch.Generator().manual_seed(0)), x)
    half = P.Photometric(jitter_p=0.0, grayscale_p=0.0, solarize_p=0.5)
    changed = (half(x.clone(), torch.Generator().manual_seed(0)) != x).flatten(1).any(1).float().mean()
    assert 0.45 < changed < 0.55, changed  # 2000 draws: s.e. 1.1 points
    full = P.Photometric(blur_p=0.5, solarize_p=0.2)
    a, b = (full(x.clone(), torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def _images(n: int):
    from webssl_repro.data.miniweb import MiniWebConfig, generate

    return [generate(0, i, MiniWebConfig(size=64)).image for i in range(n)]


def test_batched_multicrop_shapes_and_determinism():
    from webssl_repro.data.multicrop import BatchedMultiCrop

    aug = BatchedMultiCrop(global_size=32, local_size=16, n_local=3)
    images = _images(4)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return aug.collate([aug.crops(im, g) for im in images], g)

    out = batch(0)
    assert out["global_crops"].shape == (8, 3, 32, 32) and out["local_crops"].shape == (12, 3, 16, 16)
    assert torch.equal(out["global_crops"], batch(0)["global_crops"])
    assert not torch.equal(out["global_crops"], batch(1)["global_crops"])
    # crop-major, as the DINO loss pairs them: with the photometrics off, row v·B + i of each
    # output is view v of image i, normalised
    from webssl_repro.data.augmentations import IMAGENET_MEAN, IMAGENET_STD

    aug.views = tuple(P.Photometric(jitter_p=0.0, grayscale_p=0.0) for _ in range(3))
    cut = [aug.crops(im, torch.Generator().manual_seed(i)) for i, im in enumerate(images)]
    out = aug.collate(cut, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def normalised(crop):
        return (torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0 - mean) / std

    for i in range(4):
        for v in range(2):
            torch.testing.assert_close(out["global_crops"][v * 4 + i], normalised(cut[i]["global"][v]))
        for v in range(3):
            torch.testing.assert_close(out["local_crops"][v * 4 + i], normalised(cut[i]["local"][v]))


def test_global_views_applied_together_equal_each_view_alone():
    """``collate`` applies both global views as one batch: bit for bit what each view's own
    pipeline gives its crops, with the generator drawn in the same order (view 1, 2, local)."""
    from webssl_repro.data.multicrop import BatchedMultiCrop

    aug = BatchedMultiCrop(global_size=32, local_size=16, n_local=3)
    cut = [aug.crops(im, torch.Generator().manual_seed(i)) for i, im in enumerate(_images(12))]
    out = aug.collate(cut, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    mean, std = aug._mean, aug._std

    def alone(view, arrays):
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return (aug.views[view](x, g) - mean) / std

    want = [alone(0, [c["global"][0] for c in cut]), alone(1, [c["global"][1] for c in cut]),
            alone(2, [c["local"][i] for i in range(3) for c in cut])]
    assert torch.equal(out["global_crops"], torch.cat(want[:2])) and torch.equal(out["local_crops"], want[2])
    assert not torch.equal(want[0], (torch.from_numpy(np.stack([c["global"][0] for c in cut])).permute(0, 3, 1, 2)
                                     .float() / 255.0 - mean) / std)  # the photometrics changed something
    aug.views = (aug.views[0], P.Photometric(blur_kernel=5), aug.views[2])
    with pytest.raises(ValueError, match=r"differ in \(blur_kernel, solarize_threshold\): \(3, .*\) vs \(5, "):
        aug.collate(cut, torch.Generator().manual_seed(5))


def test_each_view_has_dinov2s_blur_and_solarize():
    """DINOv2's code: blur never on the first global view, 0.9 on the second (with solarize 0.2),
    0.5 on local crops (``blur_convention`` in augmentations.py)."""
    from webssl_repro.data.multicrop import BatchedMultiCrop

    aug = BatchedMultiCrop(global_size=32, local_size=16, n_local=3)
    assert [(v.blur_p, v.solarize_p) for v in aug.views] == [(0.0, 0.0), (0.9, 0.2), (0.5, 0.0)]
    nominal = BatchedMultiCrop(global_size=32, local_size=16, n_local=3, blur_convention="nominal")
    assert [v.blur_p for v in nominal.views] == [1.0, 0.1, 0.5]


def test_each_crop_draws_like_torchvision():
    """RandomApply(ColorJitter, p=0.8) with ColorJitter's order drawn per crop, then grayscale
    0.2, blur and solarize at the view's rates, sigma in [0.1, 2]."""
    draws = P.Photometric(blur_p=0.5, solarize_p=0.2).draw(4000, torch.Generator().manual_seed(0))
    rates = {k: draws[k].float().mean().item() for k in ("jitter", "grayscale", "blur", "solarize")}
    want = {"jitter": 0.8, "grayscale": 0.2, "blur": 0.5, "solarize": 0.2}
    assert all(abs(rates[k] - want[k]) < 0.025 for k in want), rates  # 4000 draws: s.e. <= 0.8 points
    assert (draws["order"].sort(dim=1).values == torch.arange(4)).all()  # each op once per crop
    assert len({tuple(o) for o in draws["order"].tolist()}) == 24  # in every order
    for name, (lo, hi) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2),
                           "hue": (-0.1, 0.1), "sigma": (0.1, 2.0)}.items():
        assert lo <= draws[name].min() and draws[name].max() <= hi and draws[name].std() > (hi - lo) / 4


def test_batched_pipeline_equals_torchvision_crop_by_crop():
    """Given each crop's draws, the batched ops equal torchvision's kernels run on that crop
    alone, in its drawn order."""
    pipeline = P.Photometric(blur_p=0.5, solarize_p=0.2)
    x = torch.rand(300, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    draws = pipeline.draw(300, torch.Generator().manual_seed(0))
    out = pipeline.apply(x.clone(), draws)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    names = ("brightness", "contrast", "saturation", "hue")
    for i, crop in enumerate(x):
        if draws["jitter"][i]:
            for k in draws["order"][i].tolist():
                crop = ops[k](crop, draws[names[k]][i].item())
        if draws["grayscale"][i]:
            crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
        if draws["blur"][i]:
            crop = TF.gaussian_blur(crop, [9, 9], [draws["sigma"][i].item()] * 2)
        if draws["solarize"][i]:
            crop = TF.solarize(crop, 128 / 255)
        torch.testing.assert_close(out[i], crop, atol=1e-5, rtol=0, msg=f"crop {i}")


def test_crops_flip_half_of_the_time(monkeypatch):
    """Each crop is mirrored with probability 0.5 (RandomHorizontalFlip), after its resize."""
    import numpy as np
    from PIL import Image

    from webssl_repro.data import multicrop

    image = _images(1)[0]
    monkeypatch.setattr(multicrop, "resized_crop_box", lambda w, h, *_: (0, 0, w, h))  # the whole image
    plain = np.asarray(image.resize((32, 32), Image.BICUBIC, box=(0, 0, image.width, image.height)))
    g = torch.Generator().manual_seed(0)
    crops = [multicrop._crop(image, 32, (0.32, 1.0), g) for _ in range(400)]
    flipped = [np.array_equal(c, plain[:, ::-1]) for c in crops]
    assert all(f or np.array_equal(c, plain) for c, f in zip(crops, flipped))
    assert 0.43 < np.mean(flipped) < 0.57  # 400 draws: s.e. 2.5 points


def test_batched_multicrop_matches_torchvision_pipeline_in_distribution():
    """Per-view channel means/stds over 192 images agree with ``MultiCropAugmentation``'s
    (which runs torchvision per crop) within 0.15 normalised units. The two draw different
    random numbers, so only the distribution can agree: two torchvision runs under different
    seeds differ by up to 0.09 here, a wrong assembly (no normalisation, swapped channels,
    jitter on every crop) by several tenths or more."""
    from webssl_repro.data.augmentations import MultiCropAugmentation
    from webssl_repro.data.multicrop import BatchedMultiCrop

    images = _images(192)
    ref = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    new = BatchedMultiCrop(global_size=32, local_size=16, n_local=2)
    g = torch.Generator().manual_seed(0)
    ref_crops = [ref(im, generator=g) for im in images]
    ref_views = [torch.stack([c["global_crops"][v] for c in ref_crops]) for v in range(2)]
    ref_views.append(torch.stack([c["local_crops"][i] for i in range(2) for c in ref_crops]))
    out = new.collate([new.crops(im, g) for im in images], g)
    new_views = [*out["global_crops"].chunk(2), out["local_crops"]]
    for a, b in zip(ref_views, new_views):
        assert a.shape == b.shape
        torch.testing.assert_close(a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3)), atol=0.15, rtol=0)
        torch.testing.assert_close(a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3)), atol=0.15, rtol=0)


def test_high_resolution_runs_blur_like_the_base_resolution():
    """DINOv2's 378/518 phase keeps the 224-px blur: a hi-res run's blur is its base crop's."""
    import yaml
    from pathlib import Path

    from webssl_repro.data.augmentations import blur_kernel_size, blur_sigma_range
    from webssl_repro.workflow import Plan

    mini = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "mini.yaml").read_text())
    plan = Plan(mini)
    base = int(mini["labels"]["resolutions"]["224"])
    for run in ("dino7b-full8b-224", "dino7b-full8b-518"):
        assert plan.run_config(run)["recipe"]["blur_reference_size"] == base
    paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())
    assert Plan(paper).run_config("dino7b-full8b-518")["recipe"]["blur_reference_size"] == 224
    assert blur_sigma_range(224) == (0.1, 2.0) and blur_kernel_size(224) == 9


def test_high_resolution_runs_keep_the_parent_local_crops():
    """App. C: "all other parameters remain exactly the same": 98-px local crops at 378 / 518,
    and the resource estimate counts those; a 224 px run sizes them by its own crop."""
    from webssl_repro.resources import (DINO_GLOBAL, DINO_LOCAL, FWD_BWD, forward_flops, pretrain_resources,
                                        samples_of)
    from webssl_repro.runs import Run
    from webssl_repro.workflow import Plan, shipped_plan

    paper = shipped_plan("paper")
    for res in (378, 518):
        assert paper.run_config(f"dino7b-full8b-{res}")["recipe"]["local_crop_size"] == 98
    assert "local_crop_size" not in paper.run_config("dino7b-full8b-224")["recipe"]  # train.run: 98 of 224
    mini = shipped_plan("mini")
    assert mini.run_config("dino7b-full8b-518")["recipe"]["local_crop_size"] == 16  # 98/224 of mini's 32 px
    cfg = dict(paper.config, pretrain={**paper.config["pretrain"], "dino": {**paper.config["pretrain"]["dino"],
                                                                           "local_crop_size": 112}})
    assert Plan(cfg).run_config("dino7b-full8b-518")["recipe"]["local_crop_size"] == 112
    # 8 local crops of 7x7 patches (+ CLS) at 518 as at 224, not of 16x16 (the crop scaled to 224 px)
    run = Run.parse("dino7b-full8b-518")
    flops = pretrain_resources(run, paper.config).train_flops
    arch = paper.config["labels"]["sizes"]["7b"]
    trained = FWD_BWD + 1  # paper.yaml recomputes the fine-tunes' blocks: the student's forward twice
    per_sample = (DINO_GLOBAL * forward_flops("dino", arch, 518) * (1 + trained)
                  + DINO_LOCAL * trained * forward_flops("dino", arch, 98))
    assert flops == per_sample * samples_of(run, paper.config)
    # a configured local-crop side is what the estimate counts too, at 224 px as at 518
    overridden = Plan(cfg)
    for name, img in (("dino7b-full8b-518", 518), ("dino7b-full2b-224", 224)):
        run = Run.parse(name)
        trained = FWD_BWD + (img == 518)
        per_sample = (DINO_GLOBAL * forward_flops("dino", arch, img) * (1 + trained)
                      + DINO_LOCAL * trained * forward_flops("dino", arch, 112))
        assert overridden.pretrain_resources(name).train_flops == per_sample * samples_of(run, paper.config)
        assert overridden.pretrain_resources(name).train_flops > paper.pretrain_resources(name).train_flops
