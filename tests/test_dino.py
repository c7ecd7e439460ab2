"""Web-DINO (DINOv2) losses, schedules and method (its multi-crop data and iBOT masks:
test_dino_data.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from webssl_repro.data.masking import masked_token_selection, sample_masks
from webssl_repro.methods.base import PretrainMethod
from webssl_repro.methods.dino import (
    DinoConfig,
    DinoMethod,
    dino_cross_entropy,
    dino_multicrop_loss,
    ema_update_,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from webssl_repro.methods.dino_losses import softmax_center, updated_center
from webssl_repro.methods.schedules import scaled_lr, teacher_temp_schedule
from webssl_repro.models.vit import Arch

# ----------------------------------------------------------------------------- losses


def test_sinkhorn_hand_case_one_iteration():
    # exp(logits) = [[1,2],[3,4]]; Q = (K x B) = [[1,3],[2,4]]/10; prototype rows ->
    # [[.25,.75],[1/3,2/3]]/2; sample columns normalised -> col0 [3/7, 4/7], col1 [9/17, 8/17]
    logits = torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    q = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=1)
    assert torch.allclose(q, torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]]), atol=1e-6)
    # at teacher_temp 0.5 the exponentials square ([[1,4],[9,16]]): prototype rows [.05,.45] and
    # [.1,.4], so sample 0 sharpens to [1/3, 2/3] (the teacher temperature's whole effect)
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=1)
    assert torch.allclose(q, torch.tensor([[1 / 3, 2 / 3], [9 / 17, 8 / 17]]), atol=1e-6)


def test_sinkhorn_rows_sum_to_one_and_columns_balance():
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    q = sinkhorn_knopp(logits, teacher_temp=0.5)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    # every prototype gets ~B/K = 8 of the mass, far more evenly than a plain softmax
    sk_dev = (q.sum(dim=0) - 8).abs().max()
    softmax_dev = (torch.softmax(logits / 0.5, dim=1).sum(dim=0) - 8).abs().max()
    assert sk_dev < 2.0 and sk_dev < 0.5 * softmax_dev


def test_dino_cross_entropy_hand_case():
    # row 1: s/τ = [0, ln 3] -> p = [1/4, 3/4]; t = [.5,.5] -> -(.5 ln .25 + .5 ln .75) = 0.836988
    # row 2: p = [1/2, 1/2]; t = [1, 0] -> ln 2 = 0.693147; mean = 0.765068
    s = torch.tensor([[0.0, math.log(3) / 2], [0.0, 0.0]])
    t = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert dino_cross_entropy(s, t, student_temp=0.5).item() == pytest.approx(0.765068, abs=1e-5)


def test_multicrop_loss_is_the_sum_over_crop_pairs():
    """One contraction equals DINOv2's double loop: each global row with its (swapped)
    teacher row, each of the n local chunks with both teacher views; B=3, n=4, K=5."""
    torch.manual_seed(0)
    s_global, s_local = torch.randn(6, 5), torch.randn(12, 5)
    p = torch.softmax(torch.randn(6, 5), dim=1)
    global_sum, local_sum = dino_multicrop_loss(s_global, s_local, p, student_temp=0.1)
    loop = sum(dino_cross_entropy(chunk, view, 0.1) for chunk in s_local.chunk(4) for view in p.chunk(2))
    assert global_sum.item() == pytest.approx(2 * dino_cross_entropy(s_global, p, 0.1).item(), rel=1e-6)
    assert local_sum.item() == pytest.approx(loop.item(), rel=1e-6)
    assert dino_multicrop_loss(s_global, None, p, 0.1)[1].item() == 0.0


def test_koleo_hand_case():
    # rows normalise to e1, e2, (e1+e2)/√2; every nearest neighbour is 45° away:
    # distance 2·sin(π/8) = 0.765367, loss = -ln(0.765367) = 0.267400
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert koleo_loss(x).item() == pytest.approx(0.267400, abs=1e-5)


def test_koleo_per_gpu_groups_as_dinov2_ranks():
    """DINOv2 takes KoLeo over each GPU's images (12 in the ViT-g recipe) and averages the
    GPUs: 48 images of one rank are 4 such GPUs; 2 ranks of 24 give the same loss."""
    from webssl_repro.methods.dino_losses import koleo_per_gpu

    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    quarters = torch.stack([koleo_loss(q) for q in x.split(12)]).mean()
    assert koleo_per_gpu(x, 12).item() == pytest.approx(quarters.item(), rel=1e-6)
    two_ranks = (koleo_per_gpu(x[:24], 12) + koleo_per_gpu(x[24:], 12)) / 2
    assert two_ranks.item() == pytest.approx(quarters.item(), rel=1e-6)
    assert koleo_per_gpu(x, None).item() == pytest.approx(koleo_loss(x).item())
    assert koleo_per_gpu(x, 12).item() < koleo_loss(x).item() - 0.05  # nearer neighbours among 48
    assert koleo_per_gpu(x[:8], 12).item() == pytest.approx(koleo_loss(x[:8]).item())  # fewer: one group
    halves = (koleo_loss(x[:15]) + koleo_loss(x[15:30])) / 2  # 30 rows: two groups of 15, never one of 6
    assert koleo_per_gpu(x[:30], 12).item() == pytest.approx(halves.item(), rel=1e-6)
    assert DinoConfig().koleo_batch == 12
    with pytest.raises(ValueError, match="koleo_batch must be >= 2"):
        DinoConfig(koleo_batch=1)


def test_koleo_excludes_self():
    # two identical rows: nearest non-self neighbour is at distance 0 -> large loss; if self
    # were not excluded every row would get the same (huge) value, so also check a spread case
    dup = koleo_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert dup.item() > 5.0
    ortho = koleo_loss(torch.eye(3))  # all distances √2 -> -ln √2
    assert ortho.item() == pytest.approx(-0.5 * math.log(2), abs=1e-5)


def test_ibot_loss_weights_per_image():
    # image 0 has 2 masked tokens (weight 1/2 each), image 1 none; divided by both images.
    # Token 0: logits [0, 0.1 ln 3] / 0.1 -> softmax [1/4, 3/4], CE with [.5, .5] = 0.836988;
    # token 1: uniform student, CE with [1, 0] = ln 2: (0.836988/2 + 0.693147/2)/2 = 0.382534
    s = torch.tensor([[0.0, 0.1 * math.log(3)], [0.0, 0.0]])
    t = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    loss = ibot_patch_loss(s, t, torch.tensor([0.5, 0.5]), n_images=2, student_temp=0.1)
    assert loss.item() == pytest.approx(0.382534, abs=1e-5)
    # at student_temp 1 token 0's softmax is only [0.4726, 0.5274]: CE 0.694655
    loss = ibot_patch_loss(s, t, torch.tensor([0.5, 0.5]), n_images=2, student_temp=1.0)
    assert loss.item() == pytest.approx((0.694655 + 0.693147) / 4, abs=1e-5)


def test_softmax_centering_hand_case():
    logits = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    center = updated_center(torch.zeros(1, 2), logits, momentum=0.9)  # 0.1 · mean [2, 4]
    assert torch.allclose(center, torch.tensor([[0.2, 0.4]]))
    probs = softmax_center(torch.tensor([[0.2, 0.4 + math.log(3) * 0.5]]), center, 0.5)
    assert torch.allclose(probs, torch.tensor([[0.25, 0.75]]), atol=1e-6)


def test_softmax_center_kept_when_nothing_is_masked():
    center = torch.tensor([[0.2, 0.4]])
    assert torch.equal(updated_center(center, torch.zeros(0, 2), momentum=0.9), center)


def test_ema_update_arithmetic():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.ones_(student.weight), nn.init.ones_(student.bias)
    nn.init.zeros_(teacher.weight), nn.init.zeros_(teacher.bias)
    ema_update_(teacher, student, momentum=0.9)
    assert torch.allclose(teacher.weight, torch.full((2, 2), 0.1))
    ema_update_(teacher, student, momentum=0.9)  # 0.9·0.1 + 0.1 = 0.19
    assert torch.allclose(teacher.bias, torch.full((2,), 0.19))


# ----------------------------------------------------------------------------- schedules


def test_teacher_temp_momentum_and_lr_scaling():
    temps = [teacher_temp_schedule(s, 0.04, 0.07, warmup_steps=4) for s in (0, 1, 2, 3, 4, 100)]
    assert temps == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    # a one-step warm-up is DINOv2's linspace(0.04, 0.07, 1) = [0.04], not the final value
    assert [teacher_temp_schedule(s, 0.04, 0.07, warmup_steps=1) for s in (0, 1)] == [0.04, 0.07]
    cfg = DinoConfig(total_steps=100)
    assert [cfg.momentum_at(s) for s in (0, 50, 100)] == pytest.approx([0.994, 0.997, 1.0])
    assert DinoConfig().lr == pytest.approx(3.4641e-4, rel=1e-4)  # 2e-4·√(3072/1024), Table 4's 3.5e-4
    assert scaled_lr(1.5e-4, 4096, "linear_wrt_256") == pytest.approx(2.4e-3)


def test_dino_config_defaults_and_mapping():
    cfg = DinoConfig()
    assert (cfg.dino_n_prototypes, cfg.dino_bottleneck_dim, cfg.ibot_bottleneck_dim) == (131072, 384, 256)
    assert (cfg.clip_grad, cfg.koleo_loss_weight, cfg.n_local_crops, cfg.local_crop_size) == (3.0, 0.1, 8, 98)
    cfg = DinoConfig.from_mapping({"n_local_crops": 2, "mask_ratio_min_max": [0.2, 0.4]})
    assert cfg.n_local_crops == 2 and cfg.mask_ratio_min_max == (0.2, 0.4)
    with pytest.raises(KeyError, match="teacher_tmp"):
        DinoConfig.from_mapping({"teacher_tmp": 0.05})


# ----------------------------------------------------------------------------- method

TINY = dict(dino_n_prototypes=64, ibot_n_prototypes=48, dino_hidden_dim=32, ibot_hidden_dim=32,
            dino_bottleneck_dim=16, ibot_bottleneck_dim=16, global_crop_size=32, local_crop_size=16,
            n_local_crops=2, freeze_last_layer_steps=2, warmup_teacher_temp_steps=4,
            total_steps=50, drop_path_rate=0.1, momentum_teacher=0.9)


def tiny_batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.randn(2 * b, 3, 32, 32, generator=g),
            "local_crops": torch.randn(2 * b, 3, 16, 16, generator=g),
            "masks": sample_masks(2 * b, (4, 4), generator=g)}


def test_dino_method_trains_tiny_vit():
    torch.manual_seed(0)
    method = DinoMethod(Arch(32, 2, 2, patch=8), DinoConfig(**TINY))
    assert isinstance(method, PretrainMethod)
    method.train()
    opt = torch.optim.AdamW(method.param_groups(2e-3, 0.04))
    batch = tiny_batch()
    last = [p.detach().clone() for n, p in method.model.named_parameters() if "last_layer" in n]
    losses = []
    for step in range(8):
        out = method.training_step(batch, step)
        assert {"loss", "dino_loss", "ibot_loss", "koleo_loss"} <= set(out)
        assert all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        opt.step()
        method.after_optimizer_step(step)
        now = [p for n, p in method.model.named_parameters() if "last_layer" in n]
        frozen = all(torch.equal(a, b) for a, b in zip(last, now))
        assert frozen == (step < 2)  # prototypes frozen for the first 2 steps only
        losses.append(out["loss"].item())
    assert out["ibot_loss"] > 0 and out["koleo_loss"] != 0
    assert losses[-1] < losses[0]
    # the teacher moved towards the student but is not the student
    s_w, t_w = method.model.backbone.patch_embed.proj.weight, method.teacher.backbone.patch_embed.proj.weight
    assert not torch.equal(s_w, t_w) and method.encoder() is method.teacher.backbone
    assert not method.teacher.training and method.model.training


def test_gradients_are_clipped_per_part_as_dinov2():
    """DINOv2 clips the backbone, the DINO head and the iBOT head each to ``clip_grad``: a
    backbone gradient far above the bound does not shrink the heads' gradients."""
    from webssl_repro.train.loop import clip_gradients, clip_groups, grad_norm_scalars

    torch.manual_seed(0)
    method = DinoMethod(Arch(32, 2, 2, patch=8), DinoConfig(**TINY)).train()
    params = [p for p in method.model.parameters() if p.requires_grad]
    groups = clip_groups(method, params)
    assert list(groups) == ["backbone", "dino_head", "ibot_head"]
    method.training_step(tiny_batch(), 10)["loss"].backward()
    before = {name: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])).item()
              for name, ps in groups.items()}
    bound = 0.5 * max(before.values())  # clips the largest part only
    heads = {name: [p.grad.clone() for p in groups[name]] for name in groups if before[name] < bound}
    assert heads, before
    norms = clip_gradients(groups, bound)
    assert {k: v.item() for k, v in norms.items()} == pytest.approx(before)
    for name, ps in groups.items():
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])).item()
        assert after == pytest.approx(min(before[name], bound), rel=1e-5), name
    for name, grads in heads.items():  # untouched, not scaled by the global norm
        assert all(torch.equal(p.grad, g) for p, g in zip(groups[name], grads)), name
    logged = grad_norm_scalars(norms)
    assert logged["grad_norm"] == pytest.approx(sum(v * v for v in before.values()) ** 0.5)
    assert logged["grad_norm_backbone"] == pytest.approx(before["backbone"])

    method.clip_groups = lambda: {"backbone": list(method.model.backbone.parameters())}
    with pytest.raises(ValueError, match="clip_groups"):
        clip_groups(method, params)


