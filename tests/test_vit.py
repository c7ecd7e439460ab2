"""The Web-SSL ViT family: released shapes, parameter counts, and the DINOv2 extras."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from webssl_repro.resources import swiglu_hidden
from webssl_repro.models.vit import (
    ENCODERS,
    MAE_ARCHS,
    PAPER_ARCHS,
    Arch,
    arch_for,
    build_encoder,
    count_params,
    create_encoder,
    resample_pos_embed,
)
from webssl_repro.models.layers import subset_residual

# params@224 from design.md §3 / paper_facts §4.2
RELEASED_PARAMS = {"1b": 1.135e9, "2b": 2.084e9, "3b": 2.948e9, "5b": 4.938e9, "7b": 6.450e9}
SWIGLU_HIDDEN = {"1b": 4096, "2b": 7168, "3b": 8192, "5b": 9560, "7b": 10928}


@pytest.mark.parametrize("size", sorted(RELEASED_PARAMS))
def test_paper_param_counts_on_meta(size):
    with torch.device("meta"):
        model = build_encoder(PAPER_ARCHS[size])
    assert all(p.is_meta for p in model.parameters())
    assert count_params(model) == pytest.approx(RELEASED_PARAMS[size], rel=1e-3)


@pytest.mark.parametrize("size", sorted(SWIGLU_HIDDEN))
def test_swiglu_hidden_sizes(size):
    arch = PAPER_ARCHS[size]
    assert arch.ffn_hidden == SWIGLU_HIDDEN[size] == swiglu_hidden(arch.width)
    assert arch.patch == 14
    with torch.device("meta"):
        model = build_encoder(arch)
    mlp = model.blocks[0].mlp
    assert mlp.fc1.out_features == 2 * SWIGLU_HIDDEN[size]  # packed w12
    assert mlp.fc2.in_features == SWIGLU_HIDDEN[size]
    assert isinstance(mlp.act, nn.SiLU)


def test_swiglu_rounding_by_hand():
    # 4*64*2/3 = 170.67 -> 170; (170+7)//8*8 = 176.  4*1024*2/3 = 2730.67 -> 2730 -> 2736
    assert swiglu_hidden(64) == 176
    assert swiglu_hidden(1024) == 2736


def test_mae_archs():
    a = MAE_ARCHS["300m"]
    assert (a.width, a.depth, a.heads, a.ffn_hidden, a.patch) == (1024, 24, 16, 4096, 16)
    assert MAE_ARCHS["1b"].patch == 14 and MAE_ARCHS["1b"].ffn_hidden == 6144
    with torch.device("meta"):
        model = build_encoder(a, method="mae")
    blk = model.blocks[0]
    assert blk.mlp.fc1.out_features == 4096 and isinstance(blk.mlp.act, nn.GELU)
    assert isinstance(blk.ls1, nn.Identity)  # no LayerScale
    assert model.mask_token is None
    assert model.patch_embed.grid_size == (14, 14)
    assert count_params(model) == pytest.approx(0.303e9, rel=1e-3)
    assert arch_for("mae", "300m") is a and arch_for("dino", "300m") is PAPER_ARCHS["300m"]


def test_arch_from_config_and_validation():
    arch = Arch.from_config({"width": 64, "depth": 4, "heads": 4, "patch": 8})
    assert arch.ffn_hidden is None
    assert arch.hidden("swiglu") == 176 and arch.hidden("gelu") == 256
    with pytest.raises(KeyError, match="widht"):
        Arch.from_config({"widht": 64, "depth": 4, "heads": 4})
    with pytest.raises(ValueError, match="divisible"):
        Arch(width=60, depth=2, heads=8)
    with pytest.raises(ValueError, match="MAE_ARCHS"):
        PAPER_ARCHS["1b"].hidden("gelu")  # a SwiGLU size is never reused as a GELU size


def test_dino_tower_details():
    model = build_encoder(Arch(32, 3, 2, patch=8), img_size=32, drop_path_rate=0.3)
    blk = model.blocks[0]
    assert torch.all(blk.ls1.gamma == 1e-5) and torch.all(blk.ls2.gamma == 1e-5)
    assert blk.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert blk.attn.qkv.bias is not None
    assert model.num_prefix_tokens == 1 and model.reg_token is None
    # uniform stochastic depth: the first block drops as often as the last (timm's is linear);
    # above 0.1 it is DINOv2's subset form, not timm's per-sample DropPath
    assert [b.sample_drop_ratio for b in model.blocks] == [0.3, 0.3, 0.3]
    assert all(isinstance(b.drop_path1, nn.Identity) for b in model.blocks)
    low = build_encoder(Arch(32, 2, 2, patch=8), img_size=32, drop_path_rate=0.1)
    assert [b.drop_path2.drop_prob for b in low.blocks] == [0.1, 0.1]
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_encoder(Arch(32, 1, 2, patch=8), img_size=32, drop_path_rate=1.0)
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.all(model.mask_token == 0)
    assert build_encoder(Arch(32, 1, 2, patch=8), method="clip", img_size=32).mask_token is None


def test_tiny_encoder_two_resolutions():
    torch.manual_seed(0)
    model = build_encoder(Arch(32, 2, 2, patch=8), img_size=32).eval()
    for size, n in ((32, 16), (16, 4), (48, 36)):
        x = torch.randn(2, 3, size, size)
        out = model.forward_features_dict(x)
        assert out["x_norm_clstoken"].shape == (2, 32)
        assert out["x_norm_patchtokens"].shape == (2, n, 32)
        assert out["x_prenorm"].shape == (2, n + 1, 32)
        with torch.no_grad():  # every block, then the final norm, on this grid's tokens
            tokens = model.blocks(model.prepare_tokens(x))
        torch.testing.assert_close(out["x_prenorm"], tokens)
        torch.testing.assert_close(torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1),
                                   model.norm(tokens))
        if size == 32:  # the stored grid: timm's own forward, pos-embed unresampled
            torch.testing.assert_close(model.norm(tokens), model.forward_features(x))
    final, inter = model.forward_intermediates(torch.randn(2, 3, 16, 16), indices=2)
    assert final.shape == (2, 5, 32) and [t.shape for t in inter] == [(2, 32, 2, 2)] * 2


def test_pos_embed_resampled_as_dinov2():
    """Other grids (local crops, other resolutions) use DINOv2's rule: bicubic with a +0.1
    scale offset and no anti-aliasing. timm's own resampler anti-aliases when shrinking,
    which on a 16x16 -> 7x7 local-crop grid gives a visibly different (smoother) embedding."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 8) * 0.02
    assert resample_pos_embed(pos, (16, 16)) is pos
    out = resample_pos_embed(pos, (7, 7))
    assert out.shape == (1, 1 + 49, 8) and torch.equal(out[:, :1], pos[:, :1])
    # DINOv2 vision_transformer.interpolate_pos_encoding, spelled out: (7 + 0.1) / 16 per axis
    grid = pos[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, scale_factor=(7.1 / 16, 7.1 / 16), mode="bicubic",
                                          antialias=False).permute(0, 2, 3, 1).reshape(1, 49, 8)
    assert torch.allclose(out[:, 1:], ref, atol=1e-7)
    timm_out = resample_abs_pos_embed(pos, (7, 7), num_prefix_tokens=1)
    assert (out - timm_out).norm() > 0.3 * out.norm()
    # a constant field stays constant; upsampling (hi-res fine-tune) works too
    flat = torch.cat([torch.zeros(1, 1, 3), torch.full((1, 16, 3), 0.5)], dim=1)
    assert torch.allclose(resample_pos_embed(flat, (9, 9))[:, 1:], torch.full((1, 81, 3), 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.zeros(1, 1 + 12, 3), (2, 2))


def test_local_crop_tokens_use_resampled_pos_embed():
    torch.manual_seed(0)
    model = build_encoder(Arch(16, 1, 2, patch=8), img_size=32).eval()
    x = torch.randn(1, 3, 16, 16)
    tokens = model.prepare_tokens(x)
    expected = model.patch_embed(x).reshape(1, 4, 16) + resample_pos_embed(model.pos_embed, (2, 2))[:, 1:]
    assert torch.allclose(tokens[:, 1:], expected, atol=1e-6)
    assert torch.allclose(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0], atol=1e-7)


