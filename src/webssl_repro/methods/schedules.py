"""DINO's own schedules, as pure functions of the step so a resumed run gets the same values.

The warm-up + cosine shape is ``train.schedules.CosineSchedule`` (DINOv2's ``CosineScheduler``),
shared with the loop's lr and weight decay; this module adds the teacher temperature and the
batch-size rules for the peak learning rate.
"""
from __future__ import annotations

import math

from webssl_repro.train.schedules import CosineSchedule


def teacher_temp_schedule(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Teacher temperature: linear ``warmup_temp → temp`` over ``warmup_steps``, then constant
    (low temperature early sharpens targets while the prototypes are still uninformative)."""
    if step >= warmup_steps:
        return temp
    return CosineSchedule(temp, temp, warmup_steps, warmup_steps, warmup_temp)(step)


#: learning-rate scaling rules by global batch (``scaled_lr``)
LR_SCALINGS = ("sqrt_wrt_1024", "linear_wrt_256", "none")


def scaled_lr(base_lr: float, batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """Learning rate for a global batch: DINOv2 scales with √(B/1024), MAE linearly with B/256."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(batch_size / 1024)
    if rule == "linear_wrt_256":
        return base_lr * batch_size / 256
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; known: {LR_SCALINGS}")
