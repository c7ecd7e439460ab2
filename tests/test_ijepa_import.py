"""I-JEPA ViT-H/14 (Tables 3 and 14) as the off-the-shelf run ``ijepa-h-224``: a plain GELU ViT
without a class token, read from transformers' ``IJepaModel`` and from I-JEPA's own checkpoint,
whose CLS for the evaluations is the mean of its patch tokens. Tiny random stand-ins only."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers_stand_ins import fixed_images, randomize_, same_state
from webssl_repro.evaluate.features import block_cls, block_tokens
from webssl_repro.evaluate.vqa.data import encoder_tokens
from webssl_repro.models.arch import Arch, arch_for
from webssl_repro.models.hf import export_hf, import_hf
from webssl_repro.models.io import load_encoder
from webssl_repro.models.released import load_released, run_checkpoint, write_run_encoder
from webssl_repro.models.vit import build_encoder
from webssl_repro.resources import encoder_params

torch.set_num_threads(1)
IMG = 32
TINY_IJEPA = Arch(32, 2, 4, 64, 8, "gelu", norm_eps=1e-6, class_token=False)


def _ijepa_stand_in(path, seed=0, eps=1e-6):
    """A tiny ``IJepaModel`` (I-JEPA's eps 1e-6, as the hub's config) with every weight off its init."""
    from transformers import IJepaConfig, IJepaModel

    config = IJepaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         patch_size=8, image_size=IMG, layer_norm_eps=eps)
    torch.manual_seed(seed)
    model = randomize_(IJepaModel(config, add_pooling_layer=False), seed)
    model.save_pretrained(path)
    return model


def _tiny(monkeypatch):
    rel = run_checkpoint("ijepa-h-224")
    monkeypatch.setattr(type(rel), "arch", property(lambda self: TINY_IJEPA))
    return dataclasses.replace(rel, img_size=IMG, trained_size=0)


def test_ijepa_h_is_a_vit_h_without_class_token():
    rel = run_checkpoint("ijepa-h-224")
    assert (rel.hf_id, rel.method, rel.size, rel.data, rel.img_size) == (
        "facebook/ijepa_vith14_22k", "ijepa", "h14", "in22k", 224)
    assert rel.revision == "ba3c4513ca2b0f0c010f80ae2265b3dbe1083039"
    assert rel.pytorch_url == "https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.h.14-900e.pth.tar"
    assert rel.arch == Arch(1280, 32, 16, 5120, 14, "gelu", class_token=False)
    with torch.device("meta"):
        tower, mae_h = build_encoder(rel.arch, "ijepa", img_size=224), build_encoder(arch_for("mae", "700m"), "mae")
    n = sum(p.numel() for p in tower.parameters())
    # MAE's ViT-H/14 less the class token and its position: 256 positions, not 257
    assert n == sum(p.numel() for p in mae_h.parameters()) - 2 * 1280 == 630_762_240
    assert encoder_params("ijepa", dataclasses.asdict(rel.arch), 224) == n
    assert tower.cls_token is None and tower.pos_embed.shape == (1, 256, 1280) and tower.mask_token is None


def test_hf_ijepa_imports_to_transformers_own_tokens_and_its_cls_is_their_mean(tmp_path, monkeypatch):
    hf = _ijepa_stand_in(tmp_path / "hf")
    encoder, meta = load_released(_tiny(monkeypatch), tmp_path / "hf")
    assert meta["method"] == "ijepa" and meta["arch"]["class_token"] is False
    assert any("context encoder, not the target encoder" in note for note in meta["notes"])
    x = fixed_images(IMG)
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state  # after the final LayerNorm, 16 patch tokens, no CLS
        got = encoder.forward_features_dict(x)
    assert want.shape == (2, 16, 32) and want.abs().mean() > 0.1
    torch.testing.assert_close(got["x_norm_patchtokens"], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["x_norm_clstoken"], want.mean(1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"imported off-the-shelf tower .* is not exported"):
        export_hf(encoder, meta, tmp_path / "export")
    # the LayerNorm eps comes from the config, as it is (transformers' own default is 1e-12)
    _ijepa_stand_in(tmp_path / "eps", eps=1e-5)
    assert import_hf(tmp_path / "eps")[0].norm.eps == 1e-5
    # evaluated at another resolution than it was trained at: 16 positions resampled to 36, none a CLS
    wider, wider_meta = load_released(dataclasses.replace(_tiny(monkeypatch), img_size=48, trained_size=IMG),
                                      tmp_path / "hf")
    assert wider.pos_embed.shape == (1, 36, 32) and "from 4x4 (32 px) to 6x6 (48 px)" in wider_meta["notes"][-1]


def test_native_file_gives_the_target_encoder_and_the_run_dir_rebuilds_it(tmp_path, monkeypatch):
    """I-JEPA's .pth.tar holds the context encoder, its EMA target encoder and the predictor, with DDP's
    ``module.`` prefix; the import takes the target encoder, the one I-JEPA evaluates."""
    tiny = _tiny(monkeypatch)
    for name, seed in (("target", 0), ("context", 1)):
        _ijepa_stand_in(tmp_path / name, seed)
    target, context = (load_released(tiny, tmp_path / name)[0] for name in ("target", "context"))

    def ddp(encoder):
        return {f"module.{k}": v.clone() for k, v in encoder.state_dict().items()}

    # the keys of I-JEPA's train.py checkpoints, the GradScaler's state among them
    torch.save({"encoder": ddp(context), "target_encoder": ddp(target), "predictor": {"module.w": torch.ones(2)},
                "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "weight_decay": 0.05, "params": [0]}]},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "epoch": 300, "loss": 0.12, "batch_size": 128, "world_size": 16, "lr": 1e-3},
               tmp_path / "IN22K-vit.h.14-900e.pth.tar")
    native, meta = load_released(tiny, tmp_path / "IN22K-vit.h.14-900e.pth.tar")
    assert same_state(native, target) and not same_state(native, context)
    assert {"encoder", "predictor", "opt", "scaler", "epoch"} <= set(meta["ignored_keys"])
    assert any(note.startswith("I-JEPA's target encoder") for note in meta["notes"])
    write_run_encoder(native, meta, tmp_path / "run")
    loaded, loaded_meta = load_encoder(tmp_path / "run" / "encoder.safetensors")
    assert loaded_meta["arch"]["class_token"] is False and loaded.norm.eps == 1e-6
    x = fixed_images(IMG)
    with torch.no_grad():  # I-JEPA trains on ImageNet-normalised pixels, as the evaluations feed them
        torch.testing.assert_close(loaded.forward_features(x), native.forward_features(x), atol=1e-6, rtol=0)


def test_block_tokens_of_a_tower_without_class_token_average_its_patches():
    """Every protocol reads a CLS (linear: normed, last blocks; depth and alignment: un-normed): for a tower
    without one it is the mean of the block's patch tokens, by either path of ``evaluate.features``."""
    encoder = build_encoder(TINY_IJEPA, "ijepa", img_size=IMG).eval()
    x = fixed_images(IMG)
    with torch.no_grad():
        normed, raw = block_tokens(encoder, x, norm=True), block_tokens(encoder, x, norm=False)
        hooked = block_cls(encoder, x)
        final = encoder.forward_features_dict(x)
    assert normed.patches.shape == (2, 2, 16, 32) and normed.grid == (4, 4)  # no token dropped as a prefix
    torch.testing.assert_close(normed.cls, normed.patches.mean(2))
    torch.testing.assert_close(raw.cls, raw.patches.mean(2))
    assert not torch.allclose(normed.cls, raw.cls, atol=1e-3)
    torch.testing.assert_close(hooked, raw.cls)
    torch.testing.assert_close(normed.cls[-1], final["x_norm_clstoken"])
    torch.testing.assert_close(normed.patches[-1], final["x_norm_patchtokens"])
    # a plain callable with every block's tokens, told there is no prefix: the same CLS
    listed = block_tokens(lambda images: list(raw.patches), x, num_prefix_tokens=0)
    torch.testing.assert_close(listed.cls, raw.cls)
    # the VQA probe's visual tokens: all 16 patches (Table 14 reads only these), none dropped as a CLS
    with torch.no_grad():
        tokens = encoder_tokens(encoder, x, n_tokens=16)
    torch.testing.assert_close(tokens, final["x_norm_patchtokens"])
