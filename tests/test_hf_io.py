"""Export/import of our encoders to transformers' Dinov2Model / ViTModel and native layouts.

Tiny random-init models only (no hub downloads): parity is checked on outputs, and round
trips must reproduce every tensor bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import re
from functools import partial

import pytest
import torch

from helpers_stand_ins import fixed_images, randomize_
from webssl_repro.models import convert
from webssl_repro.models.hf import export_hf, import_hf, import_native, swiglu_mlp_ratio
from webssl_repro.models.io import load_encoder
from webssl_repro.models.released import import_released, load_released, released_checkpoint, released_checkpoints
from webssl_repro.models.vit import PAPER_ARCHS, Arch, build_encoder

torch.set_num_threads(1)
TINY = Arch(64, 2, 4, patch=8)
IMG = 32


def _encoder(method, arch=TINY, seed=0):
    return randomize_(build_encoder(arch, method, img_size=IMG), seed)


def _meta(method, arch=TINY):
    return {"method": method, "arch": {"width": arch.width, "depth": arch.depth,
                                       "heads": arch.heads, "patch": arch.patch}, "img_size": IMG}


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method", ["dino", "clip"])
def test_dinov2_export_matches_and_round_trips(tmp_path, method):
    from transformers import Dinov2Model

    enc = _encoder(method)
    export_hf(enc, _meta(method), tmp_path)
    hf = Dinov2Model.from_pretrained(tmp_path).eval()
    assert hf.config.use_swiglu_ffn and hf.config.mlp_ratio == 4
    assert hf.config.layerscale_value == 1e-5 and hf.config.layer_norm_eps == 1e-6
    x = fixed_images(IMG)
    with torch.no_grad():
        out = hf(pixel_values=x)
        ours = enc.forward_features_dict(x)
    tokens = torch.cat([ours["x_norm_clstoken"][:, None], ours["x_norm_patchtokens"]], dim=1)
    assert out.last_hidden_state.shape == (2, 1 + (IMG // 8) ** 2, 64)
    diff = (out.last_hidden_state - tokens).abs().max().item()
    assert diff < 1e-4, diff
    assert (out.pooler_output - ours["x_norm_clstoken"]).abs().max().item() < 1e-4
    assert tokens.abs().mean() > 0.1  # the comparison is not between two near-zero tensors

    back, meta = import_hf(tmp_path)
    assert meta["method"] == method and meta["arch"]["ffn_hidden"] == 176
    _assert_same_state(enc, back)
    back2, _ = import_hf(hf)  # an already-instantiated model
    _assert_same_state(enc, back2)


def test_vit_export_matches_and_round_trips(tmp_path):
    from transformers import ViTModel

    enc = _encoder("mae")
    export_hf(enc, _meta("mae"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "vit" and cfg["intermediate_size"] == 256
    assert cfg["hidden_act"] == "gelu" and cfg["layer_norm_eps"] == 1e-6
    hf = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    x = fixed_images(IMG)
    with torch.no_grad():
        diff = (hf(pixel_values=x).last_hidden_state - enc.forward_features(x)).abs().max().item()
    assert diff < 1e-4, diff
    back, meta = import_hf(tmp_path)
    assert meta["method"] == "mae" and meta["arch"]["ffn_hidden"] == 256
    _assert_same_state(enc, back)


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_hf_directory_missing_a_weight_is_refused(tmp_path, method):
    """transformers fills a weight the files lack with random values and only logs it."""
    from safetensors.torch import load_file, save_file

    export_hf(_encoder(method), _meta(method), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = min(k for k in weights if ".1." in k and k.endswith("bias"))  # a bias of the second block
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    # named as the loaded model names it (transformers 5 renames some layers on load)
    with pytest.raises(KeyError, match=rf"{tmp_path}: the checkpoint lacks 1 of the (dinov2|vit) model's weights, "
                                       r"e.g. \S*\.1\.\S*bias\W*$"):
        import_hf(tmp_path)


@pytest.mark.parametrize("method,kind", [("dino", "dinov2"), ("mae", "vit")])
def test_raw_hf_files_match_our_key_tables(tmp_path, method, kind):
    """transformers writes its files in the 4.x names of the uploaded facebook/webssl-* repos
    (5.x reverses its renames on save), so the raw file checks our legacy table against
    transformers' own mapping, which a self-consistent round trip could not."""
    from safetensors.torch import load_file

    enc = _encoder(method)
    export_hf(enc, _meta(method), tmp_path)
    raw = load_file(str(tmp_path / "model.safetensors"))
    legacy = convert.hf_is_legacy(raw)
    ours = convert.to_hf(enc.state_dict(), kind, legacy=legacy)
    assert sorted(raw) == sorted(ours)
    for k in raw:
        assert torch.equal(raw[k], ours[k]), k
    for k, v in convert.from_hf(raw, kind).items():
        assert torch.equal(v, enc.state_dict()[k]), k
    # the other naming generation imports to the same tensors
    other = convert.to_hf(enc.state_dict(), kind, legacy=not legacy)
    assert sorted(convert.from_hf(other, kind)) == sorted(enc.state_dict())
    for k, v in convert.from_hf(other, kind).items():
        assert torch.equal(v, enc.state_dict()[k]), k


