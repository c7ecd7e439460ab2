"""Tests of the shared training loop against a toy method (a tiny denoising autoencoder
with an EMA copy), so that they exercise method state, RNG use and multipliers without
depending on Web-DINO / MAE / CLIP.

Run as a script under torchrun, this file is also the 2-rank DDP / FSDP2 worker.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from webssl_repro.train import (
    CosineSchedule,
    Preempted,
    TrainConfig,
    read_checkpoint,
    read_log,
    read_pointer,
    train,
    transformer_blocks,
)
from webssl_repro.train.deadline import Deadline, job_deadline, slurm_end_time
from helpers_dist import rerun_if_aborted, torchrun, worker_env

DIM, HIDDEN, GLOBAL_BATCH = 16, 12, 8


class Killed(Exception):
    """Stands in for a job killed mid-step (no chance to checkpoint)."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, HIDDEN)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU()) for _ in range(2)])
        self.out = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class ToyMethod:
    """Denoising autoencoder + EMA teacher; not an ``nn.Module``, to test the generic path."""

    def __init__(self, *, init_seed=0, noise=0.1, momentum=0.9, kill_at=None, signal_at=None, signum=signal.SIGTERM):
        torch.manual_seed(init_seed)
        self.model = Net()
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.noise, self.momentum = noise, momentum
        self.kill_at, self.signal_at, self.signum = kill_at, signal_at, signum
        self.ema_updates = 0

    def param_groups(self, base_lr, weight_decay):
        named = list(self.model.named_parameters())
        return [
            {"params": [p for n, p in named if p.ndim > 1]},
            {"params": [p for n, p in named if p.ndim == 1], "wd_multiplier": 0.0, "lr_multiplier": 0.5},
        ]

    def training_step(self, batch, step):
        if step == self.kill_at:
            raise Killed(step)
        if step == self.signal_at:
            os.kill(os.getpid(), self.signum)
        noisy = batch + self.noise * torch.randn_like(batch) if self.noise else batch
        rec = self.model(noisy)
        with torch.no_grad():
            target = self.teacher(batch)
        rec_loss = F.mse_loss(rec, batch)
        dist_loss = F.mse_loss(rec, target)
        return {"loss": rec_loss + 0.1 * dist_loss, "rec": rec_loss.detach(), "dist": dist_loss.detach(),
                "momentum": self.momentum}

    def after_optimizer_step(self, step):
        with torch.no_grad():
            t, s = list(self.teacher.parameters()), list(self.model.parameters())
            torch._foreach_mul_(t, self.momentum)
            torch._foreach_add_(t, s, alpha=1 - self.momentum)
        self.ema_updates += 1

    def shadow_modules(self):
        return [self.teacher]

    def encoder(self):
        return self.teacher

    def state_dict(self):
        return {"teacher": self.teacher.state_dict(), "ema_updates": self.ema_updates}

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])
        self.ema_updates = state["ema_updates"]


_DATA = torch.randn(512, 4, generator=torch.Generator().manual_seed(7)) @ torch.randn(
    4, DIM, generator=torch.Generator().manual_seed(8))


def data_factory(start_sample, rank, world_size):
    """Global sample i is row i % 512; rank r takes its slice of every global batch."""
    local = GLOBAL_BATCH // world_size
    sample = start_sample
    while True:
        first = sample + rank * local
        yield _DATA[torch.arange(first, first + local) % len(_DATA)]
        sample += GLOBAL_BATCH


def make_cfg(**overrides):
    base = dict(samples_seen=10 * GLOBAL_BATCH, global_batch_size=GLOBAL_BATCH, lr=3e-2, min_lr=1e-3,
                warmup_steps=3, weight_decay=0.04, weight_decay_end=0.2, grad_clip=0.5,
                checkpoint_every=3, log_every=1, seed=0)
    base.update(overrides)
    return TrainConfig.from_mapping(base)


