"""Per-step schedules, counted in optimizer steps.

Web-DINO inherits DINOv2's ``CosineScheduler``: a linear warmup from ``start_warmup``
to ``base`` (``np.linspace``, so the warmup's last step already reaches ``base``), then a
half cosine from ``base`` to ``final`` over the remaining steps, and ``final`` from
``total_steps`` on. The same shape serves the learning rate (warmup, then decay), the
weight decay (no warmup, cosine *up* from 0.04 to 0.2) and, in the methods, the teacher
momentum. Evaluating it in closed form per step avoids materialising a schedule array of
billions of entries at paper scale while matching DINOv2's array value for value.

Web-MAE and CLIP use this shape too. Their reference warm-ups differ by at most one step of
``W`` (the lr at step ``s < W``: ``base·s/(W-1)`` here, ``base·s/W`` in MAE's ``lr_sched``,
``base·(s+1)/W`` in open_clip), which is negligible at their 80k and 2k warm-up steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """``value(step)`` of DINOv2's ``CosineScheduler(base, final, total, warmup, start_warmup)``."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start_warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.total_steps:
            return self.final
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.start_warmup
            return self.start_warmup + (self.base - self.start_warmup) * step / (self.warmup_steps - 1)
        t = step - self.warmup_steps
        rest = self.total_steps - self.warmup_steps
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * t / rest))
