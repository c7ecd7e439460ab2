"""Schedules as pure functions of the step, so a resumed run gets exactly the same values.

Same values as DINOv2's ``CosineScheduler`` (which precomputes an array): ``freeze_steps``
zeros, then a linear warm-up ``start → base`` whose last value is ``base`` (``np.linspace``
includes both ends), then a half cosine ``base → final``; ``final`` from ``total_steps`` on.
"""
from __future__ import annotations

import math


def cosine_schedule(step: int, base: float, final: float, total_steps: int,
                    warmup_steps: int = 0, start_warmup: float = 0.0,
                    freeze_steps: int = 0) -> float:
    """Value at ``step`` (0-based) of the DINOv2 warm-up + cosine schedule."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return final
    if step < freeze_steps:
        return 0.0
    step -= freeze_steps
    if step < warmup_steps:
        if warmup_steps == 1:
            return base
        return start_warmup + (base - start_warmup) * step / (warmup_steps - 1)
    step -= warmup_steps
    cosine_steps = total_steps - warmup_steps - freeze_steps
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / cosine_steps))


def teacher_temp_schedule(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Teacher temperature: linear ``warmup_temp → temp`` over ``warmup_steps``, then constant
    (low temperature early sharpens targets while the prototypes are still uninformative)."""
    if step >= warmup_steps:
        return temp
    return cosine_schedule(step, temp, temp, warmup_steps, warmup_steps, warmup_temp)


def scaled_lr(base_lr: float, batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """Learning rate for a global batch: DINOv2 scales with √(B/1024), MAE linearly with B/256."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(batch_size / 1024)
    if rule == "linear_wrt_256":
        return base_lr * batch_size / 256
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")
