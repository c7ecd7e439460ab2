"""Web-MAE: loss on hand-computed cases, masking, sin-cos positions, a tiny training run."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from webssl_repro.methods.base import PretrainMethod
from webssl_repro.methods.mae import (
    MaeConfig, MaeMethod, mae_loss, mae_transform, patchify, random_masking,
    sincos_pos_embed_2d, unpatchify,
)

# One image, two "patches" of 3 values (p=1, 3 channels).
TARGET = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]]])
PRED = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             num_classes=0, **kw)


def tiny_config(**kw) -> MaeConfig:
    return MaeConfig(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, **kw)


def test_mae_loss_raw_pixels_hand_case():
    # patch 0: (1² + 2² + 3²)/3 = 14/3 ; patch 1: (1² + 1² + 4²)/3 = 6
    assert mae_loss(PRED, TARGET, torch.tensor([[1.0, 0.0]]), norm_pix=False).item() == pytest.approx(14 / 3)
    assert mae_loss(PRED, TARGET, torch.tensor([[0.0, 1.0]]), norm_pix=False).item() == pytest.approx(6.0)
    assert mae_loss(PRED, TARGET, torch.tensor([[1.0, 1.0]]), norm_pix=False).item() == pytest.approx(16 / 3)


def test_mae_loss_norm_pix_hand_case():
    # patch 0 [1,2,3]: mean 2, unbiased var 1 -> [-1,0,1]; vs 0: 2/3
    # patch 1 [2,2,5]: mean 3, unbiased var 3 -> [-1,-1,2]/√3; vs [1,1,1]: 2(1+1/√3)² + (1-2/√3)² = 5 -> 5/3
    eps = 1e-6
    m0 = torch.tensor([[1.0, 0.0]])
    assert mae_loss(PRED, TARGET, m0).item() == pytest.approx(2 / 3 / (1 + eps), rel=1e-6)
    assert mae_loss(PRED, TARGET, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(5 / 3, rel=1e-5)
    assert mae_loss(PRED, TARGET, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(7 / 6, rel=1e-5)


def test_norm_pix_uses_unbiased_variance():
    # With the biased variance (2/3) patch 0 would normalise to [-1,0,1]·√1.5 and give loss 1.0.
    loss = mae_loss(PRED, TARGET, torch.tensor([[1.0, 0.0]])).item()
    assert loss == pytest.approx(0.6666660, abs=1e-6)
    assert abs(loss - 1.0) > 0.3


def test_patchify_order_and_roundtrip():
    imgs = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    x = patchify(imgs, 2)
    assert x.shape == (2, 6, 12)
    # patch 4 = row 1, col 1; its first pixel is image (2, 2), channels interleaved last
    assert x[1, 4, :3].tolist() == imgs[1, :, 2, 2].tolist()
    assert x[1, 4, 3:6].tolist() == imgs[1, :, 2, 3].tolist()  # q (column) varies before p (row)
    assert torch.equal(unpatchify(x, 2, grid=(2, 3)), imgs)
    sq = torch.randn(1, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(sq, 4), 4), sq)


@pytest.mark.parametrize("length,ratio,keep", [(16, 0.75, 4), (196, 0.75, 49), (20, 0.55, 9)])
def test_random_masking_counts_and_unshuffle(length, ratio, keep):
    x = torch.randn(3, length, 5)
    kept, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(1))
    assert kept.shape == (3, keep, 5)
    assert mask.sum(dim=1).tolist() == [length - keep] * 3
    # put kept tokens back (zeros for removed) in original order: equals x where mask == 0
    padded = torch.cat([kept, torch.zeros(3, length - keep, 5)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(restored, x * (1 - mask).unsqueeze(-1))


def test_random_masking_reproducible_with_generator():
    x = torch.randn(2, 16, 4)
    a = random_masking(x, 0.75, torch.Generator().manual_seed(7))[1]
    b = random_masking(x, 0.75, torch.Generator().manual_seed(7))[1]
    c = random_masking(x, 0.75, torch.Generator().manual_seed(8))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sincos_values_at_known_positions():
    emb = sincos_pos_embed_2d(8, (2, 3), num_prefix=1)
    assert emb.shape == (7, 8)
    assert emb[0].tolist() == [0.0] * 8  # CLS slot
    assert emb[1].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # row 0, col 0
    # token row 1, col 2: ω = (1, 0.01); first half encodes the column, second the row
    expect = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
              math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    assert emb[1 + 5].tolist() == pytest.approx(expect, abs=1e-7)


def test_method_freezes_sincos_positions_and_groups_params():
    method = MaeMethod(tiny_vit(), tiny_config())
    assert isinstance(method, PretrainMethod)
    enc = method.encoder()
    assert not enc.pos_embed.requires_grad
    assert torch.equal(enc.pos_embed[0], sincos_pos_embed_2d(32, 4, 1))
    assert torch.equal(method.model.decoder_pos_embed[0], sincos_pos_embed_2d(32, 4, 1))
    decay, no_decay = method.param_groups(1e-3, 0.05)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert id(enc.pos_embed) not in ids(decay["params"]) | ids(no_decay["params"])
    assert id(enc.cls_token) in ids(decay["params"])  # MAE decays cls/mask tokens (ndim 3)
    assert {id(enc.norm.weight), id(enc.blocks[0].attn.qkv.bias)} <= ids(no_decay["params"])
    assert (decay["wd_multiplier"], no_decay["wd_multiplier"]) == (1.0, 0.0)
    n_trainable = sum(p.numel() for p in method.model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_trainable


def test_few_steps_reduce_loss_on_fixed_batch():
    method = MaeMethod(tiny_vit(), tiny_config())
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    imgs = torch.stack([torch.stack([torch.sin(6 * (xx * (1 + i) + c * yy)) for c in range(3)])
                        for i in range(4)])
    groups = method.param_groups(5e-3, 0.05)
    opt = torch.optim.AdamW(groups, betas=method.config.betas)
    losses = []
    for step in range(40):
        out = method.training_step({"images": imgs}, step, generator=torch.Generator().manual_seed(0))
        assert out["mask_fraction"].item() == pytest.approx(0.75)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_optimizer_step(step)
        losses.append(out["loss"].item())
    # predicting each patch's mean (zero after norm_pix) scores (n-1)/n ≈ 0.99: go well below it
    assert losses[-1] < 0.85 and losses[-1] < 0.7 * losses[0]
    # the frozen positions did not move
    assert torch.equal(method.encoder().pos_embed[0], sincos_pos_embed_2d(32, 4, 1))


def test_decoder_residual_stream_is_fp32_under_bf16_autocast():
    """MAE adds its fp32 mask token and positions to the autocast output, which promotes the
    decoder's residual stream to fp32; casting them to bf16 kept the whole stream in bf16."""
    method = MaeMethod(tiny_vit(), tiny_config())
    seen = []
    method.model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step({"images": torch.randn(2, 3, 32, 32)}, 0, torch.Generator().manual_seed(0))
    assert seen == [torch.float32] and torch.isfinite(out["loss"])


