"""Process groups and model wrapping with ``torch.distributed`` (DDP, FSDP2).

Ranks come from torchrun's environment only (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): under the Snakemake SLURM executor ``srun`` steps lack
``SLURM_JOB_NUM_NODES``, which is what breaks DINOv2's own launcher, so this module never
reads SLURM variables. gloo serves CPU runs (laptops, CI), nccl GPU runs.

DDP wraps ``method.model`` in a new object, so methods must run their forward through
``self.model(...)`` (calling a submodule directly would skip the gradient all-reduce).
FSDP2's ``fully_shard`` works in place: attributes and submodules stay reachable. Under FSDP2
the ranks other than 0 may build the method on the meta device (``shard_receiver``): sharding
gives them rank 0's values.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

ShardUnits = Callable[[nn.Module], list[nn.Module]]

#: How long a rank waits in a collective. NCCL's default (10 min) is shorter than what rank 0
#: alone may take before the first one under FSDP2: building a ViT-7B student and teacher on
#: the host and, for a hi-res fine-tune, reading its parent's state (``shard_receiver``).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


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
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=COLLECTIVE_TIMEOUT)
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
    """FSDP2 units: items of every ``nn.ModuleList`` plus timm's ``blocks.N`` (an ``nn.Sequential``),
    and modules whose class sets ``fsdp_unit`` (DINO's heads, each its own unit as DINOv2 wraps
    them: ~57M parameters each at paper scale, which the root unit would hold unsharded).

    Only the outermost matches are kept; a unit nested in another one would just add
    all-gathers without saving memory. A weight norm's ``parametrizations`` list (a ModuleList
    of parameter-less modules) is no list of blocks.
    """
    from torch.nn.utils.parametrize import ParametrizationList

    units: list[nn.Module] = []
    chosen: list[str] = []
    lists = {name for name, m in module.named_modules()
             if isinstance(m, nn.ModuleList) and not isinstance(m, ParametrizationList)}
    for name, sub in module.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent in lists or _TIMM_BLOCK.search(name) or getattr(sub, "fsdp_unit", False):
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


def shard_receiver(strategy: str) -> Optional[str]:
    """"meta" on the ranks of a multi-rank FSDP2 run other than 0: they build the method without
    storage and receive their shards of rank 0's values (``prepare_model``); else None. Read
    from torchrun's environment, before the process group exists."""
    receives = strategy == "fsdp2" and int(os.environ.get("WORLD_SIZE", 1)) > 1 and int(os.environ.get("RANK", 0)) != 0
    return "meta" if receives else None


def _method_modules(method: Any) -> list[nn.Module]:
    """The modules holding the method's tensors: itself if it is one, else model and shadows."""
    return [method] if isinstance(method, nn.Module) else [method.model, *shadow_modules(method)]


def _named_buffers(method: Any) -> list[tuple[str, torch.Tensor]]:
    return [(f"{i}.{name}", b) for i, m in enumerate(_method_modules(method)) for name, b in m.named_buffers()]


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
        _shard(method, env, shard_units or transformer_blocks)
        return
    raise ValueError(f"unknown strategy {strategy!r}")


def _shard(method: Any, env: DistEnv, units: ShardUnits) -> None:
    """FSDP2: shard ``model`` and its shadows, then give every rank its shards of rank 0's values.

    Rank 0 alone holds the whole method, on the host (``shard_receiver``: the other ranks may
    hold meta tensors). The modules are sharded as they are, given storage on the device
    (``to_empty``, on every rank alike), and filled by broadcast from rank 0 tensor by tensor:
    no rank holds the whole model on its GPU, and no node more than one copy in memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    roots = [method.model, *shadow_modules(method)]
    in_roots = {id(p) for root in roots for p in root.parameters()}
    stray = [n for m in _method_modules(method) for n, p in m.named_parameters() if id(p) not in in_roots]
    if stray:  # to_empty below would leave them without values on every rank
        raise ValueError(f"FSDP2: parameters outside the model and its shadow modules: {stray[:5]}")
    # rank 0's values, referenced before sharding replaces the parameters
    values = [root.state_dict() if env.is_main else {} for root in roots]
    buffers = {name: b.detach().clone() for name, b in _named_buffers(method)} if env.is_main else {}
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for root in roots:
        for unit in units(root):
            fully_shard(unit, mesh=mesh)
        fully_shard(root, mesh=mesh)
    for module in _method_modules(method):
        module.to_empty(device=env.device)
    for root, full in zip(roots, values):
        set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # buffers (persistent or not) are not sharded: each rank a copy of rank 0's
        for name, b in _named_buffers(method):
            if env.is_main:
                b.copy_(buffers[name])
            dist.broadcast(b, src=0)


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
