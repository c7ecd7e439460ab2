"""The loop's configuration: everything that is the same for Web-DINO, Web-MAE and CLIP.

Budgets are in *images seen*, as in the paper (1B…8B samples), so that a run label maps to
the same amount of data whatever the batch size; the step count is derived from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from webssl_repro.config import check_keys

from .schedules import CosineSchedule

PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedules, checkpointing and distribution of one pretraining run."""

    samples_seen: int  #: total images the run consumes (the paper's budget)
    global_batch_size: int  #: images per optimizer step, summed over ranks
    lr: float  #: peak learning rate, reached at the end of warmup
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.04  #: value at step 0 (DINOv2 increases it)
    weight_decay_end: Optional[float] = None  #: value at the last step; None keeps it constant
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0  #: max global grad norm; 0 disables clipping
    checkpoint_every: int = 1000  #: steps between checkpoints (one is always written at the end)
    log_every: int = 1  #: steps between lines of train_log.jsonl
    #: in a SLURM job, stop (checkpointed) this long before the time limit, over the longest
    #: step and checkpoint save seen (``train.deadline``)
    stop_margin_s: float = 120.0
    seed: int = 0
    precision: str = "fp32"  #: "bf16" autocasts on CUDA only; CPU runs stay fp32
    strategy: str = "none"  #: "none" | "ddp" | "fsdp2"
    #: recompute each transformer block in the backward (models.layers.run_blocks): the same
    #: gradients for about a third more compute, where a rank's batch does not fit in memory
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("samples_seen", "global_batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train config: precision={self.precision!r} is not one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train config: strategy={self.strategy!r} is not one of {STRATEGIES}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"train config: warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")
        if self.grad_clip < 0:
            raise ValueError(f"train config: grad_clip must be >= 0, got {self.grad_clip}")
        if self.stop_margin_s < 0:
            raise ValueError(f"train config: stop_margin_s must be >= 0, got {self.stop_margin_s}")
        if not all(0.0 <= b < 1.0 for b in self.betas):  # AdamW's own error names no key
            raise ValueError(f"train config: betas must be in [0, 1), got {list(self.betas)}")

    @property
    def steps(self) -> int:
        """Optimizer steps: the last batch is full, so the budget is rounded up."""
        return math.ceil(self.samples_seen / self.global_batch_size)

    def lr_schedule(self) -> CosineSchedule:
        return CosineSchedule(self.lr, self.min_lr, self.steps, self.warmup_steps)

    def wd_schedule(self) -> CosineSchedule:
        end = self.weight_decay if self.weight_decay_end is None else self.weight_decay_end
        return CosineSchedule(self.weight_decay, end, self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "TrainConfig":
        """Build from a config mapping (YAML); an unknown key is an error that names it.

        Values are coerced to the field's type because YAML reads ``1e-3`` as a string and
        ``8e9`` as a float.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        check_keys(mapping, fields, "pretrain.train")
        missing = sorted(
            n for n, f in fields.items()
            if f.default is dataclasses.MISSING and n not in mapping
        )
        if missing:
            raise ValueError(f"train config: missing required key(s) {missing}")
        kwargs: dict[str, Any] = {}
        for name, value in mapping.items():
            kwargs[name] = _coerce(name, fields[name].default, value)
        return cls(**kwargs)


_INT_FIELDS = {"samples_seen", "global_batch_size", "warmup_steps", "checkpoint_every", "log_every", "seed"}
_STR_FIELDS = {"precision", "strategy"}
_BOOL_FIELDS = {"activation_checkpointing"}


def _coerce(name: str, default: Any, value: Any) -> Any:
    if name in _STR_FIELDS:
        return str(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"train config: {name} must be true or false, got {value!r} (run-name patterns are "
                             "read by the workflow, which passes each run its own true or false)")
        return value
    if name == "betas":
        betas = tuple(float(b) for b in value)
        if len(betas) != 2:
            raise ValueError(f"train config: betas must have two values, got {value!r}")
        return betas
    if name == "weight_decay_end" and value is None:
        return None
    if name in _INT_FIELDS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = float(value)
        if not number.is_integer():
            raise ValueError(f"train config: {name} must be an integer, got {value!r}")
        return int(number)
    return float(value)