def final_tensors(run_dir):
    state = read_checkpoint(run_dir)
    out = {f"model.{k}": v for k, v in state["model"].items()}
    out.update({f"teacher.{k}": v for k, v in state["method"]["teacher"].items()})
    for pid, s in state["optimizer"]["state"].items():
        out.update({f"optim.{pid}.{k}": torch.as_tensor(v) for k, v in s.items()})
    return state, out


def assert_bitwise(a_dir, b_dir):
    sa, ta = final_tensors(a_dir)
    sb, tb = final_tensors(b_dir)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert (sa["step"], sa["method"]["ema_updates"]) == (sb["step"], sb["method"]["ema_updates"])


# ------------------------------------------------------------------ schedules and config


def test_cosine_schedule_hand_values_and_dinov2_array():
    s = CosineSchedule(base=1.0, final=0.1, total_steps=10, warmup_steps=4)
    assert s(0) == 0.0 and s(2) == pytest.approx(2 / 3) and s(3) == 1.0  # linspace(0, base, 4)
    assert s(4) == 1.0  # cosine starts at base
    assert s(7) == pytest.approx(0.55)  # midpoint of the 6 cosine steps: (base + final) / 2
    assert s(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(5 * math.pi / 6)))
    assert s(10) == s(10**9) == 0.1
    # DINOv2's CosineScheduler array, rebuilt with numpy
    base, final, total, warm = 5e-4, 1e-6, 37, 7
    ref = np.concatenate([np.linspace(0, base, warm),
                          final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warm) / (total - warm)))])
    got = CosineSchedule(base, final, total, warm)
    assert [got(i) for i in range(total)] == pytest.approx(ref.tolist(), rel=1e-12)
    wd = CosineSchedule(0.04, 0.2, 100)  # DINOv2's weight decay *rises*
    assert (wd(0), wd(50), wd(100)) == pytest.approx((0.04, 0.12, 0.2))


def test_config_steps_coercion_and_unknown_keys():
    cfg = TrainConfig.from_mapping({"samples_seen": "1e3", "global_batch_size": 64, "lr": "1e-3"})
    assert cfg.steps == 16 and cfg.samples_seen == 1000 and cfg.lr == 1e-3  # ceil(1000 / 64)
    assert TrainConfig(samples_seen=1024, global_batch_size=64, lr=1.0).steps == 16
    assert cfg.wd_schedule()(5) == 0.04  # no weight_decay_end: constant
    with pytest.raises(ValueError, match="warmup_step"):
        TrainConfig.from_mapping({"samples_seen": 10, "global_batch_size": 2, "lr": 1.0, "warmup_step": 1})
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainConfig.from_mapping({"samples_seen": 10, "lr": 1.0})
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(samples_seen=10, global_batch_size=2, lr=1.0, strategy="deepspeed")


def test_transformer_blocks_timm_and_module_lists():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3)
    assert transformer_blocks(vit) == list(vit.blocks)  # timm: nn.Sequential named blocks
    outer = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2)]), nn.Linear(2, 2)])
    assert transformer_blocks(nn.Sequential(outer)) == list(outer)  # outermost items only


# ------------------------------------------------------------------ single-process loop


def test_jsonl_log_and_pointer(tmp_path):
    cfg = make_cfg(samples_seen=6 * GLOBAL_BATCH, log_every=2, checkpoint_every=100)
    result = train(ToyMethod(), data_factory, cfg, tmp_path)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [2, 4, 6]
    assert [r["samples_seen"] for r in log] == [16, 32, 48]
    for r in log:
        assert {"loss", "rec", "dist", "momentum", "lr", "wd", "images_per_s", "grad_norm"} <= r.keys()
        assert r["lr"] == pytest.approx(cfg.lr_schedule()(r["step"] - 1))
        assert r["wd"] == pytest.approx(cfg.wd_schedule()(r["step"] - 1))
        assert r["loss"] == pytest.approx(r["rec"] + 0.1 * r["dist"], rel=1e-6)
        assert r["momentum"] == 0.9 and r["images_per_s"] > 0
    assert log[-1]["loss"] < log[0]["loss"]  # it trains
    assert result.complete and result.step == 6 and result.samples_seen == 48
    assert read_pointer(tmp_path) == {"step": 6, "samples_seen": 48, "complete": True, "world_size": 1,
                                      "dir": "step-6"}
    state = read_checkpoint(tmp_path)
    assert state["data"] == {"start_sample": 48} and state["config"]["lr"] == 3e-2
    assert {"python", "numpy", "torch"} <= state["rng"][0].keys()
    decay, no_decay = state["optimizer"]["param_groups"]  # the last step's values times multipliers
    assert decay["lr"] == pytest.approx(cfg.lr_schedule()(5)) and decay["weight_decay"] == pytest.approx(cfg.wd_schedule()(5))
    assert no_decay["lr"] == pytest.approx(0.5 * cfg.lr_schedule()(5)) and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("interrupt", ["crash", "max_steps"])
