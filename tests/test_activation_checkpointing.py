"""Activation checkpointing (``pretrain.train.activation_checkpointing``): every tower the
pretraining methods backpropagate through recomputes its blocks in the backward, with the same
loss and gradients, and only while gradients are recorded."""
import copy

import pytest
import torch

from webssl_repro.methods.mae import MaeConfig, MaeMethod
from webssl_repro.models import layers
from webssl_repro.models.arch import Arch
from webssl_repro.models.layers import enable_activation_checkpointing
from webssl_repro.models.text import TextTransformer
from webssl_repro.models.vit import build_encoder
from webssl_repro.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def counted(monkeypatch):
    """How many blocks ran through ``torch.utils.checkpoint``."""
    calls = []
    real = layers.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting)
    return calls


def _same_loss_and_grads(model: torch.nn.Module, loss_of) -> int:
    """Loss and gradients of ``model`` and of a copy with checkpointing on; returns the towers set."""
    plain, recomputed = model, copy.deepcopy(model)
    towers = enable_activation_checkpointing(recomputed)
    losses = []
    for m in (plain, recomputed):
        torch.manual_seed(0)  # the same masking / drop-path draws on both
        loss = loss_of(m)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    return towers


def test_vit_recomputes_each_block_in_the_backward(counted):
    vit = build_encoder(Arch(32, 3, 2, patch=8), img_size=32, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 32, 32)
    assert _same_loss_and_grads(vit, lambda m: m.forward_features_dict(x)["x_norm_clstoken"].square().sum()) == 1
    assert len(counted) == 3  # the checkpointed copy's 3 blocks; the plain one ran none
    with torch.no_grad():  # a teacher's (or an eval's) forward stores nothing to recompute
        vit.grad_checkpointing = True
        vit.forward_features_dict(x)
    assert len(counted) == 3


def test_mae_encoder_and_decoder_and_clip_text_tower_recompute_theirs(counted):
    encoder = build_encoder(Arch(32, 2, 2, patch=8), method="mae", img_size=32)
    mae = MaeMethod(encoder, MaeConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)).model
    images = torch.randn(2, 3, 32, 32)
    assert _same_loss_and_grads(mae, lambda m: m(images, 0.75)[0]) == 2  # encoder and decoder
    assert len(counted) == 2 + 1
    text = TextTransformer(vocab_size=20, context_length=8, width=16, layers=2, heads=2, output_dim=8)
    tokens = torch.randint(1, 20, (3, 8))
    assert _same_loss_and_grads(text, lambda m: m(tokens).square().sum()) == 1
    assert len(counted) == 3 + 2