def test_masked_forward_uses_mask_token():
    torch.manual_seed(0)
    model = build_encoder(Arch(32, 2, 2, patch=8), img_size=16).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    masks = torch.tensor([[True, False, True, False]])
    tokens = model.prepare_tokens(a, masks)
    # masked patches = mask token + pos-embed (masking happens before the position embedding)
    expected = model.mask_token[0] + model.pos_embed[0, 1:]
    assert torch.allclose(tokens[0, 1:][masks[0]], expected[masks[0]], atol=1e-6)
    assert not torch.allclose(tokens[0, 2], expected[1])
    # fully masked: the image no longer matters
    full = torch.ones(1, 4, dtype=torch.bool)
    out_a = model.forward_features_dict(a, full)["x_norm_clstoken"]
    out_b = model.forward_features_dict(b, full)["x_norm_clstoken"]
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert not torch.allclose(out_a, model.forward_features_dict(a)["x_norm_clstoken"])


def test_registry_and_clip_has_no_mask_support():
    """Every paper tower is a timm model: ``timm.create_model`` builds what ``build_encoder`` does."""
    import timm

    assert set(timm.list_models("webssl_*")) == set(ENCODERS) >= {"webssl_dino7b", "webssl_mae300m", "webssl_clip1b"}
    with torch.device("meta"):
        model = timm.create_model("webssl_dino300m", img_size=518)
        same = build_encoder(PAPER_ARCHS["300m"], "dino", img_size=518)
        mae = create_encoder("webssl_mae1b")
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 1024)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in same.state_dict().items()}
    assert model.mask_token is not None and mae.mask_token is None  # MAE: its own tower, GELU MLP of 4 x width
    assert mae.blocks[0].mlp.fc1.out_features == 4 * MAE_ARCHS["1b"].width
    with pytest.raises(KeyError):
        create_encoder("webssl_dino9b")
    with pytest.raises(ValueError, match="webssl_dino1b: timm holds no weights"):
        timm.create_model("webssl_dino1b", pretrained=True)
    with torch.device("meta"):  # timm drops options that are None: 0 is "no LayerScale" both ways
        plain = create_encoder("webssl_clip1b", layerscale=0)
        scaled = create_encoder("webssl_clip1b", layerscale=None)
        direct = build_encoder(PAPER_ARCHS["1b"], "clip", layerscale=None)
    assert not any("ls1" in k for k in plain.state_dict()) and any("ls1" in k for k in scaled.state_dict())
    assert plain.state_dict().keys() == direct.state_dict().keys()
    clip = build_encoder(Arch(32, 1, 2, patch=8), method="clip", img_size=16)
    with pytest.raises(ValueError, match="mask token"):
        clip.prepare_tokens(torch.randn(1, 3, 16, 16), torch.ones(1, 4, dtype=torch.bool))