def test_kill_and_resume_is_bitwise_identical(tmp_path, interrupt):
    cfg = make_cfg()
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "resumed"
    if interrupt == "crash":  # dies inside step 7: steps 6..7 are lost and redone from the step-6 checkpoint
        with pytest.raises(Killed):
            train(ToyMethod(kill_at=7), data_factory, cfg, run)
        assert read_pointer(run)["step"] == 6
    else:
        assert train(ToyMethod(), data_factory, cfg, run, max_steps=4).step == 4
        assert read_pointer(run) == {"step": 4, "samples_seen": 32, "complete": False, "world_size": 1,
                                     "dir": "step-4"}
    fresh = ToyMethod(init_seed=123)  # different init: everything must come from the checkpoint
    assert train(fresh, data_factory, cfg, run).complete
    assert_bitwise(tmp_path / "straight", run)
    assert [r["step"] for r in read_log(run)] == list(range(1, 11))
    assert fresh.ema_updates == 10


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_finishes_step_checkpoints_and_resumes(tmp_path, signum):
    cfg = make_cfg(checkpoint_every=100)
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "preempted"
    before = signal.getsignal(signum)
    with pytest.raises(Preempted) as info:
        train(ToyMethod(signal_at=4, signum=signum), data_factory, cfg, run)
    assert info.value.exit_code == 75 and info.value.step == 5 and info.value.signum == signum
    assert signal.getsignal(signum) == before  # handler restored
    assert read_pointer(run)["step"] == 5 and read_checkpoint(run)["method"]["ema_updates"] == 5
    train(ToyMethod(init_seed=5), data_factory, cfg, run)
    assert_bitwise(tmp_path / "straight", run)


class StepClock:
    """A clock that a data iterator advances by ``seconds_per_step`` per batch drawn."""

    def __init__(self, seconds_per_step: float) -> None:
        self.now, self.per_step = 0.0, seconds_per_step

    def __call__(self) -> float:
        return self.now

    def data(self, start_sample, rank, world_size):
        for batch in data_factory(start_sample, rank, world_size):
            self.now += self.per_step
            yield batch


def test_deadline_stops_with_a_checkpoint_and_the_retry_resumes(tmp_path):
    """A job ending at t=75 s (10 s per step, margin 20 s): after step 5 (t=50) 25 s are left,
    after step 6 (t=60) 15 s, under the margin, so the loop checkpoints step 6 and stops there;
    the next job, without a limit, ends with the uninterrupted run's weights."""
    cfg = make_cfg(checkpoint_every=100)
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "time_limited"
    clock = StepClock(10.0)
    deadline = Deadline(end_time=75.0, margin_s=20.0, clock=clock)
    with pytest.raises(Preempted) as info:
        train(ToyMethod(), clock.data, cfg, run, deadline=deadline)
    assert info.value.exit_code == 75 and info.value.step == 6 and info.value.signum is None
    assert "time limit (15 s left)" in str(info.value)
    assert read_pointer(run)["step"] == 6
    # a job that starts inside the margin still makes one step of progress, and says so
    with pytest.warns(UserWarning, match="ends in 15 s, within stop_margin_s=20 s"):
        with pytest.raises(Preempted) as info:
            train(ToyMethod(), clock.data, cfg, run, deadline=deadline)
    assert info.value.step == 7 and read_pointer(run)["step"] == 7
    assert deadline.longest_step_s > 0 and deadline.longest_save_s > 0  # measured, not assumed
    train(ToyMethod(init_seed=5), data_factory, cfg, run)
    assert_bitwise(tmp_path / "straight", run)


