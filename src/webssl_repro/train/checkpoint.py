"""Checkpoints that make a killed run resume bit-for-bit, written shard by shard.

Layout, under ``run_dir/checkpoints/`` (a path the Snakemake rule does not declare as an
output, so a failed attempt does not delete it):

* ``step-<n>/``: one save after ``n`` optimizer steps. ``torch.distributed.checkpoint`` (DCP)
  writes ``model`` (the student's state dict, no wrapper prefixes), ``optimizer`` (keyed by
  parameter names, as ``get_optimizer_state_dict`` returns it) and ``method`` (the method's
  other tensors: teacher, centers, ...); under FSDP2 every rank writes its own shards and
  nothing is gathered (a 7B Web-DINO save is ~105 GB in fp32: student, teacher, two AdamW moments).
  ``meta.pt`` (rank 0) holds ``format``, ``step``, ``samples_seen``, ``complete``, ``data``
  (``{"start_sample": n}``), ``rng`` (one entry per rank), ``world_size``, ``config``,
  ``with_optimizer`` (False before the first step) and ``method_rest`` (the method state's
  non-tensor values).
* ``latest.json``: the pointer (step, samples_seen, complete, world_size, dir), moved once the
  new directory is complete; then the older saves are removed. A kill at any point leaves the
  previous save whole and pointed to.

DCP reshards on load, so a run also resumes under another world size or strategy. Format 1
(``latest.pt``: one ``torch.save`` of full tensors gathered on rank 0) is still read, and the
next save replaces it.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from webssl_repro.files import atomic_write, fsync_dir, read_json, write_json
from webssl_repro.settings import merge_nested

from .distributed import all_gather_object, barrier, is_main, unwrap, unwrapped

FORMAT = 2
CHECKPOINT_DIR = "checkpoints"
POINTER = "latest.json"
META = "meta.pt"
STEP_PREFIX = "step-"
LEGACY = "latest.pt"  # format 1

#: full tensors, materialised on rank 0 only (the others get empty dicts)
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dir(run_dir: os.PathLike | str) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


# ------------------------------------------------------------------------------- RNG


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


def restore_rank_rng(state: Mapping[str, Any], rank: int, world_size: int) -> bool:
    """Restore this rank's RNG streams; False when the world size changed (caller reseeds)."""
    rngs = state.get("rng") or []
    if len(rngs) != world_size:
        return False
    restore_rng(rngs[rank])
    return True