@pytest.mark.parametrize("chunks", [0, 4])
def test_native_dinov2_layout_round_trip(chunks):
    arch = Arch(64, 5, 4, patch=8)  # depth 5, 4 chunks: chunk size 1, uneven tail chunk
    enc = _encoder("dino", arch)
    native = convert.to_native(enc.state_dict(), "dino", block_chunks=chunks, depth=arch.depth)
    assert "mlp.w12.weight" in "".join(native) and "mlp.fc1" not in "".join(native)
    if chunks:
        assert "blocks.4.4.mlp.w3.weight" in native and "blocks.1.1.ls1.gamma" in native
    else:
        assert "blocks.4.mlp.w3.weight" in native
    back, meta = import_native(native, "dino", arch, IMG)
    _assert_same_state(enc, back)
    assert meta["notes"] == [] and meta["ignored_keys"] == []


def test_native_teacher_file_unpacked_swiglu_and_missing_mask_token(tmp_path):
    enc = _encoder("dino")
    native = convert.to_native(enc.state_dict(), "dino")
    teacher = {f"backbone.{k}": v for k, v in native.items() if k != "mask_token"}
    for i in range(TINY.depth):  # xFormers' unpacked SwiGLU: w1 | w2 instead of w12
        for p in ("weight", "bias"):
            w1, w2 = teacher.pop(f"backbone.blocks.{i}.mlp.w12.{p}").chunk(2, dim=0)
            teacher[f"backbone.blocks.{i}.mlp.w1.{p}"] = w1
            teacher[f"backbone.blocks.{i}.mlp.w2.{p}"] = w2
    teacher["dino_head.last_layer.weight"] = torch.zeros(3, 3)
    torch.save({"teacher": teacher}, tmp_path / "t.pth")
    back, meta = import_native(tmp_path / "t.pth", "dino", TINY, IMG)
    assert meta["ignored_keys"] == ["dino_head.last_layer.weight"]
    assert "mask_token" in meta["notes"][0]
    ref = {k: v for k, v in enc.state_dict().items() if k != "mask_token"}
    for k, v in ref.items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.count_nonzero(back.mask_token) == 0