def test_state_dict_roundtrip_gives_identical_loss():
    a = MaeMethod(tiny_vit(), tiny_config())
    torch.manual_seed(3)
    b = MaeMethod(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                    num_classes=0), tiny_config())
    assert set(a.state_dict()) == {"config"}  # weights travel in the loop's model checkpoint
    b.load_state_dict({"model": a.model.state_dict(), **a.state_dict()})
    imgs = torch.randn(2, 3, 32, 32)
    la = a.training_step({"images": imgs}, 0, torch.Generator().manual_seed(5))["loss"]
    lb = b.training_step({"images": imgs}, 0, torch.Generator().manual_seed(5))["loss"]
    assert la.item() == lb.item()
    # helper-156 L3: a checkpoint of another recipe is refused, naming what changed
    import dataclasses

    other = MaeMethod(tiny_vit(), dataclasses.replace(tiny_config(), mask_ratio=0.5))
    with pytest.raises(ValueError, match=r"another config \(mask_ratio: 0.75 -> 0.5\)"):
        other.load_state_dict({"model": a.model.state_dict(), **a.state_dict()})


def test_config_defaults_and_from_mapping():
    c = MaeConfig()
    assert (c.mask_ratio, c.norm_pix, c.lr) == (0.75, True, 1.6e-3)
    assert (c.batch_size, c.warmup_iters) == (4096, 80_000)
    assert (c.betas, c.weight_decay, c.decoder_depth, c.decoder_embed_dim) == ((0.9, 0.95), 0.05, 8, 512)
    m = MaeConfig.from_mapping({"decoder_depth": 1, "betas": [0.9, 0.99]})
    assert m.decoder_depth == 1 and m.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="mask_ration"):
        MaeConfig.from_mapping({"mask_ration": 0.5})


