"""Recipe arithmetic that the DAG needs without importing torch."""
from __future__ import annotations

import math
from typing import Any, Mapping

BATCH_KEYS = ("batch_size",)
WARMUP_KEYS = ("warmup_steps", "warmup_iters")


def hires_recipe(recipe: Mapping[str, Any], hires: Mapping[str, Any], base_samples: int) -> dict[str, Any]:
    """The 224 px recipe with the fine-tune's batch size and lr (paper App. C: 20k steps,
    batch 2048, lr 1.41e-5 = 1e-5·√2); "all other parameters remain exactly the same,
    including the learning rate warmup ratio", so warm-up keeps its share of the steps."""
    if "steps" not in hires:
        raise KeyError("pretrain.hires needs 'steps' for a high-resolution fine-tune")
    out = dict(recipe)
    steps = int(hires["steps"])
    base_batch = int(recipe.get("batch_size", hires.get("batch_size", 1)))
    base_steps = max(1, math.ceil(base_samples / base_batch))
    for key in WARMUP_KEYS:
        if key in recipe:
            out[key] = int(round(steps * int(recipe[key]) / base_steps))
    for key, value in hires.items():
        if key != "steps":
            out[key] = value
    return out