def test_native_mae_is_timm_layout(tmp_path):
    """A released Web-MAE ``.pth`` is a plain timm ViT's state dict (``mae.mae`` builds one and loads
    it strictly): one from timm itself, not from our encoder, imports and gives timm's tokens."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    ref = VisionTransformer(img_size=IMG, patch_size=TINY.patch, embed_dim=TINY.width, depth=TINY.depth,
                            num_heads=TINY.heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    torch.save(ref.state_dict(), tmp_path / "webssl_mae_tiny.pth")
    enc, _ = import_native(tmp_path / "webssl_mae_tiny.pth", "mae", TINY, IMG)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want, got = ref.forward_features(x), enc.eval().forward_features_dict(x)
    assert torch.allclose(got["x_norm_clstoken"], want[:, 0], atol=1e-5)
    assert torch.allclose(got["x_norm_patchtokens"], want[:, 1:], atol=1e-5)
    back, _ = import_native(dict(enc.state_dict()), "mae", TINY, IMG)
    _assert_same_state(enc, back)


def test_bad_checkpoints_name_the_key():
    enc = _encoder("dino")
    native = convert.to_native(enc.state_dict(), "dino")
    extra = {**native, "blocks.0.attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        import_native(extra, "dino", TINY, IMG)
    lost = {k: v for k, v in native.items() if k != "blocks.1.ls2.gamma"}
    with pytest.raises(KeyError, match=r"blocks\.1\.ls2\.gamma"):
        import_native(lost, "dino", TINY, IMG)
    with pytest.raises(KeyError, match=r"pos_embed.*a 4x4 patch grid, that of img_size 32-39; img_size=64 gives 8x8"):
        import_native(native, "dino", TINY, 64)


def test_bad_checkpoint_files_are_named(tmp_path):
    enc = _encoder("dino")
    pth = tmp_path / "dino.pth"
    torch.save(convert.to_native(enc.state_dict(), "dino"), pth)
    deeper = Arch(64, 6, 4, patch=8)  # 4 blocks more: 4 x 14 keys missing, listed in brief
    with pytest.raises(KeyError, match=rf"{pth}: checkpoint does not fit a dino encoder .*: 56 missing key\(s\) "
                                       r"\[blocks\.2\.[^]]*, \.\.\. 48 more\], 0 unexpected \[\]"):
        import_native(pth, "dino", deeper, IMG)
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "head.pth")
    with pytest.raises(KeyError, match=rf"{tmp_path / 'head.pth'}: no 'pos_embed' key"):
        import_native(tmp_path / "head.pth", "dino", TINY, IMG)
    export_hf(enc, _meta("dino"), tmp_path / "hf")
    with pytest.raises(ValueError, match=r"model.safetensors: a native checkpoint is a .pth / .pt file; for a "
                                         r"transformers model give its directory"):
        import_native(tmp_path / "hf" / "model.safetensors", "dino", TINY, IMG)
    with pytest.raises(FileNotFoundError, match=r"nowhere.pth: no such checkpoint file"):
        import_native(tmp_path / "nowhere.pth", "dino", TINY, IMG)
    hf = convert.to_hf(enc.state_dict(), "dinov2")
    del hf["encoder.layer.0.mlp.up_proj.bias"]
    with pytest.raises(KeyError, match=r"encoder\.layer\.0\.mlp\.up_proj\.bias"):
        convert.from_hf(hf, "dinov2")
    hf["encoder.layer.0.attention.rope.inv_freq"] = torch.ones(2)
    with pytest.raises(KeyError, match=r"encoder\.layer\.0\.attention\.rope\.inv_freq"):
        convert.from_hf(hf, "dinov2")


def test_swiglu_ratio_matches_hf_rule(tmp_path):
    from transformers import Dinov2Model

    for arch in PAPER_ARCHS.values():
        assert swiglu_mlp_ratio(arch.width, arch.hidden("swiglu")) == 4
    odd = Arch(64, 1, 4, ffn_hidden=88, patch=8, ffn="swiglu")
    assert swiglu_mlp_ratio(64, 88) == 2
    enc = _encoder("dino", odd)
    export_hf(enc, _meta("dino", odd), tmp_path)
    hf = Dinov2Model.from_pretrained(tmp_path).eval()
    assert hf.encoder.layer[0].mlp.down_proj.in_features == 88
    with torch.no_grad():
        diff = (hf(pixel_values=fixed_images(IMG)).pooler_output
                - enc.forward_features_dict(fixed_images(IMG))["x_norm_clstoken"]).abs().max().item()
    assert diff < 1e-4
    for impossible in (96, 100):  # 96: no integer ratio; 100: not a multiple of 8
        with pytest.raises(ValueError, match="cannot be expressed"):
            swiglu_mlp_ratio(64, impossible)


def test_released_table_and_import(tmp_path):
    r = released_checkpoint("facebook/webssl-dino7b-full8b-518")
    assert (r.method, r.size, r.img_size, r.run) == ("dino", "7b", 518, "dino7b-full8b-518")
    assert (r.data, r.samples) == ("full", "8b")
    assert r.revision == "aee350d2c5e3e5fdb7ee6985291d808ea5eef431"
    assert r.pytorch_url.endswith("/webssl_dino7b_full8b_518.pth")
    assert (r.arch.width, r.arch.depth, r.arch.ffn_hidden) == (4096, 32, 10928)
    mae = released_checkpoint("webssl-mae300m-full2b-224")
    assert (mae.arch.patch, mae.arch.hidden("gelu")) == (16, 4096)
    assert len(released_checkpoints()) == 18
    with pytest.raises(KeyError, match="not a released"):
        released_checkpoint("facebook/webssl-dino7b-full8b-384")
    with pytest.raises(FileNotFoundError):
        load_released("facebook/webssl-dino1b-full2b-224")  # never downloads by default
    # a tiny file cannot pass as a released 7B model
    native = convert.to_native(_encoder("dino").state_dict(), "dino")
    torch.save(native, tmp_path / "tiny.pth")
    with pytest.raises(KeyError, match=r"tiny.pth: checkpoint does not fit a dino encoder .* missing key\(s\)"):
        load_released("facebook/webssl-dino7b-full8b-518", tmp_path / "tiny.pth")


def test_imported_run_dir_loads_with_load_encoder(tmp_path, monkeypatch):
    """import_released writes a run-dir encoder that load_encoder rebuilds exactly."""
    import webssl_repro.models.released as released_mod

    enc = _encoder("dino")
    export_hf(enc, _meta("dino"), tmp_path / "hf")
    # pretend the tiny export is a released id: its expected arch/resolution are the tiny ones
    rel = released_mod.released_checkpoint("facebook/webssl-dino1b-full2b-224")
    fake = dataclasses.replace(rel, size="tiny", img_size=IMG)
    monkeypatch.setattr(released_mod, "released_checkpoint", lambda _id: fake)
    monkeypatch.setattr(type(fake), "arch", property(lambda self: TINY))
    path = import_released("facebook/webssl-dino1b-full2b-224", tmp_path / "hf", tmp_path / "run")
    loaded, meta = load_encoder(path)
    _assert_same_state(enc, loaded)
    assert meta["method"] == "dino" and meta["img_size"] == IMG
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["run_source"] == "imported" and prov["checkpoint"] == str(tmp_path / "hf")
    assert prov["released"]["run"] == "dino1b-full2b-224"


def test_load_encoder_adopts_the_file_s_tensors_and_names_what_does_not_fit(tmp_path, monkeypatch):
    """load_encoder builds the tower without weights and adopts the file's (no random init beside them): every
    tensor is the file's, in eval mode without gradients; a file whose tensors do not fit its header is named."""
    from safetensors.torch import load_file

    import webssl_repro.models.vit as vit
    from webssl_repro.models.io import save_encoder
    from webssl_repro.models.released import write_run_encoder

    enc = _encoder("dino")
    path = write_run_encoder(enc, _meta("dino"), tmp_path / "run")
    init = vit.init_dinov2_

    def no_values_to_set(model, layerscale):
        assert all(p.is_meta for p in model.parameters()), "a random init of weights the file replaces"
        init(model, layerscale)

    monkeypatch.setattr(vit, "init_dinov2_", no_values_to_set)
    loaded, _ = load_encoder(path)
    _assert_same_state(enc, loaded)
    assert not loaded.training and not any(p.requires_grad or p.is_meta for p in loaded.parameters())
    state = load_file(str(path))
    del state["blocks.1.ls2.gamma"]
    save_encoder(state, {"method": "dino", "arch": TINY.header("swiglu"), "img_size": IMG}, {}, tmp_path / "cut")
    with pytest.raises(KeyError, match=r"cut/encoder.safetensors: checkpoint does not fit a dino encoder .*"
                                       r"1 missing key\(s\) \[blocks.1.ls2.gamma\]"):
        load_encoder(tmp_path / "cut" / "encoder.safetensors")