def test_a_model_without_towers_is_refused_and_the_setting_is_a_bool():
    with pytest.raises(ValueError, match="Linear has no tower with a grad_checkpointing flag"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
    base = {"samples_seen": 8, "global_batch_size": 4, "lr": 1e-3}
    assert TrainConfig.from_mapping({**base, "activation_checkpointing": True}).activation_checkpointing is True
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false, got 'yes'"):
        TrainConfig.from_mapping({**base, "activation_checkpointing": "yes"})


def _saved_bytes(method: str, drop_path_rate: float = 0.0, recomputed: bool = False) -> float:
    """Bytes the blocks of a 4-block, 256-wide tower keep for the backward under bf16 autocast, per
    token, unit of width and block (each storage counted once)."""
    from webssl_repro.models.layers import run_blocks
    from webssl_repro.resources import swiglu_hidden

    width, depth, batch = 256, 4, 8
    arch = Arch(width, depth, 4, patch=16, ffn_hidden=None if method == "mae" else swiglu_hidden(width))
    tower = build_encoder(arch, method, img_size=224, drop_path_rate=drop_path_rate).train()
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = tower._pos_embed(tower.patch_embed(torch.randn(batch, 3, 224, 224))).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            run_blocks(tower.blocks, tokens, recomputed)
    return sum(storages.values()) / (batch * tokens.shape[1] * width * depth)


def test_the_activation_estimate_is_what_blocks_keep_under_bf16_autocast():
    """``resources.BLOCK_ACTIVATION_BYTES`` against what a SwiGLU (Web-DINO, CLIP) and a GELU (MAE)
    block keep, with subset stochastic depth at DINOv2's 0.4 keeping (1 - 0.4) of it, and a
    recomputed block its fp32 input (``BLOCK_INPUT_BYTES``)."""
    from webssl_repro.resources import BLOCK_ACTIVATION_BYTES, BLOCK_INPUT_BYTES

    assert _saved_bytes("dino") == pytest.approx(BLOCK_ACTIVATION_BYTES["swiglu"], rel=0.05)
    assert _saved_bytes("mae") == pytest.approx(BLOCK_ACTIVATION_BYTES["gelu"], rel=0.05)
    assert _saved_bytes("dino", 0.4) == pytest.approx(BLOCK_ACTIVATION_BYTES["swiglu"] * 0.6, rel=0.1)
    assert _saved_bytes("clip", recomputed=True) == pytest.approx(BLOCK_INPUT_BYTES, rel=0.05)


# ---- which runs recompute: pretrain.train.activation_checkpointing in the workflow ----------------

def _paper(**train):
    import copy as _copy

    from conftest import REPO
    from webssl_repro.config import load_config
    from webssl_repro.workflow import Plan

    cfg = _copy.deepcopy(load_config(REPO / "config/paper.yaml"))
    cfg["pretrain"]["train"].update(train)
    return Plan(cfg)


def _recomputes(plan, run: str) -> bool:
    import json

    return json.loads(plan.pretrain_settings_json(run))["train"]["activation_checkpointing"]


def test_run_name_patterns_choose_the_runs_that_recompute_retraining_none():
    paper, off = _paper(), _paper(activation_checkpointing=False)
    recomputed = ["clip1b-full2b-224", "clip7b-full8b-224", "dino1b-in1k-224", "dino7b-full8b-378", "dino7b-full8b-518"]
    for run in recomputed:
        assert _recomputes(paper, run) is True and _recomputes(off, run) is False
        assert paper.run_config_json(run) == off.run_config_json(run)  # a setting: the params are the same
    # the trained towers' forward runs twice: (1 + 3) / 3 of CLIP's forward + backward; Web-DINO's
    # teacher forward (2 global crops, 1 of each global crop's 1 + 3) is not recomputed
    clip = [p.pretrain_resources("clip1b-full2b-224").train_flops for p in (paper, off)]
    assert clip[0] == pytest.approx(clip[1] * 4 / 3)
    from webssl_repro.resources import forward_flops
    arch = paper.config["labels"]["sizes"]["1b"]
    g, loc = forward_flops("dino", arch, 224), forward_flops("dino", arch, 98)
    dino = [p.pretrain_resources("dino1b-in1k-224").train_flops for p in (paper, off)]
    assert dino[0] / dino[1] == pytest.approx((2 * g * 5 + 8 * loc * 4) / (2 * g * 4 + 8 * loc * 3))
    for run in ("dino2b-full2b-224", "dino7b-full8b-224", "mae1b-full2b-224"):
        assert _recomputes(paper, run) is False
        assert paper.pretrain_resources(run).train_flops == off.pretrain_resources(run).train_flops
    assert _recomputes(_paper(activation_checkpointing=True), "mae1b-full2b-224") is True


def test_a_malformed_setting_is_refused_by_its_key():
    from conftest import REPO
    from webssl_repro.config import ConfigError, load_config, validate_config

    for bad in (["clip*", 3], [], "yes"):
        cfg = load_config(REPO / "config/paper.yaml")
        cfg["pretrain"]["train"]["activation_checkpointing"] = bad
        with pytest.raises(ConfigError, match="activation_checkpointing"):
            validate_config(cfg)
    with pytest.raises(ConfigError, match=r"activation_checkpointing must be true, false or a list of run-name "
                                          r"patterns, got 'yes'"):
        _paper(activation_checkpointing="yes").pretrain_resources("clip1b-full2b-224")


def test_activation_estimate_by_hand_and_the_dry_run_names_runs_over_the_gpu():
    """Per token, unit of width and block: 50 bytes (SwiGLU), 40 (GELU), Web-DINO's times the 0.6
    of the batch its subset stochastic depth runs; recomputed, the 4-byte input plus one whole
    block. The recipe's batch over the run's GPUs; 85 % of a GPU's memory for them."""
    off = _paper(activation_checkpointing=False)
    dino = off.pretrain_resources("dino1b-full2b-224")  # 3072 images on 64 GPUs; 2 x 224 px + 8 x 98 px
    tokens = 2 * (16 * 16 + 1) + 8 * (7 * 7 + 1)
    assert dino.activation_gb == pytest.approx(50 * 0.6 * 1536 * 40 * tokens * 48 / 1e9)  # 80.9
    mae = off.pretrain_resources("mae1b-full2b-224")  # 4096 on 64: a quarter of 256 patches, the 8 x 512 decoder
    assert mae.activation_gb == pytest.approx(40 * (1536 * 40 * 65 + 512 * 8 * 257) * 64 / 1e9)
    clip = _paper().pretrain_resources("clip1b-full2b-224")  # recomputed; 32768 on 64, text 32 x 1280 x 77
    towers = [(1536, 40, 257, 50), (1280, 32, 77, 40)]
    assert clip.recomputed and clip.activation_gb == pytest.approx(
        sum(d * 4 * w * t + k * w * t for w, d, t, k in towers) * 512 / 1e9)  # 50.9
    assert _paper().memory_line() == ""  # config/paper.yaml: every run fits 85 % of its 80 GB
    line = off.memory_line()
    assert "over 85% of resources.gpu_memory_gb (68 of 80 GB): " in line and "clip1b-full2b-224 (469 GB)" in line
    assert "dino1b-full2b-224 (81 GB)" in line and "dino7b-full8b-518 (198 GB)" in line
    assert "dino3b" not in line and "mae" not in line
    assert line.endswith("add them to pretrain.train.activation_checkpointing")
    assert line in off.target_message()
    small = _paper()
    small.config["resources"]["gpu_memory_gb"] = 40
    assert small.memory_line().endswith("(34 of 40 GB) with blocks recomputed: clip1b-full2b-224 (51 GB), "
                                        "clip3b-full2b-224 (35 GB): give them more resources.nodes")
    assert "(34 of 40 GB): dino2b-full2b-224 (42 GB), " in small.memory_line()


def test_a_pattern_that_names_no_run_is_refused():
    from webssl_repro.config import ConfigError

    with pytest.raises(ConfigError, match=r"pattern\(s\) \['clip-\*', 'dino1b-full2b-224.s1'\] match no run"):
        _paper(activation_checkpointing=["clip-*", "dino1b-full2b-224.s1", "mae*"])
