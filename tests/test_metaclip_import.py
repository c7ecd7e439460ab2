"""MetaCLIP ViT-H/14 (Table 14) as the off-the-shelf run ``metaclip-h-224``: an OpenAI-CLIP tower
(pre-norm, bias-free patch embedding, QuickGELU) built from timm's ViT, read from transformers'
``CLIPModel`` and from open_clip's checkpoint layout. Tiny random stand-ins only, no downloads."""
from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import pytest
import torch

from helpers_stand_ins import fixed_images, randomize_, same_state
from webssl_repro.cli import main
from webssl_repro.models.arch import OPENAI_CLIP_ARCHS, Arch, arch_for
from webssl_repro.models.hf import export_hf, import_hf, import_native, load_checkpoint_file
from webssl_repro.models.io import load_encoder, pixel_stats
from webssl_repro.models.released import load_released, run_checkpoint, write_run_encoder
from webssl_repro.models.vit import build_encoder

torch.set_num_threads(1)
IMG = 32
TINY_CLIP = Arch(32, 2, 4, 64, 8, "quick_gelu", pre_norm=True, norm_eps=1e-5)


def _clip_stand_in(path=None, hidden_act="quick_gelu", img_size=IMG):
    """A tiny ``CLIPModel`` with every weight moved off its init (norm gains 1 ± 0.1, the rest ± 0.1)."""
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=img_size, hidden_act=hidden_act)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    model = randomize_(CLIPModel(CLIPConfig(vision_config=vision, text_config=text)))
    if path is not None:
        model.save_pretrained(path)
    return model


def _open_clip_file(hf, path):
    """The stand-in in open_clip's naming (MetaCLIP's .pt files: ``state_dict`` of a DDP model),
    written here from open_clip's ``VisionTransformer`` attribute names, not from our converter."""
    v = {k.removeprefix("vision_model."): t for k, t in hf.state_dict().items() if k.startswith("vision_model.")}
    out = {"visual.class_embedding": v["embeddings.class_embedding"],
           "visual.positional_embedding": v["embeddings.position_embedding.weight"],
           "visual.conv1.weight": v["embeddings.patch_embedding.weight"],
           "visual.proj": hf.visual_projection.weight.T.clone(),
           "logit_scale": hf.logit_scale.detach().clone(),
           "token_embedding.weight": torch.zeros(8, 16), "positional_embedding": torch.zeros(4, 16)}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = v[f"{theirs}.{p}"]
    for i in range(2):
        hf_block, oc_block = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{oc_block}attn.in_proj_{p}"] = torch.cat(
                [v[f"{hf_block}self_attn.{n}_proj.{p}"] for n in ("q", "k", "v")])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{oc_block}{ours}.{p}"] = v[f"{hf_block}{theirs}.{p}"]
    # MetaCLIP's training script saves its optimizer beside the weights: numpy scalars among plain values
    optimizer = {"param_groups": [{"lr": np.float64(4e-4), "betas": (0.9, 0.98), "step": np.int64(7)}]}
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": t for k, t in out.items()}, "optimizer": optimizer},
               path)
    return path


def _as_numpy_1_wrote_it(path):
    """The checkpoint with numpy's scalar reconstructor named as numpy 1 named it (``numpy.core``), as in
    files saved before 2024; the zip is rewritten whole, so every other record keeps its bytes."""
    with zipfile.ZipFile(path) as z:
        records = {name: z.read(name) for name in z.namelist()}
    pickled = next(name for name in records if name.endswith("data.pkl"))
    assert b"cnumpy._core.multiarray\nscalar\n" in records[pickled]
    records[pickled] = records[pickled].replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return path


def test_metaclip_h_is_the_released_openai_clip_vit_h():
    rel = run_checkpoint("metaclip-h-224")
    assert (rel.hf_id, rel.method, rel.size, rel.img_size, rel.weights_size) == (
        "facebook/metaclip-h14-fullcc2.5b", "clip", "h14", 224, 224)
    assert rel.revision == "e2778cc22d9bfdd10213fed7a28cbb393b0c30ab"
    assert rel.pytorch_url == "https://dl.fbaipublicfiles.com/MMPT/metaclip/h14_fullcc2.5b.pt"
    assert rel.arch == arch_for("clip", "h14") == Arch(1280, 32, 16, 5120, 14, "quick_gelu", pre_norm=True,
                                                        norm_eps=1e-5)
    with torch.device("meta"):
        tower = build_encoder(rel.arch, "clip", img_size=224)
    # open_clip's ViT-H-14 image tower (632.08M parameters) less its 1280 x 1024 projection
    assert sum(p.numel() for p in tower.parameters()) == 632_076_800 - 1280 * 1024
    assert tower.patch_embed.proj.bias is None and tower.blocks[0].ls1.__class__.__name__ == "Identity"
    with pytest.raises(ValueError, match=r"QuickGELU \(OpenAI-CLIP\) tower is a clip encoder, not dino"):
        build_encoder(OPENAI_CLIP_ARCHS["h14"], "dino")


