"""Benchmark: one mini Web-DINO training step against its compute floor.

Floor = what any DINO implementation must compute for these crops: a plain forward+backward
of the same student backbone (``models.vit.build_encoder``) over 2 global + N local crops,
plus the teacher backbone's forward over the 2 global crops; no heads, losses, optimizer or
EMA. The step is ``DinoMethod.training_step`` + backward + gradient clipping + AdamW step +
``after_optimizer_step`` (frozen prototypes, EMA), as ``train.loop`` runs it. Target:
step / floor <= 1.15. Above target, a per-phase breakdown shows where the extra time goes.

Both are also counted in matmul FLOPs (``torch.utils.flop_counter``), a count that does not
depend on the machine: the step's extra FLOPs are the heads' and the losses' arithmetic, which
the floor leaves out by definition. The rest of the time ratio is per-step work that is not a
matrix product (AdamW, clipping, EMA, softmaxes) and the cost of launching each op.

``--compile`` also times both sides under ``torch.compile``.

Run: ``python benchmarks/bench_dino_step.py [--size 1b] [--res 224] [--steps 20] [--threads 1] [--compile]``
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from webssl_repro.data.corpus import IndexedCorpus, read_manifest
from webssl_repro.data.stages import build_corpus
from webssl_repro.methods.dino import DinoMethod, ema_update_
from webssl_repro.methods.dino_losses import dino_multicrop_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from webssl_repro.models.vit import Arch, build_encoder
from webssl_repro.runs import Run
from webssl_repro.train import TrainConfig
from webssl_repro.train.loop import build_optimizer, clip_gradients, clip_groups
from webssl_repro.train.run import build
from webssl_repro.workflow import shipped_plan

TARGET = 1.15


def mini_config_slice(run: str) -> dict:
    return shipped_plan("mini").run_config(run)


def mini_batch(run: str, corpus: IndexedCorpus):
    """The method of ``run`` exactly as ``pretrain`` builds it, and one real multi-crop batch."""
    cfg = mini_config_slice(run)
    torch.manual_seed(0)
    method, sample_fn, collate_fn, train_map, _ = build(Run.parse(run), cfg, corpus)
    gen = torch.Generator().manual_seed(0)
    samples = [sample_fn(*corpus.sample(i), gen) for i in range(method.config.batch_size)]
    return method, collate_fn(samples, gen), train_map


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def floor_step(arch: Arch, cfg, batch, compile: bool = False):
    """Plain backbone work of one step: student fwd+bwd on all crops, teacher fwd on the globals."""
    student = build_encoder(arch, "dino", img_size=cfg.global_crop_size, drop_path_rate=cfg.drop_path_rate,
                            layerscale=cfg.layerscale).train()
    teacher = build_encoder(arch, "dino", img_size=cfg.global_crop_size).eval().requires_grad_(False)
    g, loc = batch["global_crops"], batch["local_crops"]

    def forward():
        with torch.no_grad():
            teacher.forward_features(g)
        return student.forward_features(g).float().mean() + student.forward_features(loc).float().mean()

    forward = torch.compile(forward) if compile else forward

    def step():
        forward().backward()
        student.zero_grad(set_to_none=True)

    return step


def dino_step(method: DinoMethod, batch, train_map, compile: bool = False):
    params = [p for p in method.model.parameters() if p.requires_grad]
    opt = build_optimizer(method, TrainConfig.from_mapping(train_map))  # the loop's optimizer (fused AdamW)
    groups = clip_groups(method, params)  # the loop's per-part clipping (backbone, each head)
    counter = iter(range(10**9))
    method.train()
    # compiled: the forward and losses (and so their backward); clipping, AdamW and EMA stay eager
    training_step = torch.compile(method.training_step) if compile else method.training_step

    def step():
        s = next(counter) + method.config.freeze_last_layer_steps  # past the freeze: the steady state
        opt.zero_grad(set_to_none=True)
        out = training_step(batch, s)
        out["loss"].backward()
        clip_gradients(groups, train_map["grad_clip"])
        opt.step()
        method.after_optimizer_step(s)

    return step, opt, groups


def breakdown(method: DinoMethod, batch, opt, groups, grad_clip: float):
    """A step re-implemented with timers around each part of ``DinoMethod.training_step``
    (same calls, same order); returns a function that runs one and gives ms per phase."""
    cfg = method.config
    student, teacher = method.model, method.teacher
    g, loc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    idx, w = batch["mask_indices"], batch["mask_weights"]
    n = g.shape[0]
    cur: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        cur[name] += 1e3 * (time.perf_counter() - t0)
        return out

    def one() -> dict[str, float]:
        cur.clear()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_bb = timed("teacher backbone fwd", lambda: teacher.backbone.forward_features_dict(g))
            t_cls = timed("teacher heads fwd", lambda: teacher.dino_head(t_bb["x_norm_clstoken"]))
            t_patch = timed("teacher heads fwd", lambda: teacher.ibot_head(
                t_bb["x_norm_patchtokens"].flatten(0, 1).index_select(0, idx)))
            p_cls = timed("sinkhorn-knopp (cls+patch)",
                          lambda: sinkhorn_knopp(torch.cat(t_cls.chunk(2)[::-1]), cfg.teacher_temp, cfg.sinkhorn_iterations))
            p_patch = timed("sinkhorn-knopp (cls+patch)",
                            lambda: sinkhorn_knopp(t_patch, cfg.teacher_temp, cfg.sinkhorn_iterations))
        s_bb = timed("student backbone fwd", lambda: student.backbone.forward_features_dict(g, masks=masks))
        s_loc = timed("student backbone fwd", lambda: student.backbone.forward_features_dict(loc)["x_norm_clstoken"])
        s_cls = s_bb["x_norm_clstoken"]
        s_g, s_l = timed("student heads fwd", lambda: student.dino_head(torch.cat([s_cls, s_loc])).split(
            [s_cls.shape[0], s_loc.shape[0]]))
        s_p = timed("student heads fwd", lambda: student.ibot_head(
            s_bb["x_norm_patchtokens"].flatten(0, 1).index_select(0, idx)))

        def losses():
            loss = sum(dino_multicrop_loss(s_g, s_l, p_cls, cfg.student_temp))
            loss = loss + ibot_patch_loss(s_p, p_patch, w, n, cfg.student_temp)
            return loss + cfg.koleo_loss_weight * sum(koleo_loss(c) for c in s_bb["x_norm_clstoken"].chunk(2))

        loss = timed("losses (dino+ibot+koleo)", losses)
        timed("backward", loss.backward)
        timed("clip + AdamW", lambda: (clip_gradients(groups, grad_clip), opt.step()))
        timed("EMA update", lambda: ema_update_(teacher, student, 0.999))
        return dict(cur)

    return one


def matmul_flops(fn) -> int:
    """FLOPs of one call of ``fn`` in matrix products (linear, attention, convolution)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1b", help="mini size label (config/mini.yaml labels.sizes)")
    ap.add_argument("--res", default="224", help="resolution label (224 = 32 px at mini scale)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time both sides under torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = f"dino{args.size}-full2b-{args.res}"
    with tempfile.TemporaryDirectory() as tmp:
        build_corpus({"seed": 0, "n_images": 64, "shard_size": 64, "size": 64}, f"{tmp}/manifest.json")
        corpus = IndexedCorpus(read_manifest(f"{tmp}/manifest.json")["shards"])
        method, batch, train_map = mini_batch(run, corpus)
    cfg = method.config
    arch = Arch.from_config({**mini_config_slice(run)["arch"], "ffn": "swiglu"})
    floor_fn = floor_step(arch, cfg, batch)
    step_fn, opt, groups = dino_step(method, batch, train_map)
    phase_fn = breakdown(method, batch, opt, groups, train_map["grad_clip"])
    flops_floor, flops_step = matmul_flops(floor_fn), matmul_flops(step_fn)
    # Interleaved rounds, so that load from other processes hits both sides alike.
    floors, fulls, rows = [], [], defaultdict(list)
    for i in range(args.warmup + args.steps):
        f, s, p = _ms(floor_fn), _ms(step_fn), phase_fn()
        if i >= args.warmup:
            floors.append(f)
            fulls.append(s)
            for k, v in p.items():
                rows[k].append(v)
    floor, full = statistics.median(floors), statistics.median(fulls)
    phases = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{run}: batch {cfg.batch_size}, 2x{cfg.global_crop_size}px + {cfg.n_local_crops}x{cfg.local_crop_size}px "
          f"crops, {cfg.dino_n_prototypes}+{cfg.ibot_n_prototypes} prototypes, {args.threads} thread(s), "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':34s}{'ms/step':>10s}")
    print(f"{'floor (backbones only)':34s}{floor:10.1f}")
    print(f"{'DINO step (as train.loop)':34s}{full:10.1f}")
    ratio = full / floor
    print(f"{'ratio (target <= %.2f)' % TARGET:34s}{ratio:10.2f}  {'OK' if ratio <= TARGET else 'ABOVE TARGET'}")
    print(f"{'matmul GFLOP/step: floor':34s}{flops_floor / 1e9:10.3f}")
    print(f"{'matmul GFLOP/step: DINO step':34s}{flops_step / 1e9:10.3f}")
    print(f"{'FLOP ratio (heads + losses)':34s}{flops_step / flops_floor:10.3f}")
    print("\nphases of a step (medians, ms):")
    total = sum(phases.values())
    for name, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:32s}{ms:8.1f}  {100 * ms / total:5.1f} %")
    print(f"  {'sum':32s}{total:8.1f}")
    if args.compile:
        compiled(arch, cfg, method, batch, train_map, args, floor)