@pytest.mark.parametrize("method,size", [("dino", "7b"), ("dino", "2b"), ("mae", "300m"), ("mae", "700m")])
def test_paper_archs_map_onto_hf_shapes(method, size):
    """Every released shape (on the meta device: no memory) maps 1:1 onto transformers' model,
    e.g. the 7B SwiGLU width 10928 and MAE-300M's patch 16."""
    from webssl_repro.models.hf import _new_hf_model, hf_config
    from webssl_repro.models.vit import arch_for

    arch, img = arch_for(method, size), 224
    with torch.device("meta"):
        ours = build_encoder(arch, method, img_size=img)
        hf = _new_hf_model(hf_config(arch, method, img))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mapped = convert.to_hf(ours.state_dict(), hf.config.model_type,
                           legacy=convert.hf_is_legacy(theirs))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == theirs
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("method", ["dino", "clip"])
def test_loaded_encoder_takes_imagenet_normalised_pixels(tmp_path, method):
    """Every evaluation feeds ImageNet-normalised pixels; a CLIP encoder trained on OpenAI's
    statistics sees the same pixels in its own (the trained encoder applied to OpenAI-
    normalised pixels), a Web-DINO encoder sees them unchanged."""
    from webssl_repro.evaluate.imagesets import IMAGENET_MEAN, IMAGENET_STD
    from webssl_repro.methods.clip import OPENAI_MEAN, OPENAI_STD
    from webssl_repro.models.released import write_run_encoder

    enc = _encoder(method)
    loaded, meta = load_encoder(write_run_encoder(enc, _meta(method), tmp_path))
    pixels = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))

    def norm(mean, std):
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    own = norm(OPENAI_MEAN, OPENAI_STD) if method == "clip" else norm(IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        fed = loaded.forward_features(norm(IMAGENET_MEAN, IMAGENET_STD))
        assert torch.allclose(fed, enc.forward_features(own), atol=1e-5)
        if method == "clip":  # not what the raw weights give on ImageNet-normalised pixels
            assert not torch.allclose(fed, enc.forward_features(norm(IMAGENET_MEAN, IMAGENET_STD)), atol=1e-3)
    from webssl_repro.evaluate.features import encoder_fingerprint

    # a VQA feature cache written by the raw weights is not reused for the re-normalising encoder
    assert (encoder_fingerprint(loaded) != encoder_fingerprint(enc)) == (method == "clip")


def test_export_hf_command_writes_a_run_encoder_that_transformers_loads(tmp_path, capsys):
    """`webssl-repro export-hf --encoder results/…/encoder.safetensors --out DIR`."""
    from transformers import AutoModel

    from helpers_stand_ins import save_tiny_encoder
    from webssl_repro.cli import main
    from webssl_repro.models.io import load_encoder

    path = save_tiny_encoder(tmp_path / "encoder.safetensors", depth=2)
    assert main(["export-hf", "--encoder", str(path), "--out", str(path)]) == 2  # a file, not a directory
    assert f"--out {path} is a file" in capsys.readouterr().err
    assert main(["export-hf", "--encoder", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_encoder(path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = ours.forward_features_dict(x)
        want = torch.cat([tokens["x_norm_clstoken"][:, None], tokens["x_norm_patchtokens"]], dim=1)
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, want, atol=1e-4, rtol=0)


def _dinov2_stand_in(path, img_size):
    """A tiny ``Dinov2Model`` saved as DINOv2's own HF repos are (no ``webssl`` metadata,
    LayerScale 1.0, trained at ``img_size``): a stand-in for facebook/dinov2-giant."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=TINY.width, num_hidden_layers=TINY.depth, num_attention_heads=TINY.heads,
                          patch_size=TINY.patch, image_size=img_size, use_swiglu_ffn=True, mlp_ratio=4,
                          layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True)
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.normal_(0.0, 1.0)  # a grid whose resampling shows
    model.save_pretrained(path)
    return path


def test_off_the_shelf_dinov2_imports_resampled_to_the_evaluated_resolution(tmp_path, monkeypatch):
    """DINOv2 ViT-g (trained at 518 px) as the run dinov2-g-224: the position embeddings are
    resampled once, as DINOv2 resamples them at each forward, so the imported 224-px encoder's
    features are those of the checkpoint fed 224-px images; HF and native files import alike."""
    from webssl_repro.models.released import run_checkpoint

    rel = run_checkpoint("dinov2-g-224")
    assert (rel.hf_id, rel.method, rel.size, rel.img_size, rel.trained_size) == (
        "facebook/dinov2-giant", "dino", "1b", 224, 518)
    assert rel.arch == PAPER_ARCHS["1b"] and rel.pytorch_url.endswith("/dinov2_vitg14_pretrain.pth")
    assert rel.revision == "611a9d42f2335e0f921f1e313ad3c1b7178d206d"  # a re-upload cannot change the rows
    assert run_checkpoint("dino1b-full2b-224") == released_checkpoint("facebook/webssl-dino1b-full2b-224")
    # the tiny stand-in: trained at 64 px (8x8 patches), evaluated at IMG = 32 px (4x4)
    monkeypatch.setattr(type(rel), "arch", property(lambda self: TINY))
    tiny = dataclasses.replace(rel, size="tiny", img_size=IMG, trained_size=2 * IMG)
    hf_dir = _dinov2_stand_in(tmp_path / "hf", 2 * IMG)
    at_64, meta_64 = import_hf(hf_dir)
    assert meta_64["img_size"] == 2 * IMG and at_64.pos_embed.shape == (1, 1 + 64, TINY.width)
    encoder, meta = load_released(tiny, hf_dir)
    assert meta["img_size"] == IMG and encoder.pos_embed.shape == (1, 1 + 16, TINY.width)
    assert any("from 8x8 (64 px) to 4x4 (32 px)" in n for n in meta["notes"]), meta["notes"]
    x = fixed_images(IMG)
    with torch.no_grad():
        ours, reference = encoder.forward_features_dict(x), at_64.forward_features_dict(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert torch.allclose(ours[key], reference[key], atol=1e-5), key
    assert not torch.allclose(encoder.pos_embed[:, 1:], at_64.pos_embed[:, 1:17])  # resampled, not cut
    # the native .pth of the same weights gives the same encoder
    torch.save(convert.to_native(at_64.state_dict(), "dino"), tmp_path / "dinov2.pth")
    native, _ = load_released(tiny, tmp_path / "dinov2.pth")
    _assert_same_state(native, encoder)
    # a checkpoint trained at the evaluated resolution is not the release
    with pytest.raises(ValueError, match=r"@ 32px encoder, but facebook/dinov2-giant is .* @ 64px"):
        load_released(tiny, _dinov2_stand_in(tmp_path / "other", IMG))
    # the run directory an evaluation reads
    loaded, run_meta = load_encoder(import_released(tiny, hf_dir, tmp_path / "run"))
    _assert_same_state(loaded, encoder)
    assert run_meta["img_size"] == IMG
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["released"]["run"] == "dinov2-g-224" and any("resampled" in n for n in prov["notes"])


def _vit_mae_stand_in(path):
    """A tiny ``ViTMAEForPreTraining`` (encoder and pixel decoder) saved as MAE's HF repos are: a
    stand-in for facebook/vit-mae-huge, every encoder weight away from its init, with transformers'
    config defaults as the converted repos keep them (LayerNorm eps 1e-12, 75 % of patches masked)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(hidden_size=TINY.width, num_hidden_layers=TINY.depth, num_attention_heads=TINY.heads,
                          intermediate_size=4 * TINY.width, patch_size=TINY.patch, image_size=IMG,
                          qkv_bias=True, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=64)
    assert (config.layer_norm_eps, config.mask_ratio) == (1e-12, 0.75)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(config).eval()
    randomize_(model.vit)
    model.save_pretrained(path)
    return model


def test_off_the_shelf_mae_h_imports_from_the_hf_repo_and_from_mae_s_file(tmp_path, monkeypatch):
    """MAE ViT-H (Tables 3 and 14) as the run mae-h-224: Web-MAE 700M's architecture. The HF repo
    (a ``ViTMAEForPreTraining``, whose pixel decoder is left out) gives transformers' own tokens,
    and MAE's encoder-only .pth (timm keys under "model") the same encoder."""
    from transformers import ViTMAEModel

    from webssl_repro.models.released import run_checkpoint

    rel = run_checkpoint("mae-h-224")
    assert (rel.hf_id, rel.method, rel.size, rel.data, rel.img_size, rel.weights_size) == (
        "facebook/vit-mae-huge", "mae", "700m", "in1k", 224, 224)
    assert rel.arch == Arch(1280, 32, 16, 5120, 14, "gelu")
    assert rel.revision == "5e0e60b29318a30e9ed13e27cb56d28071704980"
    assert rel.pytorch_url == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth"
    monkeypatch.setattr(type(rel), "arch", property(lambda self: TINY))
    tiny = dataclasses.replace(rel, size="tiny", img_size=IMG, trained_size=0)
    hf_dir = tmp_path / "hf"
    pretraining = _vit_mae_stand_in(hf_dir)
    with pytest.warns(UserWarning, match=r"layer_norm_eps=1e-12, our encoder uses 1e-6"):  # MAE's own: 1e-6
        encoder, meta = load_released(tiny, hf_dir)
    assert meta["method"] == "mae" and meta["arch"]["ffn_hidden"] == 4 * TINY.width
    with pytest.warns(UserWarning, match=r"layer_norm_eps"):
        _assert_same_state(import_hf(pretraining)[0], encoder)  # a model object: its encoder is taken
    hf = ViTMAEModel.from_pretrained(hf_dir).eval()
    hf.config.mask_ratio = 0.0
    x, n = fixed_images(IMG), (IMG // TINY.patch) ** 2
    with torch.no_grad():  # no patch masked (mask_ratio 0) and none shuffled (noise in patch order)
        want = hf(pixel_values=x, noise=torch.arange(n, dtype=torch.float32).expand(2, n)).last_hidden_state
        got = encoder.forward_features(x)
    assert want.shape == got.shape == (2, 1 + n, TINY.width) and want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.save({"model": convert.to_native(encoder.state_dict(), "mae")}, tmp_path / "mae_pretrain_tiny.pth")
    native, native_meta = load_released(tiny, tmp_path / "mae_pretrain_tiny.pth")
    _assert_same_state(native, encoder)
    assert native_meta["released"]["run"] == "mae-h-224"
    # a DINOv2 directory is not this checkpoint
    with pytest.raises(ValueError, match=r"holds a dino .* but facebook/vit-mae-huge is a mae"):
        load_released(tiny, _dinov2_stand_in(tmp_path / "dinov2", IMG))


def test_import_released_cli_names_the_checkpoint_a_run_imports(tmp_path, capsys):
    from webssl_repro.cli import main

    assert main(["import-released", "--run", "dinov2-g-224", "--checkpoint", "facebook/webssl-dino1b-full2b-224",
                 "--path", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "run dinov2-g-224 imports facebook/dinov2-giant, not facebook/webssl-dino1b-full2b-224" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["import-released", "--run", "dino1b-in1k-224", "--checkpoint", "facebook/webssl-dino1b-in1k-224",
                 "--path", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert re.search(r"no checkpoint to import is run 'dino1b-in1k-224'; the importable runs are .*'dinov2-g-224'",
                     capsys.readouterr().err)
