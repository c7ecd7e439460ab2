"""Recipe arithmetic that the DAG needs without importing torch."""
from __future__ import annotations

import math
from typing import Any, Mapping

from webssl_repro.config import ConfigError

#: Web-DINO's settings counted in steps, at their DINOv2 ViT-g defaults (DINOv2 epochs of 1250
#: steps: lr warm-up 80, teacher-temperature warm-up 30, prototypes frozen 1); the defaults of
#: ``methods.dino.DinoConfig``, kept here so that the DAG can rescale them without torch.
DINO_STEP_DEFAULTS = {"warmup_steps": 100_000, "warmup_teacher_temp_steps": 37_500, "freeze_last_layer_steps": 1250}
STEP_DEFAULTS = {"dino": DINO_STEP_DEFAULTS}
#: Web-DINO's uniform stochastic depth (DINOv2 ViT-g), ``methods.dino.DinoConfig``'s default.
DINO_DROP_PATH_RATE = 0.4
#: DINOv2 switches from per-sample DropPath to subset stochastic depth above this rate: a branch
#: then runs on (1 - rate) of the batch (``models.layers.subset_residual``).
SUBSET_DROP_ABOVE = 0.1
#: Step counts that a fine-tune keeps as a share of its length.
STEP_KEYS = ("warmup_steps", "warmup_iters", "warmup_teacher_temp_steps", "freeze_last_layer_steps")
#: Per method, the batch size and the warm-ups (lr; DINO's teacher temperature, from
#: ``warmup_teacher_temp`` to ``teacher_temp``) that must end before the run does
#: (``workflow.check_schedule``), at the defaults of ``methods.{dino,mae,clip}``'s configs
#: (tests/test_workflow.py keeps them equal), for recipes that leave them unset.
SCHEDULE_DEFAULTS = {
    "dino": {"batch_size": 3072, "warmup_steps": DINO_STEP_DEFAULTS["warmup_steps"],
             "warmup_teacher_temp_steps": DINO_STEP_DEFAULTS["warmup_teacher_temp_steps"],
             "warmup_teacher_temp": 0.04, "teacher_temp": 0.07},
    "mae": {"batch_size": 4096, "warmup_iters": 80_000},
    "clip": {"batch_size": 32768, "warmup_iters": 2000},
}


def run_steps(samples_seen: int, batch_size: int) -> int:
    """A run's optimizer steps: its samples over its global batch, the last one partial
    (``train.run.build``'s count)."""
    return math.ceil(int(samples_seen) / int(batch_size))


def hires_recipe(recipe: Mapping[str, Any], steps: int, over: Mapping[str, Any], base_samples: int,
                 step_defaults: Mapping[str, int] | None = None, base_batch: int | None = None) -> dict[str, Any]:
    """The 224 px recipe for ``steps`` with the fine-tune's own keys ``over`` laid on it (paper
    App. C, Web-DINO: 20k steps, batch 2048, lr 1.41e-5 = 1e-5·√2); "all other parameters remain
    exactly the same, including the learning rate warmup ratio", so every step-counted setting
    (lr and teacher-temperature warm-ups, the prototype freeze; ``step_defaults`` where the recipe
    leaves one at the method's default) keeps its share of the parent's steps (its samples over
    its batch: the recipe's, else ``base_batch``, the method's default). Kept as absolute
    counts, DINOv2's 37.5k-step temperature warm-up would outlast the 20k-step fine-tune.
    The fine-tune is a run of its own, so every schedule starts again from its first value over
    the 20k steps: where the 8B-seen parent ended at teacher momentum 1.0, weight decay 0.2 and
    teacher temperature 0.07, it starts at 0.994, 0.04 and a 0.04 -> 0.07 warm-up, with its
    prototypes frozen for their share of steps. App. C names no schedule that continues, and no
    released code shows DINOv2's own high-resolution phase."""
    out = dict(recipe)
    if "batch_size" not in recipe and base_batch is None:
        raise KeyError("hires_recipe: the parent's batch size is neither in its recipe nor given (base_batch)")
    base_steps = max(1, run_steps(base_samples, int(recipe.get("batch_size", base_batch))))
    counted = {**(step_defaults or {}), **recipe}
    for key in STEP_KEYS:
        if key in counted:
            out[key] = int(round(steps * int(counted[key]) / base_steps))
    out.update(over)
    return out