def test_deadline_counts_the_longest_step_and_save():
    now = [0.0]
    deadline = Deadline(end_time=1000.0, margin_s=120.0, clock=lambda: now[0])
    deadline.record_step(30.0), deadline.record_step(10.0)
    deadline.record_save(50.0)
    now[0] = 799.0
    assert not deadline.reached()  # 201 s left > 120 + 30 + 50
    now[0] = 800.0
    assert deadline.reached()
    with pytest.raises(ValueError, match="stop_margin_s"):
        Deadline(1.0, margin_s=-1.0)
    with pytest.raises(ValueError, match="stop_margin_s must be >= 0"):
        make_cfg(stop_margin_s=-5)


def test_slurm_end_time_from_the_environment_or_squeue():
    from datetime import datetime

    assert slurm_end_time({}) is None  # not a SLURM job
    assert slurm_end_time({"SLURM_JOB_END_TIME": "1795000000", "SLURM_JOB_ID": "7"}) == 1795000000.0
    asked = []

    def squeue(job_id):
        asked.append(job_id)
        return "2026-11-29T14:05:00\n"

    end = slurm_end_time({"SLURM_JOB_ID": "42"}, squeue)
    assert asked == ["42"] and end == datetime(2026, 11, 29, 14, 5).timestamp()
    assert slurm_end_time({"SLURM_JOB_ID": "42"}, lambda _: "UNLIMITED") is None  # no time limit
    with pytest.warns(UserWarning, match="'soon' as the end time of SLURM job 42"):
        assert slurm_end_time({"SLURM_JOB_ID": "42"}, lambda _: "soon") is None

    def unreachable(_):
        raise subprocess.TimeoutExpired("squeue", 60)

    with pytest.warns(UserWarning, match="cannot read the end time of SLURM job 42"):
        assert slurm_end_time({"SLURM_JOB_ID": "42"}, unreachable) is None
    # one process per node asks; the loop's any_rank shares the decision
    assert job_deadline(60.0, {"SLURM_JOB_ID": "42", "LOCAL_RANK": "1"}, squeue) is None
    deadline = job_deadline(60.0, {"SLURM_JOB_ID": "42", "LOCAL_RANK": "0"}, squeue)
    assert deadline.end_time == end and deadline.margin_s == 60.0


def test_resume_refuses_changed_schedule_and_bf16_falls_back_on_cpu(tmp_path):
    train(ToyMethod(), data_factory, make_cfg(samples_seen=4 * GLOBAL_BATCH), tmp_path / "a")
    with pytest.raises(ValueError, match="lr: 0.03 -> 0.1"):
        train(ToyMethod(), data_factory, make_cfg(samples_seen=4 * GLOBAL_BATCH, lr=0.1), tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(ToyMethod(), data_factory, make_cfg(samples_seen=4 * GLOBAL_BATCH, precision="bf16"), tmp_path / "b")
    assert any("CPU" in str(w.message) for w in caught)
    assert_bitwise(tmp_path / "a", tmp_path / "b")


def test_checkpoint_resumes_under_another_strategy(tmp_path):
    """DCP reshards on load: a plain run resumes as a one-rank FSDP2 run."""
    train(ToyMethod(), data_factory, make_cfg(), tmp_path / "straight")
    train(ToyMethod(), data_factory, make_cfg(), tmp_path / "mixed", max_steps=4)
    try:
        train(ToyMethod(init_seed=3), data_factory, make_cfg(strategy="fsdp2"), tmp_path / "mixed")
    finally:
        torch.distributed.destroy_process_group()
    (_, ref), (state, got) = final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "mixed")
    assert state["step"] == 10 and state["config"]["strategy"] == "fsdp2"
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=0, atol=1e-6, msg=k)


