"""Data-parallel VQA probe over the ranks of a torchrun launch (``evaluate.vqa.strategy``).

* ``none`` (default, mini): one process, ``torch.distributed`` never initialised.
* ``ddp``: every rank holds the whole probe; a ``DistributedDataParallel`` wrapper is built
  per training stage (the trainable set changes between stages, DDP's reducer cannot follow).
* ``fsdp2``: ``fully_shard`` on every decoder layer of the LM and on the projector, then on
  the probe (embeddings, head, norm), so an 8B LM fits across a node's GPUs. ``generate`` is registered as
  an FSDP forward method, and ranks decode in lockstep (each forward all-gathers per layer).

Process groups, wrapping and collectives come from ``webssl_repro.train.distributed``.
Training: each rank takes its contiguous slice of every global batch, so the union of the
ranks' micro-batches is exactly the single-process set; the answer-token count is summed over
ranks and each rank's loss is scaled by the world size (DDP and FSDP2 average gradients), so
the gradient equals the single-process one. Evaluation: the single-process batches are dealt
round-robin to the ranks (identical padding, identical numbers), a round at a time, and each
round's answers gathered in order (``answering``).
"""
from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from webssl_repro.train.distributed import (DistEnv, all_gather_object, all_reduce_mean, any_rank, barrier,
                                            init_distributed, prepare_model, transformer_blocks)

STRATEGIES = ("none", "ddp", "fsdp2")


def init(strategy: str) -> Optional[DistEnv]:
    """The process group for ``strategy``; None (and nothing initialised) for ``none``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"evaluate.vqa.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none":
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but evaluate.vqa.strategy is 'none': "
                             "set it to 'ddp' or 'fsdp2'")
        return None
    return init_distributed(strategy)


@contextmanager
def main_first(env: Optional[DistEnv]) -> Iterator[None]:
    """Rank 0 runs the body first (writing caches), then the others (reading them)."""
    if env is not None and not env.is_main:
        barrier()
    yield
    if env is not None and env.is_main:
        barrier()


@dataclass(frozen=True)
class Parallel:
    strategy: str
    env: DistEnv

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def lockstep(self) -> bool:
        """FSDP2 ranks must run every forward together (per-layer all-gathers)."""
        return self.strategy == "fsdp2" and self.world_size > 1

    def local_indices(self, idx: Sequence[int], micro_batch_size: int) -> list[int]:
        """This rank's contiguous slice of a global batch."""
        n, w = len(idx), self.world_size
        if n % (w * micro_batch_size):
            raise ValueError(f"VQA global batch_size {n} must divide by world size {w} x micro_batch_size "
                             f"{micro_batch_size} = {w * micro_batch_size}")
        per = n // w
        return list(idx[self.rank * per:(self.rank + 1) * per])

    def sum(self, value: float) -> float:
        return all_reduce_mean({"v": float(value)})["v"] * self.world_size

    def training_module(self, probe: nn.Module) -> nn.Module:
        """What training calls forward on: a fresh DDP wrapper (ddp) or the sharded probe itself."""
        if self.strategy != "ddp":
            return probe
        holder = SimpleNamespace(model=probe)
        prepare_model(holder, "ddp", self.env)
        return holder.model

    def accumulate(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces on the last micro-batch only; FSDP2 reduce-scatters every micro-batch
        (sharded gradients accumulate, no unsharded copy is kept)."""
        if not last and isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def all_finished(self, finished: bool) -> bool:
        return not any_rank(not finished) if self.lockstep else finished

    def answer_round(self, starts: Sequence[int], answer: Callable[[int], list[str]]) -> list[str]:
        """``answer(start)`` of the batch at ``starts[rank]``, the round's answers gathered to every
        rank in order. A rank past the round's last batch repeats the first and drops its answers
        where ranks decode in lockstep, so that FSDP2's collectives line up."""
        mine: list[str] = []
        if self.rank < len(starts):
            mine = answer(starts[self.rank])
        elif self.lockstep:
            answer(starts[0])
        return [a for part in all_gather_object(mine) for a in part]

    def from_main(self, obj: Any) -> Any:
        return all_gather_object(obj)[0]


def _fsdp_units(probe: nn.Module) -> list[nn.Module]:
    """One unit per decoder layer, and the projector. The root (probe) keeps embeddings, norm, head."""
    return [*transformer_blocks(probe.lm), probe.projector]


#: Bytes per trained parameter of a full replica: fp32 weight, gradient and AdamW's two moments
REPLICA_BYTES_PER_PARAM = 16


def check_replica_fits(probe: nn.Module, device: torch.device) -> None:
    """``ddp`` keeps the whole probe, its gradients and AdamW state on every GPU; refuse it, by
    name, where that alone exceeds the GPU (Llama-3-8B: 128 GB), before any step is taken."""
    if device.type != "cuda":
        return
    need = REPLICA_BYTES_PER_PARAM * sum(p.numel() for p in probe.parameters())
    have = torch.cuda.get_device_properties(device).total_memory
    if need > have:
        raise ValueError(f"evaluate.vqa.strategy: ddp replicates the probe's fp32 weights, gradients and AdamW "
                         f"state on every GPU ({need / 2**30:.0f} GiB against {have / 2**30:.0f} GiB): use fsdp2")


def parallelize(probe: nn.Module, strategy: str) -> Optional[Parallel]:
    """Join the group and shard the probe in place (fsdp2); None for ``none``.

    Call once, before building optimizers, with the probe on ``env.device``.
    """
    env = init(strategy)
    if env is None:
        return None
    if strategy == "ddp":
        check_replica_fits(probe, env.device)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import register_fsdp_forward_method

        prepare_model(SimpleNamespace(model=probe), "fsdp2", env, shard_units=_fsdp_units)
        register_fsdp_forward_method(probe, "generate")
    # A rank whose batch has no image must still put the projector in the graph: otherwise
    # ranks disagree on which parameters have gradients and the gradient collectives mismatch.
    probe.project_without_images = True
    return Parallel(strategy, env)