def test_transform_crops_flips_and_normalises():
    torch.manual_seed(0)
    out = mae_transform(32)(Image.new("RGB", (64, 48), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    assert out[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-3)
    assert out[1].mean().item() == pytest.approx(-0.456 / 0.224, abs=1e-3)
    # MAE's recipe on an image whose red rises left to right: crops of 20-100 % of the area
    # (the crop's red span), mirrored half of the time (its slope's sign)
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).expand(48, 64)
    image = Image.fromarray(torch.stack([ramp, torch.zeros_like(ramp), torch.zeros_like(ramp)], -1).numpy())
    spans, mirrored = [], []
    for _ in range(300):
        red = mae_transform(32)(image)[0].mean(0) * 0.229 + 0.485  # back to [0, 1], mean over rows
        spans.append((red.max() - red.min()).item())
        mirrored.append(bool(red[0] > red[-1]))
    assert 0.41 < sum(mirrored) / 300 < 0.59  # p = 0.5; 300 draws: s.e. 2.9 points
    assert min(spans) < 0.45 and max(spans) > 0.9 and 0.45 < sum(spans) / 300 < 0.85


@pytest.mark.parametrize("method_name", ["mae", "clip"])
def test_a_high_resolution_mae_or_clip_run_starts_from_its_parent(tmp_path, method_name):
    """MAE's and CLIP's ``state.pt`` is their model, not the method: the fine-tune at 48 px
    loads it from the 32 px parent, learned pos-embeds resampled; MAE's fixed sin-cos tables
    are its own grid's (a resampled table is not the sin-cos of the new grid)."""
    from helpers_mini import run_slice
    from webssl_repro.models.vit import resample_pos_embed
    from webssl_repro.runs import Run
    from webssl_repro.train.run import _exported, _load_parent, build

    class Captions:  # what CLIP's mini tokenizer is learned from
        def caption_texts(self):
            return ["a red circle", "a blue square on grass"] * 8

    run = Run.parse(f"{method_name}1b-full2b-224")
    cfg = {**run_slice(run.name, 64), "_workdir": str(tmp_path)}
    torch.manual_seed(0)
    parent = _exported(build(run, {**cfg, "img_size": 32}, Captions())[0])
    torch.save(parent.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(1)
    method = build(run, {**cfg, "img_size": 48}, Captions())[0]
    child = _exported(method)
    fresh = {k: v.clone() for k, v in child.state_dict().items()}
    _load_parent(method, tmp_path / "state.pt")
    got, want = child.state_dict(), parent.state_dict()
    resampled = 0
    for key, value in want.items():
        if got[key].shape == value.shape:
            assert torch.equal(got[key], value), key
        elif method_name == "mae":  # the sin-cos table at 48 px
            assert key == "encoder.pos_embed" and torch.equal(got[key], fresh[key]), key
            resampled += 1
        else:
            torch.testing.assert_close(got[key], resample_pos_embed(value, (6, 6), 1))
            resampled += 1
    assert resampled == 1 and len(want) > 20
    with pytest.raises(ValueError, match="is not of this method: unexpected keys"):
        _load_parent(method, _dino_state(tmp_path))


def _dino_state(tmp_path):
    from helpers_mini import run_slice
    from webssl_repro.runs import Run
    from webssl_repro.train.run import build

    run = Run.parse("dino1b-full2b-224")
    torch.save(build(run, {**run_slice(run.name, 64), "img_size": 32}, corpus=None)[0].state_dict(),
               tmp_path / "dino.pt")
    return tmp_path / "dino.pt"


@pytest.mark.parametrize("method_name", ["dino", "clip"])
def test_a_tower_without_layerscale_is_refused_before_training(method_name):
    """Encoder files, their loader and the HF export all hold LayerScale: a tower trained without
    it would fit none of them, found only at its first evaluation."""
    from helpers_mini import run_slice
    from webssl_repro.runs import Run
    from webssl_repro.train.run import build

    run = Run.parse(f"{method_name}1b-full2b-224")
    cfg = run_slice(run.name, 64)
    cfg["recipe"] = {**cfg.get("recipe", {}), "layerscale": 0.0}
    with pytest.raises(ValueError, match=rf"pretrain.{method_name}.layerscale: 0.0; LayerScale's initial gain"):
        build(run, {**cfg, "img_size": 32}, corpus=None)
