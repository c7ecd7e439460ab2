"""The contract between the one training loop and a pretraining method.

DINOv2 separates the meta-architecture (what is trained, how the loss is formed) from
the loop (optimisation, schedules, checkpoints, distribution). A method object owns
its modules and its loss; the loop owns everything that is the same for all methods.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PretrainMethod(Protocol):
    """What ``webssl_repro.train`` needs from Web-DINO, Web-MAE and CLIP."""

    #: the module whose parameters the optimiser updates (student / encoder+decoder / both towers)
    model: nn.Module

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; each may carry ``lr_multiplier`` / ``wd_multiplier``."""

    def training_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Forward + loss for one batch. Must return ``{"loss": scalar, ...terms}``."""

    def after_optimizer_step(self, step: int) -> None:
        """Post-step hooks (EMA teacher update, temperature clamp, ...)."""

    def encoder(self) -> nn.Module:
        """The vision encoder that evaluations use (the EMA teacher's backbone for DINO)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume besides the optimiser (teacher, centers, ...)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    # Optional hooks, looked up with getattr: ``shadow_modules()`` lists non-optimised copies
    # of ``model`` that the loop broadcasts / shards alongside it (an EMA teacher);
    # ``clip_groups()`` splits the optimised parameters into groups whose gradient norms are
    # clipped each on its own (DINOv2: backbone, DINO head, iBOT head); without it, one group.


class ModelOnlyState:
    """For methods whose only state is ``model``, which the loop checkpoints itself (MAE, CLIP).

    ``bare_model`` sees through the loop's DDP wrapper (FSDP2 shards in place and needs none).
    """

    model: nn.Module
    config: Any

    def bare_model(self) -> nn.Module:
        from webssl_repro.train.distributed import unwrap

        return unwrap(self.model)

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        """timm's ``param_groups_weight_decay`` rule, as MAE uses it: 1-D parameters and biases."""
        return p.ndim <= 1 or name.endswith(".bias")

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Two groups, with and without weight decay (``no_decay``). Frozen tensors (MAE's
        sin-cos ``pos_embed``) are left out of the optimiser altogether."""
        decay, exempt = [], []
        for name, p in self.bare_model().named_parameters():
            if p.requires_grad:
                (exempt if self.no_decay(name, p) else decay).append(p)
        return [
            {"params": decay, "lr": base_lr, "weight_decay": weight_decay, "lr_multiplier": 1.0, "wd_multiplier": 1.0},
            {"params": exempt, "lr": base_lr, "weight_decay": 0.0, "lr_multiplier": 1.0, "wd_multiplier": 0.0},
        ]

    def state_dict(self) -> dict[str, Any]:
        """The config, for provenance; the weights are the loop's ``model`` entry."""
        return {"config": dataclasses.asdict(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuses a checkpoint of another recipe (a changed mask ratio or temperature would
        resume silently otherwise; the workflow's fingerprint guards its runs, this the API's)."""
        saved, current = state.get("config"), dataclasses.asdict(self.config)
        if saved is not None:
            changed = sorted(k for k in set(saved) & set(current)  # a field added since keeps its default
                             if _plain(saved[k]) != _plain(current[k]))
            if changed:
                detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                raise ValueError(f"cannot resume: the checkpoint's {type(self).__name__} was built with another "
                                 f"config ({detail})")
        if "model" in state:  # also accept a self-contained {"model": ...} dict
            self.bare_model().load_state_dict(state["model"])


def _plain(value: Any) -> Any:
    """A config value as saved and as built compare alike (a tuple may come back a list)."""
    return list(value) if isinstance(value, tuple) else value
