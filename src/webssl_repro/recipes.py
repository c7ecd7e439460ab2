"""Recipe arithmetic that the DAG needs without importing torch."""
from __future__ import annotations

import math
from typing import Any, Mapping

BATCH_KEYS = ("batch_size",)
#: Web-DINO's settings counted in steps, at their DINOv2 ViT-g defaults (DINOv2 epochs of 1250
#: steps: lr warm-up 80, teacher-temperature warm-up 30, prototypes frozen 1); the defaults of
#: ``methods.dino.DinoConfig``, kept here so that the DAG can rescale them without torch.
DINO_STEP_DEFAULTS = {"warmup_steps": 100_000, "warmup_teacher_temp_steps": 37_500, "freeze_last_layer_steps": 1250}
STEP_DEFAULTS = {"dino": DINO_STEP_DEFAULTS}
#: Step counts that a fine-tune keeps as a share of its length.
STEP_KEYS = ("warmup_steps", "warmup_iters", "warmup_teacher_temp_steps", "freeze_last_layer_steps")


def hires_recipe(recipe: Mapping[str, Any], hires: Mapping[str, Any], base_samples: int,
                 step_defaults: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The 224 px recipe with the fine-tune's batch size and lr (paper App. C: 20k steps,
    batch 2048, lr 1.41e-5 = 1e-5·√2); "all other parameters remain exactly the same,
    including the learning rate warmup ratio", so every step-counted setting (lr and
    teacher-temperature warm-ups, the prototype freeze; ``step_defaults`` where the recipe
    leaves one at the method's default) keeps its share of the steps. Kept as absolute
    counts, DINOv2's 37.5k-step temperature warm-up would outlast the 20k-step fine-tune."""
    if "steps" not in hires:
        raise KeyError("pretrain.hires needs 'steps' for a high-resolution fine-tune")
    out = dict(recipe)
    steps = int(hires["steps"])
    base_batch = int(recipe.get("batch_size", hires.get("batch_size", 1)))
    base_steps = max(1, math.ceil(base_samples / base_batch))
    counted = {**(step_defaults or {}), **recipe}
    for key in STEP_KEYS:
        if key in counted:
            out[key] = int(round(steps * int(counted[key]) / base_steps))
    for key, value in hires.items():
        if key != "steps":
            out[key] = value
    return out