def compiled(arch: Arch, cfg, method: DinoMethod, batch, train_map, args, eager_floor: float) -> None:
    """The same two sides under ``torch.compile`` (inductor): the step's forward and losses,
    the floor's forward; the first call of each (the compilation) is timed on its own."""
    floor_fn = floor_step(arch, cfg, batch, compile=True)
    step_fn = dino_step(method, batch, train_map, compile=True)[0]
    compile_s = {"floor": _ms(floor_fn) / 1e3, "step": _ms(step_fn) / 1e3}
    step_fn()  # the step number becomes a dynamic int on its first change: one recompilation
    floors, fulls = [], []
    for i in range(args.warmup + args.steps):
        f, s = _ms(floor_fn), _ms(step_fn)
        if i >= args.warmup:
            floors.append(f)
            fulls.append(s)
    floor, full = statistics.median(floors), statistics.median(fulls)
    print(f"\ntorch.compile (first calls {compile_s['floor']:.0f} s / {compile_s['step']:.0f} s; "
          "inductor's on-disk cache may already hold the kernels):")
    print(f"{'floor, compiled':34s}{floor:10.1f}")
    print(f"{'DINO step, compiled':34s}{full:10.1f}")
    print(f"{'ratio, both compiled':34s}{full / floor:10.2f}")
    print(f"{'ratio, to the eager floor':34s}{full / eager_floor:10.2f}")


if __name__ == "__main__":
    main()