def test_clip_model_imports_to_transformers_own_tokens(tmp_path):
    """Tokens before the final LayerNorm equal transformers' ``last_hidden_state``, the normed CLS its
    ``pooler_output``: the pre-norm, the bias-free patch embedding and QuickGELU are all in place."""
    from transformers import CLIPVisionModelWithProjection

    hf = _clip_stand_in(tmp_path / "hf")
    encoder, meta = import_hf(tmp_path / "hf")
    assert meta["method"] == "clip" and meta["arch"] == {
        "width": 32, "depth": 2, "heads": 4, "ffn_hidden": 64, "patch": 8, "ffn": "quick_gelu", "pre_norm": True,
        "norm_eps": 1e-5}
    x = fixed_images(IMG)
    with torch.no_grad():
        want = hf.vision_model(pixel_values=x)
        got = encoder.forward_features_dict(x)
    assert want.last_hidden_state.abs().mean() > 0.1
    torch.testing.assert_close(got["x_prenorm"], want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["x_norm_clstoken"], want.pooler_output, atol=1e-5, rtol=0)
    assert same_state(import_hf(hf)[0], encoder)  # a CLIPModel object: its vision tower is taken
    with_projection = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf")
    assert same_state(import_hf(with_projection)[0], encoder)  # and not its projection


def test_open_clip_file_gives_the_same_encoder_and_the_run_dir_rebuilds_it(tmp_path, monkeypatch):
    hf = _clip_stand_in(tmp_path / "hf")
    rel = run_checkpoint("metaclip-h-224")
    monkeypatch.setattr(type(rel), "arch", property(lambda self: TINY_CLIP))
    tiny = dataclasses.replace(rel, img_size=IMG, trained_size=0)
    from_hf, _ = load_released(tiny, tmp_path / "hf")
    native, meta = load_released(tiny, _open_clip_file(hf, tmp_path / "h14_tiny.pt"))
    assert same_state(native, from_hf)
    assert {"module.visual.proj", "module.logit_scale"} <= set(meta["ignored_keys"])
    numpy_1 = _as_numpy_1_wrote_it(_open_clip_file(hf, tmp_path / "h14_numpy1.pt"))
    assert same_state(load_released(tiny, numpy_1)[0], from_hf)
    assert meta["released"]["run"] == "metaclip-h-224"
    # the run directory's header records the tower, so load_encoder rebuilds it and not a Web-SSL one
    write_run_encoder(native, meta, tmp_path / "run")
    loaded, loaded_meta = load_encoder(tmp_path / "run" / "encoder.safetensors")
    assert loaded_meta["arch"]["ffn"] == "quick_gelu" and loaded.norm.eps == 1e-5
    (m_in, s_in), (m, s) = pixel_stats("dino"), pixel_stats("clip")
    x = fixed_images(IMG)
    openai = (x * torch.tensor(s_in).view(1, 3, 1, 1) + torch.tensor(m_in).view(1, 3, 1, 1)
              - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)
    with torch.no_grad():  # load_encoder takes ImageNet-normalised pixels and maps them to CLIP's (OpenAI)
        torch.testing.assert_close(loaded.forward_features(x), native.forward_features(openai), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"off-the-shelf tower \(MetaCLIP.s OpenAI-CLIP, I-JEPA.s or SigLIP.s\) is not "
                                         r"exported"):
        export_hf(native, meta, tmp_path / "export")


