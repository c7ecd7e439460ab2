"""A VQA training stage's state, saved and loaded so that a job stopped at its time limit resumes
the stage (``evaluate.progress``) to the weights an uninterrupted job reaches.

The trained parameters and their AdamW state go through ``torch.distributed.checkpoint``: under
FSDP2 each rank writes its own shards of the 8B LM, which are never gathered (a full copy with
AdamW state is ~100 GB of one host's memory). Frozen parameters are not saved: they are the
pretrained LM's, loaded again by every attempt. The rest is the same on every rank and small:
the step, the data order still to be drawn and its generator, the schedule, the loss curve, the
seconds spent, and each rank's RNG (written by rank 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from webssl_repro.train.checkpoint import capture_rng, dcp_load, dcp_save, restore_rank_rng
from webssl_repro.train.distributed import all_gather_object, get_rank, get_world_size, is_main

_TRAINED = StateDictOptions(ignore_frozen_params=True)
#: the saved keys are the trained parameters only; the frozen ones stay as loaded
_INTO_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)
EXTRA = "extra.pt"


def _template(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    out = {"model": get_model_state_dict(module, options=_TRAINED)}
    if optimizer is not None:
        out["optim"] = get_optimizer_state_dict(module, optimizer, options=_TRAINED)
    return out


def save_stage(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None,
               extra: Mapping[str, Any]) -> None:
    """Write the trained parameters (and, unless ``optimizer`` is None, as for a finished stage,
    their AdamW state) and ``extra``; collective over the ranks."""
    dcp_save(_template(module, optimizer), Path(directory))
    rng = all_gather_object(capture_rng())
    if is_main():
        torch.save({**extra, "rng": rng, "with_optimizer": optimizer is not None}, Path(directory) / EXTRA)


def load_stage(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load what ``save_stage`` wrote into ``module`` (its trained parameters as they were
    saved) and ``optimizer``; restore this rank's RNG when the world size is the same. Returns
    ``extra``."""
    extra = torch.load(Path(directory) / EXTRA, map_location="cpu", weights_only=False)
    state = _template(module, optimizer if extra["with_optimizer"] else None)
    dcp_load(state, Path(directory))
    set_model_state_dict(module, state["model"], options=_INTO_TRAINED)
    if "optim" in state:
        set_optimizer_state_dict(module, optimizer, state["optim"], options=_TRAINED)
    restore_rank_rng(extra, get_rank(), get_world_size())
    return extra