def test_fsdp2_refuses_parameters_outside_the_model_and_its_shadows():
    """Sharding gives the ranks rank 0's values of ``model`` and its shadows only; a parameter
    elsewhere in a module method would be left without values."""
    from webssl_repro.train.distributed import init_distributed, prepare_model

    class Stray(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.scale = Net(), nn.Parameter(torch.ones(1))

    env = init_distributed("fsdp2")
    try:
        with pytest.raises(ValueError, match=r"outside the model and its shadow modules: \['scale'\]"):
            prepare_model(Stray(), "fsdp2", env)
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ two gloo ranks (torchrun)


def _worker(out: Path) -> None:
    """Per rank: a DDP run, and an FSDP2 run stopped after 3 steps and resumed fresh.

    Each rank initialises differently: the loop must start every rank from rank 0's weights.
    Under FSDP2 rank 1 builds its method on the meta device, without values, as ``pretrain``
    does (``shard_receiver``): its shards can only come from rank 0.
    """
    rank = int(os.environ["RANK"])
    cfg = make_cfg(strategy="ddp")
    train(ToyMethod(noise=0.0, init_seed=rank), data_factory, cfg, out / "ddp")
    cfg = make_cfg(strategy="fsdp2")
    with torch.device("meta") if rank else contextlib.nullcontext():
        method = ToyMethod(noise=0.0, init_seed=rank)
    assert method.model.inp.weight.is_meta == (rank == 1)
    assert train(method, data_factory, cfg, out / "fsdp2", max_steps=3).step == 3
    with torch.device("meta") if rank else contextlib.nullcontext():
        method = ToyMethod(noise=0.0, init_seed=99)
    train(method, data_factory, cfg, out / "fsdp2")
    from torch.distributed.tensor import DTensor

    assert isinstance(method.model.inp.weight, DTensor) and isinstance(method.teacher.out.weight, DTensor)
    torch.distributed.destroy_process_group()


def _two_ranks(out: Path) -> subprocess.CompletedProcess:
    for strategy in ("ddp", "fsdp2"):  # a rerun starts from scratch, not from a crashed run's checkpoints
        shutil.rmtree(out / strategy, ignore_errors=True)
    return subprocess.run(torchrun(2, __file__, str(out)), env=worker_env(), capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    train(ToyMethod(noise=0.0), data_factory, make_cfg(), out / "single")
    proc = rerun_if_aborted(_two_ranks(out), lambda: _two_ranks(out), "two-rank gloo run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_rank_gloo_matches_single_process(two_rank_runs, strategy):
    single, ref = final_tensors(two_rank_runs / "single")
    multi, got = final_tensors(two_rank_runs / strategy)
    assert multi["world_size"] == 2 and multi["step"] == 10 and multi["method"]["ema_updates"] == 10
    init = ToyMethod(noise=0.0).model.state_dict()
    assert max((ref[f"model.{k}"] - v).abs().max().item() for k, v in init.items()) > 1e-2  # weights moved
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].shape == got[k].shape, k  # read back whole, unsharded
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=0, atol=1e-5, msg=k)
    if strategy == "fsdp2":  # each rank wrote its own half of every sharded tensor, none gathered
        stored = torch.distributed.checkpoint.FileSystemReader(multi["path"]).read_metadata().storage_data
        halves = {"model.inp.weight": HIDDEN // 2, "optimizer.state.inp.weight.exp_avg": HIDDEN // 2,
                  "method.teacher.out.weight": DIM // 2}  # row offset of rank 1's shard
        for key, half in halves.items():
            chunks = sorted((index.offset[0], info.relative_path) for index, info in stored.items() if index.fqn == key)
            assert chunks == [(0, "__0_0.distcp"), (half, "__1_0.distcp")], (key, chunks)
    single_log, multi_log = read_log(two_rank_runs / "single"), read_log(two_rank_runs / strategy)
    assert [r["loss"] for r in multi_log] == pytest.approx([r["loss"] for r in single_log], abs=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
