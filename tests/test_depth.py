"""NYUd v2 depth probe of DINOv2: hand-case losses and metrics, the head, its schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers_heads import train_depth
from helpers_probes import colour_features, index_batches
from webssl_repro.evaluate.depth import (DepthLinearHead, bins_to_depth, gradient_loss,
                                         lin4_blocks, rmse, sig_loss, train_depth_heads)
from webssl_repro.evaluate.features import BlockTokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rmse_hand_case():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 9.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[2.0, 2.0], [1.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]]])
    valid = target > 0
    # image 1: errors 1, 0, 2 -> sqrt(5/3); image 2: 3, 4 -> sqrt(25/2); mean of the two.
    expected = (math.sqrt(5 / 3) + math.sqrt(12.5)) / 2
    assert rmse(pred, target, valid) == pytest.approx(expected)

    # a pixel without depth (NaN or inf, outside the mask) is left out, not turned into NaN
    holes = target.clone()
    holes[0, 1, 1], holes[1, 1, 0] = float("nan"), float("inf")
    inside = (holes > 0) & (holes < 10)
    assert rmse(pred, holes, inside) == pytest.approx(expected)


def test_lin4_blocks():
    assert lin4_blocks(40) == [9, 19, 29, 39]   # DINOv2 ViT-g {10, 20, 30, 40}
    assert lin4_blocks(12) == [2, 5, 8, 11]     # DINOv2 ViT-S/B
    assert lin4_blocks(24) == [4, 11, 17, 23]   # DINOv2 ViT-L (the rule would give 5 first)
    assert lin4_blocks(32) == [7, 15, 23, 31] and lin4_blocks(26) == [5, 12, 18, 25]  # 5B/7B, 3B: the rule


def test_onecycle_beta1_as_mmcv():
    """mmcv's OneCycleMomentumUpdaterHook defaults over 38,400 iterations: 0.95 down to 0.85 at
    iteration 0.3 x 38,400 - 1 = 11,519 (cosine), back up to 0.95 at the last, 38,399."""
    from webssl_repro.evaluate.depth import onecycle_beta1

    total = 38400
    assert onecycle_beta1(0, total) == pytest.approx(0.95)
    assert onecycle_beta1(11519, total) == pytest.approx(0.85)
    assert onecycle_beta1(11519 // 2, total) == pytest.approx(0.90, abs=1e-4)  # half-way down the cosine
    assert onecycle_beta1((11519 + 38399) // 2, total) == pytest.approx(0.90, abs=1e-4)
    assert onecycle_beta1(total - 1, total) == pytest.approx(0.95)
    assert onecycle_beta1(20000, total) < onecycle_beta1(30000, total)


def test_depth_loss_is_sig_loss_per_gpu_pair_averaged():
    """DINOv2's NYUd runs take SigLoss over each GPU's 2 images; DDP averages the gradients,
    i.e. the loss is the mean of the pairs' losses, not one SigLoss over the batch."""
    from webssl_repro.evaluate.depth import depth_loss

    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 6, 6, generator=g) * 5 + 0.5
    pred = target * torch.tensor([1.0, 1.5, 0.7, 3.0]).view(4, 1, 1, 1) + torch.rand(4, 1, 6, 6, generator=g)
    pairs = (sig_loss(pred[:2], target[:2]) + sig_loss(pred[2:], target[2:])) / 2
    assert depth_loss(pred, target).item() == pytest.approx(pairs.item(), rel=1e-6)
    assert depth_loss(pred, target, samples_per_gpu=None).item() == pytest.approx(sig_loss(pred, target).item())
    assert abs(depth_loss(pred, target).item() - sig_loss(pred, target).item()) > 1e-2
    with_grad = depth_loss(pred, target, grad_weight=0.5)
    grads = (gradient_loss(pred[:2], target[:2]) + gradient_loss(pred[2:], target[2:])) / 2
    assert with_grad.item() == pytest.approx(pairs.item() + 0.5 * grads.item(), rel=1e-6)
    with pytest.raises(ValueError, match="a batch of 4 images does not split into groups of samples_per_gpu=3"):
        depth_loss(pred, target, samples_per_gpu=3)