def test_subset_residual_keeps_a_fixed_share_unbiased():
    torch.manual_seed(0)
    x = torch.randn(10, 5, 8)
    branch = lambda t: 2 * t + 1  # noqa: E731
    out = subset_residual(x, branch, 0.4)
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == 6  # int(10 * 0.6) samples, every draw
    torch.testing.assert_close(out[changed], x[changed] + branch(x[changed]) * 10 / 6)
    # each sample gets the residual 6/10 of the time, weighted 10/6: on average, all of it
    added = torch.stack([subset_residual(x, torch.ones_like, 0.4) - x for _ in range(3000)]).mean(0)
    torch.testing.assert_close(added, torch.ones_like(x), atol=0.06, rtol=0)
    assert int((subset_residual(x[:1], branch, 0.9) != x[:1]).flatten(1).any(1).sum()) == 1


def test_subset_stochastic_depth_saves_compute_and_keeps_eval():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    plain = build_encoder(Arch(32, 2, 2, patch=8), img_size=32)
    dropped = build_encoder(Arch(32, 2, 2, patch=8), img_size=32, drop_path_rate=0.4)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(10, 3, 32, 32)

    def block_flops(model):
        tokens = model.prepare_tokens(x)
        with FlopCounterMode(display=False) as counter:
            for block in model.blocks:
                block(tokens)
        return counter.get_total_flops()

    # the branches run on 6 of 10 samples: 60 % of the blocks' matmul work
    assert block_flops(dropped.train()) == pytest.approx(0.6 * block_flops(plain.train()))
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval().forward_features(x), plain.eval().forward_features(x))


def test_subset_stochastic_depth_under_activation_checkpointing():
    """Recomputation must draw the same subset as the forward, or the gradients are wrong."""
    x = torch.randn(6, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_encoder(Arch(32, 2, 2, patch=8), img_size=32, drop_path_rate=0.5).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        model.forward_features_dict(x)["x_norm_clstoken"].square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
