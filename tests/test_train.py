"""The shared training loop on one process, against the toy method of helpers_toy.py:
schedules, logs, kill / preemption / deadline and resume (two ranks: test_train_distributed.py)."""
from __future__ import annotations

import math
import signal
import subprocess
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers_toy import GLOBAL_BATCH, Killed, Net, ToyMethod, assert_bitwise, data_factory, final_tensors, make_cfg
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


def test_dino_heads_are_fsdp_units_and_a_weight_norm_is_not():
    """A weight norm's ``parametrizations`` (a ModuleList) held parameter-less units, while the
    heads, ~57M parameters each at paper scale, stayed in the root unit, unsharded."""
    import timm

    from webssl_repro.methods.dino_heads import DINOHead, DinoModel

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    model = DinoModel(vit, DINOHead(192, 16, 32, 8), DINOHead(192, 16, 32, 8))
    units = transformer_blocks(model)
    assert units == [*vit.blocks, model.dino_head, model.ibot_head]
    assert all(sum(p.numel() for p in u.parameters()) > 0 for u in units)


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


def test_checkpoints_record_the_commits_that_trained_them(tmp_path, monkeypatch):
    """A run resumed at another commit lists both, each from the step it took over; resuming a
    finished run (a forced rerun of the rule re-exports it) trains nothing and adds none, so the
    run's provenance names the code that trained its weights, not the export's."""
    from webssl_repro.train import loop

    cfg, run = make_cfg(), tmp_path / "run"
    monkeypatch.setattr(loop, "code_version", lambda: "aaa")
    assert train(ToyMethod(), data_factory, cfg, run, max_steps=4).trained_by == [{"commit": "aaa", "from_step": 0}]
    monkeypatch.setattr(loop, "code_version", lambda: "bbb (with uncommitted changes)")
    both = [{"commit": "aaa", "from_step": 0}, {"commit": "bbb (with uncommitted changes)", "from_step": 4}]
    assert train(ToyMethod(), data_factory, cfg, run).trained_by == both
    monkeypatch.setattr(loop, "code_version", lambda: "ccc")
    again = train(ToyMethod(), data_factory, cfg, run)
    assert again.complete and again.step == 10 and again.trained_by == both


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_finishes_step_checkpoints_and_resumes(tmp_path, signum):
    cfg = make_cfg(checkpoint_every=100)
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "preempted"
    before = signal.getsignal(signum)
    with pytest.raises(Preempted) as info:
        train(ToyMethod(signal_at=4, signum=signum), data_factory, cfg, run)
    assert info.value.exit_code == 75 and info.value.step == 5 and info.value.signum == signum
    assert info.value.cause == "signal"  # what the ledger records: `launch` requeues only time limits
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
    assert "time limit (15 s left)" in str(info.value) and info.value.cause == "time limit"
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




def test_a_log_line_cut_short_does_not_stop_the_resume(tmp_path, capsys):
    """A node lost mid-append leaves half a record at the end of train_log.jsonl: the resumed run
    skips it (naming the file and line), rewrites the log and ends as an uninterrupted run."""
    cfg = make_cfg(checkpoint_every=2)
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "cut"
    assert not train(ToyMethod(), data_factory, cfg, run, max_steps=4).complete
    with open(run / "train_log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')
    assert train(ToyMethod(), data_factory, cfg, run).complete
    assert "train_log.jsonl:5: not a JSON record, skipped" in capsys.readouterr().err
    assert [r["step"] for r in read_log(run)] == list(range(1, 11))
    assert_bitwise(tmp_path / "straight", run)