# ------------------------------------------------------------------------------- DCP


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every call without a process group, even when told (``no_dist``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def dcp_save(state: Mapping[str, Any], directory: Path) -> None:
    """Each rank writes its shards of ``state`` (replicated tensors once); collective."""
    with _quiet():
        dcp.save(dict(state), checkpoint_id=directory, no_dist=_no_dist())


def unreadable(path: Path, err: BaseException) -> ValueError:
    """A save that cannot be read, named, with what to do: it is the only one kept (each new
    save replaces the last), so the job cannot fall back to an older one; its folder's pointer
    names it, so the folder goes aside whole."""
    cause = (str(err).strip().splitlines() or [""])[-1]  # DCP's message carries each rank's traceback
    return ValueError(f"{path}: a saved checkpoint that cannot be read ({type(err).__name__}: {cause}); it is the "
                      f"only one kept: move {path.parent} aside (its pointer names this save) to start this job "
                      "afresh")


def dcp_load(state: dict[str, Any], directory: Path) -> None:
    """Fill ``state`` (a template of the saved keys: tensors are loaded in place, resharded to
    their current layout; other values are replaced); collective."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, checkpoint_id=directory, no_dist=_no_dist())
    except (CheckpointException, EOFError, OSError) as err:  # a shard cut short or gone
        raise unreadable(directory, err) from err


def save_version(root: Path, name: str, write: Callable[[Path], None], pointer: Path,
                 record: Mapping[str, Any], family: str) -> None:
    """Write a new version ``root/name`` of a state and point to it; collective.

    ``write(directory)`` runs on every rank into an empty temporary directory, which rank 0
    renames to ``name`` once all ranks are done; then ``pointer`` gets ``record`` plus
    ``{"dir": name}``, and the other directories matching the regex ``family`` (with their
    temporaries, ``.<name>.tmp``) are removed. A kill at any point leaves the pointer on a
    complete directory.
    """
    tmp = root / f".{name}.tmp"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        remove_versions(root, family, temporary=True)  # a save killed half-way left its own
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_main():
        shutil.rmtree(root / name, ignore_errors=True)
        fsync_dir(tmp)  # the files' entries, then the rename, before the pointer names them
        tmp.rename(root / name)
        fsync_dir(root)
        write_json(pointer, {**record, "dir": name})
        fsync_dir(root)  # the new pointer, before the version the old one names is removed
        remove_versions(root, family, keep=name)
    barrier()


def remove_versions(root: Path, family: str, keep: Optional[str] = None, temporary: bool = False) -> None:
    """Remove the directories of ``root`` whose names match ``family`` (but ``keep``), or with
    ``temporary`` the unfinished ones (``.<name>.tmp``)."""
    pattern = re.compile(rf"\.(?:{family})\.tmp" if temporary else family)
    for path in root.iterdir():
        if path.is_dir() and pattern.fullmatch(path.name) and path.name != keep:
            shutil.rmtree(path)


# ------------------------------------------------------------------------------- save


def _state_model(method: Any, strategy: str) -> nn.Module:
    return method.model if strategy == "fsdp2" else unwrap(method.model)


def _method_state(method: Any) -> dict[str, Any]:
    """``method.state_dict()`` without the student, which the checkpoint holds once as ``model``
    (an ``nn.Module`` method's own state dict repeats it under ``model.``)."""
    with unwrapped(method):
        state = method.state_dict()
    if isinstance(method, nn.Module):
        state = {k: v for k, v in state.items() if not k.startswith("model.")}
    return state


def _split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, the rest) of a nested dict. DCP stores and loads tensors key by key, strictly;
    other values (counters, a method's config) go to ``meta.pt`` whole, so that a config field
    added by a later version does not make the saved state unloadable."""
    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, Mapping):
            t, r = _split(value)
            if t:
                tensors[key] = t
            if r:
                rest[key] = r
        else:
            rest[key] = value
    return tensors, rest


def _sharded_state(method: Any, optimizer: Optional[torch.optim.Optimizer], strategy: str
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the DCP part of a checkpoint as this rank holds it, FSDP2 ones as DTensor shards; the
    method's non-tensor state). ``optimizer`` None: without the optimizer."""
    model = _state_model(method, strategy)
    tensors, rest = _split(_method_state(method))
    state = {"model": get_model_state_dict(model), "method": tensors}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state, rest


def save_checkpoint(run_dir: os.PathLike | str, method: Any, optimizer: torch.optim.Optimizer, strategy: str, *,
                    step: int, samples_seen: int, complete: bool, config: Mapping[str, Any],
                    trained_by: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write ``step-<step>/`` and move the pointer to it; collective over the ranks.
    ``trained_by``: the commits that trained the weights so far (``loop.TrainResult``)."""
    root = checkpoint_dir(run_dir)
    name = f"{STEP_PREFIX}{step}"
    rng = all_gather_object(capture_rng())
    # Before the first step the optimizer has no state, and asking for its state dict would make
    # one (an lr=0 step that counts): saving none keeps a resumed step 1 Adam's first step.
    with_optimizer = bool(optimizer.state)
    state, method_rest = _sharded_state(method, optimizer if with_optimizer else None, strategy)
    meta = {"format": FORMAT, "step": step, "samples_seen": samples_seen, "complete": complete,
            "data": {"start_sample": samples_seen}, "rng": rng, "world_size": len(rng), "config": dict(config),
            "with_optimizer": with_optimizer, "method_rest": method_rest, "trained_by": [dict(c) for c in trained_by]}

    def write(directory: Path) -> None:
        dcp_save(state, directory)
        if is_main():
            atomic_write(directory / META, lambda f: torch.save(meta, f))

    record = {k: meta[k] for k in ("step", "samples_seen", "complete", "world_size")}
    save_version(root, name, write, root / POINTER, record, family=rf"{STEP_PREFIX}\d+")
    if is_main():
        (root / LEGACY).unlink(missing_ok=True)  # a format-1 save this one replaces
    return root / name


# ------------------------------------------------------------------------------- load


def read_pointer(run_dir: os.PathLike | str) -> Optional[dict[str, Any]]:
    path = checkpoint_dir(run_dir) / POINTER
    return read_json(path) if path.exists() else None


def latest_path(run_dir: os.PathLike | str) -> Optional[Path]:
    """The latest save (a ``step-<n>`` directory, or a format-1 ``latest.pt``), or None."""
    root = checkpoint_dir(run_dir)
    pointer = read_pointer(run_dir)
    if pointer is not None and "dir" in pointer:
        return root / pointer["dir"]
    return root / LEGACY if (root / LEGACY).exists() else None


def load_meta(run_dir: os.PathLike | str) -> Optional[dict[str, Any]]:
    """The latest checkpoint's metadata (``meta.pt``, plus ``path``), or None for a fresh run.

    A format-1 ``latest.pt`` is returned whole: it also holds the weights, as full tensors
    (``mmap``: the ranks of a node share one copy in the page cache).
    """
    path = latest_path(run_dir)
    if path is None:
        return None
    try:
        meta = torch.load(path / META if path.is_dir() else path, map_location="cpu", mmap=not path.is_dir(),
                          weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # cut short, or gone
        raise unreadable(path, err) from err
    if meta.get("format") not in (1, FORMAT):
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, expected 1 or {FORMAT}")
    return {**meta, "path": path}


def restore_before_wrap(method: Any, meta: Mapping[str, Any]) -> None:
    """Format 1 only: load the full method and model weights into the *unwrapped* modules,
    before DDP / FSDP2 shard them as they would a fresh run's initial weights (not on an FSDP2
    rank built without storage: it receives rank 0's)."""
    if meta["format"] == 1 and not any(p.is_meta for p in unwrap(method.model).parameters()):
        method.load_state_dict(meta["method"])
        unwrap(method.model).load_state_dict(meta["model"])


def restore_after_wrap(method: Any, optimizer: torch.optim.Optimizer, strategy: str, meta: Mapping[str, Any]) -> None:
    """Load the weights, the method's state and the optimizer into their current (possibly
    sharded) layout; collective."""
    model = _state_model(method, strategy)
    if meta["format"] == 1:
        # A parameter that never had a gradient has no saved state: load not strictly only then,
        # and drop the state the load's fresh init gave it, as ``_drop_unsaved_optimizer_state``.
        unsaved = [p for n, p in unwrap(model).named_parameters()
                   if p.requires_grad and n not in meta["optimizer"]["state"]]
        set_optimizer_state_dict(model, optimizer, optim_state_dict=meta["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=not unsaved))
        for p in unsaved:
            optimizer.state.pop(p, None)
        return
    state, _ = _sharded_state(method, optimizer if meta["with_optimizer"] else None, strategy)
    partial = meta["with_optimizer"] and _drop_unsaved_optimizer_state(state, meta["path"])
    dcp_load(state, meta["path"])  # strict: a tensor missing from the save fails here
    set_model_state_dict(model, state["model"])
    if meta["with_optimizer"]:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(strict=not partial))
    method_state = merge_nested(state["method"], meta["method_rest"])
    with unwrapped(method):
        if isinstance(method, nn.Module):  # its ``model.`` keys came in as ``model`` above
            method.load_state_dict(method_state, strict=False)
        else:
            method.load_state_dict(method_state)


def _drop_unsaved_optimizer_state(state: dict[str, Any], path: Path) -> bool:
    """Drop from ``state`` the optimizer state of the parameters that had none when ``path`` was
    saved (one that never had a gradient: AdamW makes state at a parameter's first), so that
    the strict load does not ask for it; whether there were any. Asking a fresh optimizer for
    its state dict gave every parameter some (``_init_optim_state``'s lr=0 step), which
    loading the saved state replaces: the resumed run has none for them, as the straight one."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    has_state = {key.split(".", 2)[2].rsplit(".", 1)[0] for key in saved if key.startswith("optimizer.state.")}
    unsaved = [fqn for fqn in state["optimizer"]["state"] if fqn not in has_state]
    for fqn in unsaved:
        del state["optimizer"]["state"][fqn]
    return bool(unsaved)


def read_checkpoint(run_dir: os.PathLike | str) -> Optional[dict[str, Any]]:
    """The latest checkpoint whole, as full CPU tensors in this process (for inspection and
    tests, not for a 7B run): the metadata plus ``model``, ``optimizer`` and ``method``."""
    # What the public dcp_to_torch_save runs, without writing the result to a file: the saved
    # structure is rebuilt from the checkpoint's own metadata.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = load_meta(run_dir)
    if meta is None or meta["format"] == 1:
        return meta
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(meta["path"]),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    state["method"] = merge_nested(state.get("method", {}), meta.pop("method_rest"))
    return {**meta, **state}


def full_state_on_rank0(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as full CPU tensors on rank 0 (FSDP2 shards gathered one by one),
    empty on the other ranks; collective."""
    return get_model_state_dict(module, options=FULL_ON_RANK0)