def test_bad_clip_checkpoints_are_named(tmp_path):
    _clip_stand_in(tmp_path / "gelu", hidden_act="gelu")  # e.g. LAION's CLIP-H: not MetaCLIP's tower
    with pytest.raises(ValueError, match=r"CLIP hidden_act 'gelu'; .* MetaCLIP's, with 'quick_gelu'"):
        import_hf(tmp_path / "gelu")
    with pytest.raises(ValueError, match=r"method 'dino' does not match a HF clip_vision_model model"):
        import_hf(tmp_path / "gelu", method="dino")
    hf = _clip_stand_in()
    state = load_checkpoint_file(_open_clip_file(hf, tmp_path / "oc.pt"))["state_dict"]
    layerscale = {**state, "module.visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
    with pytest.raises(KeyError, match=r"unexpected key 'module.visual.transformer.resblocks.0.ls_1.gamma'"):
        import_native(layerscale, "clip", TINY_CLIP, IMG)
    with pytest.raises(KeyError, match=r"no 'visual.positional_embedding' key"):
        import_native({"pos_embed": torch.zeros(1, 17, 32)}, "clip", TINY_CLIP, IMG)
    torch.save({"state_dict": state, "args": zipfile.ZipInfo("a pickled object")}, tmp_path / "args.pt")
    with pytest.raises(ValueError, match=r"args.pt: holds objects other than tensors, containers and numpy scalars, "
                                         r"which are not loaded \(torch.load weights_only\): Unsupported global: "
                                         r"GLOBAL zipfile.ZipInfo was not an allowed global by default$"):
        import_native(tmp_path / "args.pt", "clip", TINY_CLIP, IMG)
    del state["module.visual.ln_pre.bias"]
    with pytest.raises(KeyError, match=r"1 missing key\(s\) \[norm_pre.bias\]"):
        import_native(state, "clip", TINY_CLIP, IMG)


def _open_clip_params(width, layers, mlp, patch=14, img=224):
    """Parameters of an open_clip ``VisionTransformer`` image tower, without ``proj``: conv1 (no bias),
    class and position embeddings, ln_pre, the blocks (ln_1, in_proj, out_proj, ln_2, c_fc, c_proj), ln_post."""
    norms = 2 * 2 * width
    block = norms + 3 * width * (width + 1) + width * (width + 1) + mlp * (width + 1) + width * (mlp + 1)
    embeddings = 3 * patch * patch * width + width + ((img // patch) ** 2 + 1) * width
    return embeddings + 2 * width + layers * block + 2 * width


def test_metaclip_bigg_imports_from_its_open_clip_file_only(tmp_path, monkeypatch, capsys):
    """MetaCLIP ViT-bigG/14 (Table 3, Fig. 7) has no transformers release: its checkpoint is the open_clip
    file's URL, a download is refused by name, and the file imports through the CLI."""
    rel = run_checkpoint("metaclip-g-224")
    assert (rel.hf_id, rel.size, rel.img_size, rel.revision) == ("", "bigG14", 224, None)
    assert rel.checkpoint == rel.pytorch_url == "https://dl.fbaipublicfiles.com/MMPT/metaclip/G14_fullcc2.5b.pt"
    assert rel.arch == Arch(1664, 48, 16, 8192, 14, "quick_gelu", pre_norm=True, norm_eps=1e-5)
    with torch.device("meta"):
        towers = {size: build_encoder(OPENAI_CLIP_ARCHS[size], "clip", img_size=224) for size in ("h14", "bigG14")}
    n_params = {size: sum(p.numel() for p in tower.parameters()) for size, tower in towers.items()}
    # open_clip's ViT-bigG-14 image tower (1844.91M parameters) less its 1664 x 1280 projection
    assert n_params["bigG14"] == _open_clip_params(1664, 48, 8192) == 1_844_907_264 - 1664 * 1280
    assert n_params["h14"] == _open_clip_params(1280, 32, 5120)
    with pytest.raises(FileNotFoundError, match=r"metaclip-g-224: https://\S+/G14_fullcc2.5b.pt is on no hub"):
        load_released(rel, None, allow_download=True)
    monkeypatch.setattr(type(rel), "arch", property(lambda self: TINY_CLIP))
    oc_file = _open_clip_file(_clip_stand_in(img_size=224), tmp_path / "G14_tiny.pt")
    assert main(["import-released", "--run", "metaclip-g-224", "--checkpoint", "G14_fullcc2.5b.pt", "--path",
                 str(oc_file), "--out", str(tmp_path / "run")]) == 0
    encoder, meta = load_encoder(tmp_path / "run" / "encoder.safetensors")
    assert meta["arch"]["width"] == 32 and meta["img_size"] == 224 and meta["method"] == "clip"
    assert main(["import-released", "--run", "metaclip-g-224", "--checkpoint", "facebook/metaclip-h14-fullcc2.5b",
                 "--path", str(oc_file), "--out", str(tmp_path / "run2")]) == 2
    assert "run metaclip-g-224 imports https://dl.fbaipublicfiles.com/MMPT/metaclip/G14_fullcc2.5b.pt, not " \
        "facebook/metaclip-h14-fullcc2.5b" in capsys.readouterr().err


_VOID_POINTER = """
import sys
import numpy as np, torch
from numpy._core.multiarray import scalar
void = np.dtype("V8", False, True)  # given an object field through its state, as a pickle can give it
void.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))

class Pointer:  # a void scalar whose object field is the address 0x4141414141414141
    def __reduce__(self):
        return scalar, (void, b"A" * 8)

class Dereference:  # numpy reads the object at that address
    def __reduce__(self):
        return np.dtype, ("f8", Pointer())

torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": [Dereference()]}, sys.argv[1])
"""


def test_a_crafted_structured_scalar_is_refused_not_dereferenced(tmp_path):
    """Only numeric dtypes are allowed beside the tensors: a void dtype with a forged object field would
    make numpy read memory at an address the file chooses. Loaded in a child process, so that a
    regression shows as a crash of the child, not of the test run."""
    import subprocess
    import sys

    path = tmp_path / "forged.pt"
    subprocess.run([sys.executable, "-c", _VOID_POINTER, str(path)], check=True)
    load = ("import sys\nfrom webssl_repro.models.hf import load_checkpoint_file\n"
            "try:\n    load_checkpoint_file(sys.argv[1])\nexcept ValueError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", load, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "forged.pt: holds objects other than tensors" in proc.stdout
    assert "but got <class 'numpy.dtypes.ObjectDType'>" in proc.stdout  # what torch refused