def test_global_dino_loss_pairs_each_view_with_the_other_teacher_view():
    torch.manual_seed(0)
    # LayerScale 1 so that the CLS token depends on the image already at init
    method = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY, layerscale=1.0)).eval()
    with torch.no_grad():  # make teacher and student differ so the pairing matters
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    crops = torch.randn(4, 3, 32, 32)  # B = 2: rows 0-1 view A, rows 2-3 view B
    out = method.training_step({"global_crops": crops}, step=100)
    with torch.no_grad():
        t = method.teacher(crops)["global_logits"]
        s = method.model(crops)["global_logits"]
        p = sinkhorn_knopp(torch.cat([t[2:], t[:2]]), teacher_temp=0.07)  # rows: B-targets, A-targets
        # two (view, other view) terms over DINOv2's 2 + max(2 * n_local, 1) = 3 with no local crops
        expected = (dino_cross_entropy(s[:2], p[:2], 0.1) + dino_cross_entropy(s[2:], p[2:], 0.1)) / 3
        same_view = (dino_cross_entropy(s[:2], p[2:], 0.1) + dino_cross_entropy(s[2:], p[:2], 0.1)) / 3
    assert out["dino_global_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - same_view.item()) > 1e-4


def test_dino_method_without_locals_or_masks_and_centering():
    torch.manual_seed(0)
    method = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**{**TINY, "centering": "centering",
                                                                "ibot_separate_head": False}))
    out = method.training_step({"global_crops": torch.randn(4, 3, 32, 32)}, 0)
    assert out["ibot_loss"].item() == 0.0 and out["dino_local_loss"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out = method.training_step(tiny_batch(2), 1)
    assert out["ibot_loss"] > 0
    assert method.dino_center.abs().sum() > 0 and method.ibot_center.shape == (1, 64)


def test_softmax_centering_targets_and_center_update():
    """DINO's centering: targets softmax((t - c) / temp) with the center before this batch,
    then c <- 0.9 c + 0.1 mean(t); a step leaves the center at 0.1 x the mean teacher logits."""
    torch.manual_seed(0)
    method = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**{**TINY, "centering": "centering"}))
    logits = torch.randn(6, 64)
    first = method._targets(logits, 0.1, "dino_center")
    torch.testing.assert_close(first, torch.softmax(logits / 0.1, dim=-1))  # the center starts at 0
    torch.testing.assert_close(method.dino_center, 0.1 * logits.mean(0, keepdim=True))
    again = method._targets(logits, 0.1, "dino_center")
    torch.testing.assert_close(again, torch.softmax((logits - 0.1 * logits.mean(0)) / 0.1, dim=-1))
    torch.testing.assert_close(method.dino_center, 0.19 * logits.mean(0, keepdim=True))

    fresh = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**{**TINY, "centering": "centering"}))
    batch = tiny_batch(2)
    with torch.no_grad():
        cls = fresh.teacher.backbone.forward_features_dict(batch["global_crops"])["x_norm_clstoken"]
        t_logits = fresh.teacher.dino_head(cls)
    fresh.training_step(batch, 0)
    torch.testing.assert_close(fresh.dino_center, 0.1 * t_logits.mean(0, keepdim=True))


