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
