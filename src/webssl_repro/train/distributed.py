"""Process groups and model wrapping with ``torch.distributed`` (DDP, FSDP2).

Ranks come from torchrun's environment only (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): under the Snakemake SLURM executor ``srun`` steps lack
``SLURM_JOB_NUM_NODES``, which is what breaks DINOv2's own launcher, so this module never
reads SLURM variables. gloo serves CPU runs (laptops, CI), nccl GPU runs.

DDP wraps ``method.model`` in a new object, so methods must run their forward through
``self.model(...)`` (calling a submodule directly would skip the gradient all-reduce).
FSDP2's ``fully_shard`` works in place: attributes and submodules stay reachable.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

ShardUnits = Callable[[nn.Module], list[nn.Module]]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(strategy: str = "none") -> DistEnv:
    """Join (or reuse) the process group described by torchrun's environment.

    Without ``WORLD_SIZE`` the run is a single process; a one-rank group is still created
    for ``ddp``/``fsdp2`` so that the wrapped code paths run unchanged on a laptop.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and strategy == "none":
        raise ValueError(f"WORLD_SIZE={world_size} but strategy='none': choose 'ddp' or 'fsdp2'")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
        elif strategy != "none":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of scalars over ranks (one collective for all of them); identity without a group."""
    if not dist.is_initialized() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is set on any rank: a signal may reach only some of them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_TIMM_BLOCK = re.compile(r"(^|\.)blocks\.\d+$")


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """FSDP2 units: items of every ``nn.ModuleList`` plus timm's ``blocks.N`` (an ``nn.Sequential``).

    Only the outermost matches are kept; a unit nested in another one would just add
    all-gathers without saving memory.
    """
    units: list[nn.Module] = []
    chosen: list[str] = []
    lists = {name for name, m in module.named_modules() if isinstance(m, nn.ModuleList)}
    for name, sub in module.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent in lists or _TIMM_BLOCK.search(name):
            units.append(sub)
            chosen.append(name)
    return units


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modules are not wrapped)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def unwrapped(method: Any) -> Iterator[Any]:
    """Temporarily expose the bare model, so that parameter names and state-dict keys carry
    no ``module.`` prefix (name-based param groups and resumable state keep working)."""
    wrapped = method.model
    method.model = unwrap(wrapped)
    try:
        yield method
    finally:
        method.model = wrapped


def shadow_modules(method: Any) -> list[nn.Module]:
    """Optional method hook ``shadow_modules()``: non-optimised copies of ``model`` (an EMA
    teacher). FSDP2 shards them like ``model`` so EMA updates combine matching shards."""
    hook = getattr(method, "shadow_modules", None)
    return list(hook()) if callable(hook) else []


def move_method(method: Any, device: torch.device) -> None:
    """Methods that are ``nn.Module`` move as a whole; otherwise ``model`` and shadows move."""
    if isinstance(method, nn.Module):
        method.to(device)
        return
    method.model.to(device)
    for m in shadow_modules(method):
        m.to(device)


def prepare_model(
    method: Any,
    strategy: str,
    env: DistEnv,
    shard_units: Optional[ShardUnits] = None,
) -> None:
    """Make ``method.model`` data-parallel in place: DDP wrapper or FSDP2 ``fully_shard``.

    Call before building the optimizer: FSDP2 replaces parameters with sharded DTensors.
    """
    if strategy == "none":
        return
    if not dist.is_initialized():
        raise RuntimeError(f"strategy={strategy!r} needs a process group: call init_distributed first")
    if strategy == "ddp":
        _broadcast_shadows(method)
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        method.model = nn.parallel.DistributedDataParallel(method.model, device_ids=device_ids)
        return
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        units = shard_units or transformer_blocks
        for root in [method.model, *shadow_modules(method)]:
            _broadcast_module(root)  # fully_shard keeps each rank's own slice: start from rank 0's
            for unit in units(root):
                fully_shard(unit, mesh=mesh)
            fully_shard(root, mesh=mesh)
        return
    raise ValueError(f"unknown strategy {strategy!r}")


def reshard_shadows(method: Any) -> None:
    """Free the all-gathered weights of FSDP2 shadow modules after their forward.

    A teacher runs forward only, so the post-backward reshard that frees the student's root
    never comes; DINOv2 likewise reshards its teacher explicitly. It also puts the teacher
    back into DTensor form, which the EMA update needs to pair it with the student's shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for root in shadow_modules(method):
        for m in root.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _broadcast_module(module: nn.Module) -> None:
    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def _broadcast_shadows(method: Any) -> None:
    for m in shadow_modules(method):
        _broadcast_module(m)