def _one_head_batches(head: DepthLinearHead, images: torch.Tensor, depth: torch.Tensor, iters: int):
    """``train_depth_heads``' batches for one head: the whole set each iteration."""
    tokens = colour_features(images)
    return iter([([head.flat_inputs(tokens)], tokens.grid, depth.unsqueeze(1))] * iters)


def test_depth_training_sets_lr_and_beta1_each_iteration(monkeypatch):
    """The lr of each iteration is pinned to hand values of DINOv2's NYUd schedule (mmcv
    CosineAnnealing, min_lr_ratio 1e-8, linear warm-up from ratio 1e-3), not recomputed
    with the schedule function under test."""
    from webssl_repro.evaluate.depth import onecycle_beta1

    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: seen.append(
        (self.param_groups[0]["lr"], self.param_groups[0]["betas"])) or step(self, *a, **kw))
    images = torch.rand(2, 3, 16, 16)
    torch.manual_seed(0)
    head = DepthLinearHead(in_dim=3, n_layers=4, n_bins=16, max_depth=10.0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2 * 3 * 4, 16, kernel_size=1)  # DINOv2 keeps the conv's default init
    assert torch.equal(head.conv.weight, conv.weight) and torch.equal(head.conv.bias, conv.bias)
    train_depth_heads([head], _one_head_batches(head, images, 1.0 + 4.0 * images[:, 0], 10), iters=10, lr=1e-2,
                      warmup_iters=3)
    # mmcv: regular = min + (1 - min) * (1 + cos(pi * it / 10)) / 2, then for it < 3
    # regular * (1 - (1 - it / 3) * (1 - 1e-3)); e.g. it=1: 0.975528 * 0.334 = 0.325826.
    factors = [0.001, 0.325826, 0.603307, 0.793893, 0.654509, 0.5, 0.345492, 0.206107, 0.095492, 0.024472]
    by_formula = [(1e-8 + (1 - 1e-8) * (1 + math.cos(math.pi * i / 10)) / 2)
                  * (1 - (1 - i / 3) * (1 - 1e-3) if i < 3 else 1.0) for i in range(10)]
    assert by_formula == pytest.approx(factors, abs=5e-7)
    assert [lr for lr, _ in seen] == pytest.approx([1e-2 * f for f in factors], rel=0, abs=1e-8)
    assert [b for b, _ in (betas for _, betas in seen)] == pytest.approx([onecycle_beta1(i, 10) for i in range(10)])
    assert all(b2 == 0.999 for _, (_, b2) in seen)


def test_bins_to_depth_hand_case():
    bins = torch.linspace(0.0, 3.0, 4)  # [0, 1, 2, 3]
    logits = torch.tensor([0.9, -1.0, -1.0, 1.9]).view(1, 4, 1, 1)
    # weights relu(l) + 0.1 = [1.0, 0.1, 0.1, 2.0] / 3.2 -> (0.1 + 0.2 + 6.0) / 3.2
    assert bins_to_depth(logits, bins).item() == pytest.approx(6.3 / 3.2)


def test_sig_and_gradient_loss_hand_cases():
    eps = 1e-3
    target = torch.tensor([1 - eps, 1 - eps, 0.0])  # last pixel invalid
    pred = torch.tensor([1 - eps, math.e - eps, 5.0])
    # g = [0, 1]: unbiased var 0.5, mean 0.5 -> sqrt(0.5 + 0.15 * 0.25)
    assert sig_loss(pred, target).item() == pytest.approx(math.sqrt(0.5375), rel=1e-5)
    assert sig_loss(pred, target, warm_up=True).item() == pytest.approx(math.sqrt(0.0375), rel=1e-5)
    t = torch.rand(1, 1, 8, 8) + 0.5
    assert gradient_loss(t, t).item() == 0.0
    p = t.clone()
    p[..., 0, 0] = p[..., 0, 0] * math.e  # log-diff 1 (up to eps) at one corner pixel
    # The corner enters one vertical and one horizontal |d_i - d_{i+2}| term per scale: stride 1
    # (8x8, 64 valid) -> 2/64, stride 2 (4x4) -> 2/16; strides 4 and 6 leave 2x2 grids with no
    # pixel pair two apart, so they add 0.
    expected = 2 / 64 + 2 / 16
    assert gradient_loss(p, t).item() == pytest.approx(expected, rel=2e-3)


