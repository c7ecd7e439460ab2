"""SigLIP and SigLIP 2 ViT-SO400M/14 (Tables 3 and 14) as the off-the-shelf runs ``siglip-so400m-224/384``
and ``siglip2-so400m-224/384``: towers without a class token, with a tanh-GELU MLP and a valid patch
convolution, read from transformers' ``SiglipModel`` without their attention-pooling head. Tiny random
stand-ins only."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from PIL import Image

from helpers_stand_ins import fixed_images, randomize_, same_state
from webssl_repro.config import ConfigError
from webssl_repro.evaluate.features import block_tokens
from webssl_repro.evaluate.imagesets import IMAGENET_MEAN, IMAGENET_STD, image_tensor
from webssl_repro.models.arch import Arch
from webssl_repro.models.convert import load_into_encoder
from webssl_repro.models.hf import SIGLIP_HEAD_NOTE, export_hf, import_hf, import_native
from webssl_repro.models.io import load_encoder, trained_pixel_mean
from webssl_repro.models.released import load_released, run_checkpoint, write_run_encoder
from webssl_repro.models.vit import build_encoder
from webssl_repro.plan_checks import check_run_sources
from webssl_repro.resources import encoder_params

torch.set_num_threads(1)
IMG, PATCH = 24, 7  # 24 px is off the patch grid, as 384 px is at patch 14: 3 x 3 patches, 3 px unseen
TINY_SIGLIP = Arch(32, 2, 4, 72, PATCH, "gelu_tanh", class_token=False)
RUNS = {"siglip-so400m-224": ("google/siglip-so400m-patch14-224", "d04cf29fca7b6374f74d8bea1969314492266b5e"),
        "siglip-so400m-384": ("google/siglip-so400m-patch14-384", "9fdffc58afc957d1a03a25b10dba0329ab15c2a3"),
        "siglip2-so400m-224": ("google/siglip2-so400m-patch14-224", "78e403963a4f6a3640d07803284752326fdf4edf"),
        "siglip2-so400m-384": ("google/siglip2-so400m-patch14-384", "e8e487298228002f3d8a82e0cd5c8ea9c567f57f")}


def _siglip_stand_in(path=None, seed=0, **vision):
    """A tiny ``SiglipModel`` (the layout of the hub's repos, a text tower beside the vision tower) with every
    weight off its init; saved to ``path`` when given."""
    from transformers import SiglipConfig, SiglipModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    config = SiglipConfig(text_config=text, vision_config=dict(
        hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH,
        image_size=IMG, **vision))
    torch.manual_seed(seed)
    model = randomize_(SiglipModel(config), seed)
    if path is not None:
        model.save_pretrained(path)
    return model


def _tiny(monkeypatch, run="siglip-so400m-384"):
    rel = run_checkpoint(run)
    monkeypatch.setattr(type(rel), "arch", property(lambda self: TINY_SIGLIP))
    return dataclasses.replace(rel, img_size=IMG, trained_size=0)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_so400m_runs_are_transformers_siglip_towers_without_their_head(run):
    import timm

    rel = run_checkpoint(run)
    res = int(run.rsplit("-", 1)[1])
    assert (rel.hf_id, rel.revision) == RUNS[run] and rel.pytorch_url is None
    assert (rel.method, rel.size, rel.data, rel.img_size, rel.weights_size) == ("siglip", "so400m14", "webli", res, res)
    assert rel.arch == Arch(1152, 27, 16, 4304, 14, "gelu_tanh", class_token=False)
    with torch.device("meta"):
        tower = build_encoder(rel.arch, "siglip", img_size=res)
        reference = timm.create_model(f"vit_so400m_patch14_siglip_{res}", pretrained=False)
    n = sum(p.numel() for p in tower.parameters())
    # timm's own SO400M/14 less its attention-pooling head, weight for weight: 27 x 27 = 729 positions at 384 px
    shapes = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("attn_pool.")}
    assert {k: v.shape for k, v in tower.state_dict().items()} == shapes
    assert n == {224: 412_442_352, 384: 412_987_248}[res]
    assert encoder_params("siglip", dataclasses.asdict(rel.arch), res) == n
    assert tower.cls_token is None and tower.mask_token is None and tower.pos_embed.shape == (1, (res // 14) ** 2, 1152)
    assert tower.blocks[0].mlp.act.approximate == "tanh"


def test_the_hub_s_configs_import_as_the_released_arch():
    """The SO400M/14 configs of the hub's repos (config.json: 1152 wide, MLP 4304, 27 layers, 16 heads, patch 14;
    image_size 384, or none: 224) build, on the meta device, the tower each run is checked against."""
    from transformers import SiglipConfig, SiglipModel

    for run in ("siglip-so400m-224", "siglip2-so400m-384"):
        rel = run_checkpoint(run)
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      patch_size=14, **({"image_size": 384} if rel.img_size == 384 else {}))
        with torch.device("meta"):
            model = SiglipModel(SiglipConfig(vision_config=vision))
        encoder, meta = import_hf(model)
        assert (meta["method"], meta["arch"], meta["img_size"]) == ("siglip", {
            "width": 1152, "depth": 27, "heads": 16, "ffn_hidden": 4304, "patch": 14, "class_token": False},
            rel.img_size)
        assert encoder.arch == rel.arch and encoder.pos_embed.shape == (1, (rel.img_size // 14) ** 2, 1152)


def test_hf_siglip_imports_to_transformers_own_tokens_at_a_size_off_the_patch_grid(tmp_path, monkeypatch):
    hf = _siglip_stand_in(tmp_path / "hf")
    encoder, meta = load_released(_tiny(monkeypatch), tmp_path / "hf")
    assert meta["method"] == "siglip" and meta["arch"]["class_token"] is False and SIGLIP_HEAD_NOTE in meta["notes"]
    x = fixed_images(IMG)
    with torch.no_grad():
        out = hf.vision_model(pixel_values=x)  # after post_layernorm: 9 patch tokens, 3 px unseen on each side's end
        got = encoder.forward_features_dict(x)
        tokens = block_tokens(encoder, x, norm=True)
    want = out.last_hidden_state
    assert want.shape == (2, 9, 32) and want.abs().mean() > 0.1
    torch.testing.assert_close(got["x_norm_patchtokens"], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["x_norm_clstoken"], want.mean(1), atol=1e-5, rtol=0)
    assert tokens.grid == (3, 3)
    torch.testing.assert_close(tokens.patches[-1], want, atol=1e-5, rtol=0)
    # the pixels past the last whole patch are not seen, by either tower
    shifted = x.clone()
    shifted[..., 21:, :] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(shifted), encoder.forward_features(x), atol=0, rtol=0)
    # the MAP head's pooled output is not the CLS the evaluations read
    assert not torch.allclose(out.pooler_output, got["x_norm_clstoken"], atol=1e-2)
    with pytest.raises(ValueError, match=r"imported off-the-shelf tower .* is not exported"):
        export_hf(encoder, meta, tmp_path / "export")


def test_vision_tower_alone_and_model_objects_import_the_same(tmp_path, monkeypatch):
    """The hub's repos are SiglipModels; a SiglipVisionModel directory (with or without its head) and either
    model object give the same encoder, and the LayerNorm eps is the config's."""
    from transformers import SiglipVisionModel

    hf = _siglip_stand_in(tmp_path / "hf")
    encoder = load_released(_tiny(monkeypatch), tmp_path / "hf")[0]
    hf.vision_model.save_pretrained(tmp_path / "vision")
    config = copy.deepcopy(hf.config.vision_config)
    config.vision_use_head = False
    headless = SiglipVisionModel(config)
    headless.load_state_dict({k: v for k, v in hf.vision_model.state_dict().items() if not k.startswith("head.")})
    headless.save_pretrained(tmp_path / "headless")
    for source in (tmp_path / "vision", tmp_path / "headless", hf, hf.vision_model):
        other, meta = import_hf(source)
        assert same_state(other, encoder), source
        assert (SIGLIP_HEAD_NOTE in meta["notes"]) == (source != tmp_path / "headless")
    # a file without the head beside a config that declares one: the head transformers would fill at random
    # is not imported, so nothing is missing
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "vision" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "head." not in k}, weights, metadata={"format": "pt"})
    assert same_state(import_hf(tmp_path / "vision")[0], encoder)
    _siglip_stand_in(tmp_path / "eps", layer_norm_eps=1e-5)
    assert import_hf(tmp_path / "eps")[0].norm.eps == 1e-5
    _siglip_stand_in(tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(ValueError, match=r"SigLIP hidden_act 'gelu'; SigLIP's towers use 'gelu_pytorch_tanh'"):
        import_hf(tmp_path / "gelu")


def test_run_dir_rebuilds_it_on_imagenet_normalised_pixels(tmp_path, monkeypatch):
    """SigLIP trains on pixels in [-1, 1] (mean and std 0.5); the run dir's encoder takes the
    ImageNet-normalised pixels every evaluation feeds and gives transformers' tokens of the same image."""
    hf = _siglip_stand_in(tmp_path / "hf")
    encoder, meta = load_released(_tiny(monkeypatch), tmp_path / "hf")
    write_run_encoder(encoder, meta, tmp_path / "run")
    loaded, loaded_meta = load_encoder(tmp_path / "run" / "encoder.safetensors")
    assert loaded_meta["method"] == "siglip" and loaded.input_stats == ((0.5,) * 3, (0.5,) * 3)
    pixels = fixed_images(IMG).sigmoid()  # an image in [0, 1]
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        want = hf.vision_model(pixel_values=(pixels - 0.5) / 0.5).last_hidden_state
        got = loaded.forward_features_dict((pixels - mean) / std)["x_norm_patchtokens"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the VQA square padding fills with SigLIP's own mean, 0 in the pixels it trained on
    assert trained_pixel_mean(loaded) == (0.5, 0.5, 0.5)
    padded = image_tensor(Image.new("RGB", (40, 20), (255, 0, 0)), 20, "pad", pad_mean=trained_pixel_mean(loaded))
    siglip_pixels = (padded * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    assert ((siglip_pixels[:, :3] - 0.5) / 0.5).abs().max() < 0.01  # the band above the image


def test_siglip_files_are_refused_by_name(tmp_path, monkeypatch):
    """SigLIP's own checkpoints are big_vision .npz files, not read here: a file is refused by the import and,
    where it exists, by the dry run; a transformers directory is what the run reads."""
    npz = tmp_path / "webli_en_so400m_384_58765454.npz"
    npz.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"/ckpt/siglip-so400m-patch14-384: no such directory \(a local copy of "
                                                 r"google/siglip-so400m-patch14-384, a transformers model\)"):
        load_released(run_checkpoint("siglip-so400m-384"), "/ckpt/siglip-so400m-patch14-384")
    with pytest.raises(ValueError, match=r"webli_en_so400m_384_58765454.npz: SigLIP's own checkpoints are big_vision"):
        load_released(_tiny(monkeypatch), npz)
    with pytest.raises(ValueError, match=r"big_vision .npz files"):
        import_native({}, "siglip", TINY_SIGLIP, IMG)
    checkpoint = "google/siglip-so400m-patch14-384"
    with pytest.raises(ConfigError, match=r"siglip-so400m-384.path: \S+npz is a file, but siglip-so400m-384 imports "
                                          r"from a transformers model directory only"):
        check_run_sources({"siglip-so400m-384": {"checkpoint": checkpoint, "path": str(npz)}}, "paper", [0])
    check_run_sources({"siglip-so400m-384": {"checkpoint": checkpoint, "path": str(tmp_path)}}, "paper", [0])
    check_run_sources({"siglip2-so400m-224": {"checkpoint": "google/siglip2-so400m-patch14-224"}}, "paper", [0])


def test_a_position_grid_of_another_resolution_is_named():
    """A checkpoint whose position embeddings are another grid than the run's resolution gives is named with
    both grids (a tower without a class token: every position is a patch)."""
    state = build_encoder(TINY_SIGLIP, "siglip", img_size=IMG).state_dict()
    with pytest.raises(KeyError, match=r"positions are a 3x3 patch grid, that of img_size 21-27; img_size=35 "
                                       r"gives 5x5"):
        load_into_encoder(state, "siglip", TINY_SIGLIP, 35, source="stand-in")