def check_schedule(run_config: Mapping[str, Any], method: str, origin: Mapping[str, str] | None = None) -> None:
    """Refuse a run whose lr warm-up (``warmup_steps`` / ``warmup_iters``, or
    ``pretrain.train.warmup_steps``, which replaces it) or DINO teacher-temperature warm-up
    is not shorter than the run (``ceil(samples_seen / batch_size)`` steps): its lr would
    never reach its peak, its cosine decay never start, its teacher never sharpen. A flat
    temperature "warm-up" (``warmup_teacher_temp == teacher_temp``, mini) has no length to
    check. ``origin`` names the config key each recipe value came from (``Plan.run_config``);
    a value it lacks is the method's default."""
    defaults = SCHEDULE_DEFAULTS[method]
    recipe = run_config["recipe"]
    origin = origin or {}
    samples = int(run_config["samples_seen"])
    batch = int(recipe.get("batch_size", defaults.get("batch_size", 1)))
    steps = run_steps(samples, batch)
    lr_key = "warmup_steps" if "warmup_steps" in defaults else "warmup_iters"
    keys = [lr_key]
    if "warmup_teacher_temp_steps" in defaults and (float(recipe.get("warmup_teacher_temp", defaults["warmup_teacher_temp"]))
                                                    != float(recipe.get("teacher_temp", defaults["teacher_temp"]))):
        keys.append("warmup_teacher_temp_steps")
    checked = {k: (k, recipe.get(k, defaults[k]), origin.get(k, f"pretrain.{method}.{k} (unset: the default)"))
               for k in keys}
    if "warmup_steps" in run_config.get("train", {}):  # the loop's warm-up replaces the recipe's (checked last)
        checked.pop(lr_key)
        checked[lr_key] = ("warmup_steps", run_config["train"]["warmup_steps"], "pretrain.train.warmup_steps")
    for key, value, where in checked.values():
        if int(value) >= steps:
            hint = (f"; pretrain.in1k.{method} sets the ImageNet-1k runs' own"
                    if "-in1k-" in str(run_config["run"]) and "pretrain.in1k" not in where else "")
            raise ConfigError(f"{where}: {int(value)} is not shorter than run {run_config['run']}, {steps:,} "
                              f"steps (ceil({samples:,} samples / batch {batch:,})): its {key} would outlast "
                              f"the run{hint}")


def mae_kept(length: int, mask_ratio: float) -> int:
    """Tokens MAE's encoder keeps of ``length``: round(L·(1−ratio)), at least one. That equals
    MAE's ``int()`` whenever L·(1−ratio) is integral (every paper setting) but is immune to float
    truncation such as 20·(1−0.55) = 8.999…."""
    return max(1, int(round(length * (1.0 - mask_ratio))))


def check_shapes(run_config: Mapping[str, Any], method: str, world_size: int,
                 origin: Mapping[str, str] | None = None) -> None:
    """Refuse, at the dry run, a run that its job would refuse once granted its nodes: a global
    batch that does not split over its GPUs (``train.loop``), an image size that is not a whole
    number of patches (timm's patch embedding), or an MAE mask ratio that masks no patch (its
    loss, a mean over the masked ones, would be 0/0)."""
    run, recipe, origin = run_config["run"], run_config["recipe"], origin or {}
    batch = int(recipe.get("batch_size", SCHEDULE_DEFAULTS[method].get("batch_size", 1)))
    if world_size > 1 and batch % world_size:
        where = origin.get("batch_size", f"pretrain.{method}.batch_size (unset: the default)")
        raise ConfigError(f"{where}: {batch:,} images per step do not split over the {world_size} GPUs of run {run} "
                          "(resources.nodes of its size × resources.gpus_per_node)")
    for key in ("global_crops_scale", "local_crops_scale", "crop_scale"):  # RandomResizedCrop's area range
        if key in recipe:
            lo, hi = (float(v) for v in recipe[key])
            if not 0 < lo <= hi <= 1:
                where = origin.get(key, f"pretrain.{method}.{key}")
                raise ConfigError(f"{where}: {list(recipe[key])} (run {run}) is not an area range [min, max] with "
                                  "0 < min <= max <= 1")
    img, patch = int(run_config["img_size"]), int(run_config["arch"]["patch"])
    if img % patch:
        raise ConfigError(f"labels.resolutions: {img} px (run {run}) is not a whole number of its "
                          f"{patch} px patches (labels.sizes.*.{'mae.patch or ' * (method == 'mae')}patch)")
    patches = (img // patch) ** 2
    if method == "mae" and "mask_ratio" in recipe and mae_kept(patches, float(recipe["mask_ratio"])) >= patches:
        where = origin.get("mask_ratio", "pretrain.mae.mask_ratio")
        raise ConfigError(f"{where}: {recipe['mask_ratio']} masks none of the {patches} patches of run {run}")
