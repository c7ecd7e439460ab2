"""A toy method for the shared training loop's tests (test_train*.py, test_checkpoint.py): a
tiny denoising autoencoder with an EMA copy, so that they exercise method state, RNG use and
multipliers without depending on Web-DINO / MAE / CLIP."""
from __future__ import annotations

import copy
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn

from webssl_repro.train import TrainConfig, read_checkpoint

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