def test_training_step_takes_the_collated_mask_selection():
    """The collate's ``mask_indices`` / ``mask_weights`` give exactly the loss and gradients of
    selecting from ``masks`` in the step, and the step does use them when present."""
    torch.manual_seed(0)
    method = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY)).eval()
    batch = tiny_batch(4)
    indices, weights = masked_token_selection(batch["masks"])
    assert indices.numel() > 0
    runs = []
    for b in (batch, {**batch, "mask_indices": indices, "mask_weights": weights}):
        method.model.zero_grad(set_to_none=True)
        out = method.training_step(b, 12)
        out["loss"].backward()
        runs.append((out, [p.grad.clone() for p in method.model.parameters() if p.grad is not None]))
    (found, g_found), (given, g_given) = runs
    assert torch.equal(found["loss"], given["loss"]) and torch.equal(found["ibot_loss"], given["ibot_loss"])
    assert len(g_found) == len(g_given) and all(torch.equal(a, b) for a, b in zip(g_found, g_given))
    doubled = method.training_step({**batch, "mask_indices": indices, "mask_weights": 2 * weights}, 12)
    assert doubled["ibot_loss"].item() == pytest.approx(2 * given["ibot_loss"].item(), rel=1e-6)


def test_dino_param_groups():
    method = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY))
    groups = method.param_groups(1.0, 0.04)
    names = {id(p): n for n, p in method.model.named_parameters()}

    def group_of(name):
        return next(g for g in groups if any(names[id(p)] == name for p in g["params"]))

    pe = group_of("backbone.patch_embed.proj.weight")
    assert pe["lr_multiplier"] == pytest.approx(0.2) and pe["lr"] == pytest.approx(0.2)
    assert group_of("backbone.patch_embed.proj.bias")["wd_multiplier"] == 0.0
    for no_wd in ("backbone.blocks.0.norm1.weight", "backbone.blocks.0.ls1.gamma", "backbone.blocks.0.attn.qkv.bias"):
        assert group_of(no_wd)["wd_multiplier"] == 0.0
    assert group_of("backbone.pos_embed")["wd_multiplier"] == 1.0  # as DINOv2's name rule
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 1 and len(last[0]["params"]) == 4  # (g, v) of both heads
    assert sum(len(g["params"]) for g in groups) == len(names)
    exempt = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY, no_wd_on_tokens=True))
    assert all(g["wd_multiplier"] == 0.0 for g in exempt.param_groups(1.0, 0.04)
               if any(p is exempt.model.backbone.pos_embed for p in g["params"]))