def test_depth_head_shapes_and_training():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    # Piecewise-constant images on the 4x4 patch grid, depth = 1 + 4 * red: a per-patch task.
    images = torch.rand(4, 3, 4, 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    depth = 1.0 + 4.0 * images[:, 0]
    head = DepthLinearHead(in_dim=3, n_layers=4, n_bins=256, max_depth=10.0)
    out = head(colour_features(images))
    assert out.shape == (4, 1, 16, 16) and (out >= 1e-3).all() and (out <= 10.0).all()
    (losses,) = train_depth_heads([head], _one_head_batches(head, images, depth, 30), iters=30, lr=1e-2,
                                  warmup_iters=3, sig_warmup=2)
    assert losses[-1] < 0.7 * losses[2]
    with pytest.raises(ValueError, match="expects 4 blocks"):
        head(BlockTokens(torch.zeros(1, 4, 3), torch.zeros(1, 4, 16, 3), (4, 4), [0]))


def test_depth_head_token_grid_conv_equals_dinov2_order():
    """conv(upsample([patch, cls])) of DINOv2's head == upsample(conv(...)) computed on tokens."""
    torch.manual_seed(0)
    head = DepthLinearHead(in_dim=6, n_layers=2, n_bins=16, max_depth=5.0)
    torch.nn.init.normal_(head.conv.weight, 0.0, 0.3)
    torch.nn.init.normal_(head.conv.bias, 0.0, 0.3)
    tokens = BlockTokens(torch.randn(2, 3, 6), torch.randn(2, 3, 6, 6), (2, 3), [0, 1])
    maps = tokens.maps()
    feats = [F.interpolate(torch.cat([m, c[:, :, None, None].expand_as(m)], 1), scale_factor=4,
                           mode="bilinear", align_corners=False) for m, c in zip(maps, tokens.cls)]
    ref = bins_to_depth(head.conv(torch.cat(feats, 1)), head.bins)
    out = head(tokens)
    assert out.shape == ref.shape == (3, 1, 8, 12) and torch.allclose(out, ref, atol=1e-5)
    w = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), head.conv.weight)
    (g_out,) = torch.autograd.grad((head(tokens) * w).sum(), head.conv.weight)
    assert torch.allclose(g_out, g_ref, atol=1e-5)


def test_joint_depth_heads_equal_separate_training():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 4, 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    depth = (1.0 + 4.0 * images[:, 0]).unsqueeze(1)
    bt = colour_features(images)
    heads = []
    for n in (1, 4):
        torch.manual_seed(0)
        heads.append(DepthLinearHead(in_dim=3, n_layers=n, n_bins=32, max_depth=10.0))
    inputs = [heads[0].flat_inputs(bt), heads[1].flat_inputs(bt)]
    separate = [DepthLinearHead(3, n_layers=n, n_bins=32, max_depth=10.0) for n in (1, 4)]
    for s, h in zip(separate, heads):
        s.load_state_dict(h.state_dict())
    batches = (([(p[i], c[i]) for p, c in inputs], bt.grid, depth[i]) for i in index_batches(8, 4, 0))
    joint = train_depth_heads(heads, batches, iters=12, lr=1e-2, warmup_iters=3, sig_warmup=4, grad_clip=0.05)
    for k, s in enumerate(separate):
        ref = train_depth(s, colour_features, ((images[i], depth[i]) for i in index_batches(8, 4, 0)),
                          iters=12, lr=1e-2, warmup_iters=3, sig_warmup=4, grad_clip=0.05)
        assert joint[k] == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert torch.allclose(s.conv.weight, heads[k].conv.weight, atol=1e-5)
