"""Checkpoints that make a killed run resume bit-for-bit.

Layout, under ``run_dir/checkpoints/`` (a path the Snakemake rule does not declare as an
output, so a failed attempt does not delete it):

* ``latest.pt``: ``torch.save`` of a dict with ``format``, ``step`` (optimizer steps done),
  ``samples_seen``, ``complete``, ``model`` (full state dict, no wrapper prefixes),
  ``method`` (``method.state_dict()``: teacher, centers, ...), ``optimizer`` (full state
  keyed by parameter names, as ``get_optimizer_state_dict`` returns it), ``data``
  (``{"start_sample": n}``), ``rng`` (one entry per rank: python, numpy, torch CPU, CUDA),
  ``world_size`` and ``config``.
* ``latest.json``: a small pointer written after ``latest.pt`` (step, samples, complete) for
  humans and workflow rules that must not unpickle gigabytes.

Both are written to a temporary file in the same directory and ``os.replace``-d, so a kill
during the write leaves the previous checkpoint intact. State is gathered as *full* tensors
(FSDP2 shards are all-gathered, offloaded to CPU and saved by rank 0), which also lets a run
resume under a different strategy or world size.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from webssl_repro.files import atomic_write, write_text

from .distributed import all_gather_object, get_rank, unwrap, unwrapped

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"
POINTER = "latest.json"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dir(run_dir: os.PathLike | str) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def latest_path(run_dir: os.PathLike | str) -> Path:
    return checkpoint_dir(run_dir) / LATEST


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def full_cpu(obj: Any) -> Any:
    """Replace DTensors (FSDP2-sharded weights) by full CPU tensors, other tensors by detached CPU copies.

    ``full_tensor`` is a collective: every rank walks the same structure in the same order.
    """
    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        out = type(obj)((k, full_cpu(v)) for k, v in obj.items()) if isinstance(obj, dict) else {k: full_cpu(v) for k, v in obj.items()}
        if hasattr(obj, "_metadata"):  # nn.Module state dicts carry per-module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_cpu(v) for v in obj)
    return obj


def _state_model(method: Any, strategy: str) -> nn.Module:
    return method.model if strategy == "fsdp2" else unwrap(method.model)


def collect_state(
    method: Any,
    optimizer: torch.optim.Optimizer,
    strategy: str,
    *,
    step: int,
    samples_seen: int,
    complete: bool,
    config: Mapping[str, Any],
) -> Optional[dict[str, Any]]:
    """Gather the checkpoint dict; collective on every rank, returns it on rank 0 only."""
    model = _state_model(method, strategy)
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    with unwrapped(method):
        method_sd = full_cpu(method.state_dict())
    rng = all_gather_object(capture_rng())
    if get_rank() != 0:
        return None
    return {
        "format": FORMAT,
        "step": step,
        "samples_seen": samples_seen,
        "complete": complete,
        "model": model_sd,
        "method": method_sd,
        "optimizer": optim_sd,
        "data": {"start_sample": samples_seen},
        "rng": rng,
        "world_size": len(rng),
        "config": dict(config),
    }


def save_checkpoint(run_dir: os.PathLike | str, state: Mapping[str, Any]) -> Path:
    """Write ``latest.pt`` then the ``latest.json`` pointer, each atomically (rank 0 only)."""
    directory = checkpoint_dir(run_dir)
    path = directory / LATEST
    atomic_write(path, lambda f: torch.save(dict(state), f))
    pointer = {k: state[k] for k in ("step", "samples_seen", "complete", "world_size")}
    pointer["file"] = LATEST
    write_text(directory / POINTER, json.dumps(pointer) + "\n")
    return path


def load_checkpoint(run_dir: os.PathLike | str) -> Optional[dict[str, Any]]:
    """The latest checkpoint as a CPU dict, or None for a fresh run.

    ``mmap=True`` (private, copy-on-write) lets every rank of a node read a multi-GB file
    without each holding a copy in RAM.
    """
    path = latest_path(run_dir)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return state


def read_pointer(run_dir: os.PathLike | str) -> Optional[dict[str, Any]]:
    path = checkpoint_dir(run_dir) / POINTER
    return json.loads(path.read_text()) if path.exists() else None


def restore_before_wrap(method: Any, state: Mapping[str, Any]) -> None:
    """Load method and model weights into the *unwrapped* modules, before DDP/FSDP2.

    Loading full tensors first means FSDP2 later shards them the same way a fresh run
    shards its initial weights, with no strategy-specific loading code.
    """
    method.load_state_dict(state["method"])
    unwrap(method.model).load_state_dict(state["model"])


def restore_optimizer(method: Any, optimizer: torch.optim.Optimizer, strategy: str, state: Mapping[str, Any]) -> None:
    """Load the full optimizer state into the (possibly sharded) optimizer."""
    set_optimizer_state_dict(
        _state_model(method, strategy), optimizer, optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )


def restore_rank_rng(state: Mapping[str, Any], rank: int, world_size: int) -> bool:
    """Restore this rank's RNG streams; False when the world size changed (caller reseeds)."""
    rngs = state.get("rng") or []
    if len(rngs) != world_size:
        return False
    restore_rng(rngs[rank])
    return True