def test_dino_state_dict_resume_is_exact():
    torch.manual_seed(0)
    a = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY))
    a.after_optimizer_step(10)  # EMA step: teacher != student afterwards only if student moved
    with torch.no_grad():
        a.model.backbone.cls_token.add_(1.0)
    a.after_optimizer_step(11)
    torch.manual_seed(1)
    b = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    batch = tiny_batch(2)
    assert torch.equal(a.training_step(batch, 12)["loss"], b.training_step(batch, 12)["loss"])


def test_koleo_runs_in_fp32_under_bf16_autocast():
    """Each row has two near copies, the farther one first; their cosines (1 - 7e-5 and
    1 - 3e-5) tie in bf16 (8 mantissa bits), which would pick the farther copy. KoLeo opts
    out of the loop's autocast (as DINOv2 does) and gives its fp32 value."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(32, 64, generator=g), dim=-1)
    x = torch.cat([x, x + 0.012 * F.normalize(torch.randn(32, 64, generator=g), dim=-1),
                   x + 0.008 * F.normalize(torch.randn(32, 64, generator=g), dim=-1)])
    ref = koleo_loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = koleo_loss(x)
    assert got.dtype == torch.float32 and got.item() == ref.item()


def test_a_high_resolution_run_starts_from_its_parent(tmp_path):
    """The 378/518 fine-tune loads every module of its 224 px parent (student, teacher, heads),
    the position embeddings resampled to its grid (DINOv2's rule); a parent of another size is
    refused in one line naming a tensor, not torch's list of every mismatch."""
    from webssl_repro.models.vit import resample_pos_embed
    from webssl_repro.train.run import _load_parent

    torch.manual_seed(0)
    parent = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**TINY))
    torch.save(parent.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(1)
    hires = DinoMethod(Arch(32, 1, 2, patch=8), DinoConfig(**{**TINY, "global_crop_size": 48}))
    _load_parent(hires, tmp_path / "state.pt")
    got, want = hires.state_dict(), parent.state_dict()
    for key, value in want.items():
        if key.endswith("pos_embed"):
            assert got[key].shape == (1, 1 + 6 * 6, 32)
            torch.testing.assert_close(got[key], resample_pos_embed(value, (6, 6), 1))
        else:
            assert torch.equal(got[key], value), key
    other = DinoMethod(Arch(48, 1, 2, patch=8), DinoConfig(**TINY))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is another model: .* is \(.*48.*\) there, \(.*32.*\) here"):
        _load_parent(hires, tmp_path / "other.pt")
