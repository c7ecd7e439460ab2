"""One training loop for Web-DINO, Web-MAE and CLIP.

The method owns the modules and the loss (``webssl_repro.methods.base.PretrainMethod``);
this loop owns what is common to all of them: AdamW with DINOv2-style per-step lr / wd
schedules scaled by each param group's multipliers, gradient clipping, logging,
checkpoints with exact resume, preemption, and data parallelism.

Data interface. ``data_iter_factory(start_sample, rank, world_size)`` returns an iterator
of *this rank's* batches starting at global sample ``start_sample`` (the samples already
consumed, ``step * global_batch_size``). The batch of global step ``s`` on rank ``r``
holds the global samples ``[s*G + r*L, s*G + (r+1)*L)`` with ``G`` the global and
``L = G // world_size`` the local batch size, augmented by sample index, so that a resumed
run sees exactly the samples it would have seen. The in-memory corpus
(``data.corpus.IndexedCorpus``) depends on nothing else, so a run on W ranks also sees the
same global samples, each with the same crops, as a run on one; the draws a collate makes
for a rank's whole batch (DINO's photometrics and iBOT masks, as DINOv2 draws them per rank)
are seeded by the rank's first sample, so they follow the split. The streamed corpus
(``data.stream_corpus.ShardCorpus``) also depends on the numbers of ranks and dataloader workers.
A method's own draws inside its step come from each rank's generator (seeded ``seed + rank``,
reseeded from the step on a resume across another number of ranks): Web-MAE's masks, drawn
in the model as the reference draws them. So a Web-MAE run on W ranks, or resumed on another
number of them, masks the same samples from the same distribution but with other draws than
one process; a resume on the same ranks restores every generator and is bitwise identical.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .deadline import Deadline
from .distributed import (
    DistEnv,
    ShardUnits,
    all_reduce_mean,
    any_rank,
    init_distributed,
    move_method,
    prepare_model,
    reshard_shadows,
    unwrap,
    unwrapped,
)
from .deadline import PREEMPT_SIGNALS
from .logging import TrainLogger, scalars
from ..files import code_version

DataIterFactory = Callable[[int, int, int], Iterator[Any]]

#: config keys that may change between a run and its resumption: how it runs, not the recipe
#: (``precision`` changes the arithmetic on a GPU, so such a run is not bitwise one of either)
RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "stop_margin_s", "strategy", "precision",
                     "activation_checkpointing"}


class Preempted(Exception):
    """Raised after a preemption signal, or near the job's time limit (``train.deadline``),
    once the current step is checkpointed.

    The CLI exits with ``exit_code`` (EX_TEMPFAIL) so that Snakemake's ``retries`` or a SLURM
    requeue starts the job again, which then resumes from the checkpoint. ``signum`` is None
    when the time limit, not a signal, stopped the run (``deadline``: the ranks agreed it did,
    ``collective_stop``); ``at`` says where, if not after ``step``.
    """

    exit_code = 75

    def __init__(self, step: int, signum: Optional[int], reason: str = "", at: str = "", deadline: bool = False):
        reason = reason or (f"signal {signal.Signals(signum).name}" if signum else "a stop on another rank")
        super().__init__(f"preempted by {reason} {at or f'after step {step}'}; {'progress' if at else 'checkpoint'} saved")
        self.step = step
        self.signum = signum
        self.deadline = deadline

    @property
    def cause(self) -> str:
        """What the attempts ledger records: the job's own time limit, a signal, or another rank's stop."""
        return "time limit" if self.deadline else "signal" if self.signum else "another rank"


def collective_stop(step: int, signum: Optional[int], out_of_time: bool, seconds_left: Optional[float],
                    at: str = "") -> Preempted:
    """The ``Preempted`` each rank raises once any rank must stop (called on every rank together),
    its cause agreed over the ranks: a time limit that one rank's clock reaches first is every
    rank's (rank 0's record is what ``launch`` reads), unless a signal reached any rank."""
    signalled = any_rank(signum is not None)
    limit = any_rank(out_of_time) and not signalled
    reason = ""
    if limit and signum is None:
        reason = (f"the job's time limit ({seconds_left:.0f} s left)" if out_of_time and seconds_left is not None
                  else "the job's time limit, reached on another rank")
    return Preempted(step, signum, reason, at=at, deadline=limit)


@dataclass(frozen=True)
class TrainResult:
    step: int  #: optimizer steps done in total
    samples_seen: int
    complete: bool  #: the budget is spent
    checkpoint: Path
    #: which code trained the weights: ``{"commit", "from_step"}`` for each change of commit
    #: between the jobs of the run (a re-export of a finished checkpoint adds none)
    trained_by: list[dict[str, Any]] = field(default_factory=list)


class PreemptionFlag:
    """Records the first preemption signal; the loop acts on it between steps."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            warnings.warn("running outside the main thread: preemption signals are not handled")
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    current = cfg.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"cannot resume: the checkpoint was trained with a different config ({detail})")


def build_optimizer(method: Any, cfg: TrainConfig) -> torch.optim.AdamW:
    with unwrapped(method):  # parameter names without DDP's "module." prefix
        groups = method.param_groups(cfg.lr, cfg.weight_decay)
    # The fused kernel is one pass over all parameters (on CPU too: 2.6 ms -> 0.9 ms per step
    # for mini-1b); FSDP2's DTensor shards take the default multi-tensor path.
    fused = cfg.strategy != "fsdp2"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused)


def clip_groups(method: Any, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The parameter sets whose gradients are clipped each on its own: the optional method hook
    ``clip_groups()`` (DINOv2 clips the backbone and each head separately), else all of them."""
    hook = getattr(method, "clip_groups", None)
    if not callable(hook):
        return {"all": params}
    with unwrapped(method):
        groups = {name: list(ps) for name, ps in hook().items()}
    grouped = [id(p) for ps in groups.values() for p in ps]
    if sorted(grouped) != sorted(id(p) for p in params):
        raise ValueError(f"{type(method).__name__}.clip_groups() must split the optimised parameters "
                         f"into disjoint groups covering all of them ({len(grouped)} vs {len(params)})")
    return groups


def clip_gradients(groups: Mapping[str, list[torch.Tensor]], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each group's gradient norm to ``max_norm``; returns each group's norm before clipping."""
    return {name: torch.nn.utils.clip_grad_norm_(ps, max_norm) for name, ps in groups.items()}


def grad_norm_scalars(norms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``grad_norm`` (all groups together) and, with several groups, ``grad_norm_{group}``."""
    values = {name: float(n.full_tensor() if hasattr(n, "full_tensor") else n) for name, n in norms.items()}
    out = {"grad_norm": math.sqrt(sum(v * v for v in values.values()))}
    if len(values) > 1:
        out.update({f"grad_norm_{name}": v for name, v in values.items()})
    return out


def set_hyperparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """DINOv2's per-iteration rule: ``lr * lr_multiplier`` and ``wd * wd_multiplier`` per group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)


def train(
    method: Any,
    data_iter_factory: DataIterFactory,
    cfg: TrainConfig,
    run_dir: os.PathLike | str,
    *,
    max_steps: Optional[int] = None,
    shard_units: Optional[ShardUnits] = None,
    deadline: Optional[Deadline] = None,
) -> TrainResult:
    """Train ``method`` for ``cfg.steps`` steps, resuming from ``run_dir/checkpoints`` if present.

    ``max_steps`` stops after that many steps in total (checkpointing), e.g. to split a run
    into time-boxed jobs; ``shard_units`` picks the FSDP2 units (default: transformer blocks).
    Raises :class:`Preempted` after SIGTERM / SIGUSR1, or once ``deadline`` (the job's time
    limit, ``train.deadline.job_deadline``) leaves only the time to save, with the step
    checkpointed.
    """
    run_dir = Path(run_dir)
    env: DistEnv = init_distributed(cfg.strategy)
    if cfg.global_batch_size % env.world_size:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by world_size={env.world_size}")
    total = cfg.steps if max_steps is None else min(cfg.steps, max_steps)

    state = ckpt.load_meta(run_dir)
    trained_by = list(state.get("trained_by", [])) if state is not None else []
    if state is not None:
        _check_resumable(state["config"], cfg)
        ckpt.restore_before_wrap(method, state)
    if cfg.strategy != "fsdp2":  # FSDP2 places each rank's shards itself
        move_method(method, env.device)
    prepare_model(method, cfg.strategy, env, shard_units)
    optimizer = build_optimizer(method, cfg)
    start, resumed = 0, state is not None
    if state is not None:
        ckpt.restore_after_wrap(method, optimizer, cfg.strategy, state)
        for group in optimizer.param_groups:  # load_state_dict restores the saved run's kernel choice
            group["fused"] = cfg.strategy != "fsdp2"
        start = int(state["step"])
        if env.is_main:  # the job's log says that it continued, and from where
            print(f"resuming {run_dir} at step {start} of {cfg.steps} ({start * cfg.global_batch_size} samples seen)",
                  file=sys.stderr, flush=True)
        if not ckpt.restore_rank_rng(state, env.rank, env.world_size):
            ckpt.seed_everything(cfg.seed + env.rank + 1_000_003 * start)
        del state
    else:
        ckpt.seed_everything(cfg.seed + env.rank)

    lr_at, wd_at = cfg.lr_schedule(), cfg.wd_schedule()
    use_bf16 = cfg.precision == "bf16" and env.device.type == "cuda"
    if cfg.precision == "bf16" and not use_bf16 and env.is_main:
        warnings.warn("precision=bf16 autocasts on CUDA only; this CPU run trains in fp32")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clipped = clip_groups(method, params)

    commit = code_version() if start < total else None
    if commit is not None and (not trained_by or trained_by[-1]["commit"] != commit):
        trained_by.append({"commit": commit, "from_step": start})

    def save(step: int) -> Path:
        t0 = time.perf_counter()
        logger.sync()
        path = ckpt.save_checkpoint(run_dir, method, optimizer, cfg.strategy, step=step,
                                    samples_seen=step * cfg.global_batch_size, complete=step >= cfg.steps,
                                    config=cfg.to_dict(), trained_by=trained_by)
        if deadline is not None:
            deadline.record_save(time.perf_counter() - t0)
        return path

    if deadline is not None and deadline.reached() and start < total:
        warnings.warn(f"this job ends in {deadline.seconds_left():.0f} s, within stop_margin_s="
                      f"{deadline.margin_s:.0f} s: it trains one step, checkpoints and stops")
    logger = TrainLogger(run_dir, enabled=env.is_main, start_step=start, total_steps=cfg.steps)
    data = data_iter_factory(start * cfg.global_batch_size, env.rank, env.world_size)
    step, last_saved = start, start
    t_log, steps_since_log = time.perf_counter(), 0
    try:
        with PreemptionFlag() as preempt:
            t_step = time.perf_counter()
            for step in range(start, total):
                lr, wd = lr_at(step), wd_at(step)
                set_hyperparams(optimizer, lr, wd)
                try:
                    batch = _to_device(next(data), env.device)
                except StopIteration:
                    raise RuntimeError(f"data iterator ended at step {step}: it must cover {cfg.samples_seen} samples") from None

                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = method.training_step(batch, step)
                loss = out["loss"]
                if not math.isfinite(loss.item()):  # DINOv2 aborts on NaN rather than train on garbage
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.strategy == "fsdp2":
                    reshard_shadows(method)
                norms = clip_gradients(clipped, cfg.grad_clip) if cfg.grad_clip > 0 else {}
                optimizer.step()
                method.after_optimizer_step(step)
                done = step + 1
                steps_since_log += 1
                logger.advance()

                if done % cfg.log_every == 0 or done == cfg.steps:  # not where max_steps stops a job
                    values = scalars(out)
                    if norms:
                        values.update(grad_norm_scalars(norms))
                    values = all_reduce_mean(values)
                    elapsed = time.perf_counter() - t_log
                    logger.log({
                        "step": done,
                        "samples_seen": done * cfg.global_batch_size,
                        **values,
                        "lr": lr,
                        "wd": wd,
                        "images_per_s": steps_since_log * cfg.global_batch_size / max(elapsed, 1e-9),
                    })
                    t_log, steps_since_log = time.perf_counter(), 0

                if deadline is not None:
                    # from the end of the last iteration: a GPU step's asynchronous tail is
                    # waited for in the next step's loss.item(), so it is counted there
                    deadline.record_step(time.perf_counter() - t_step)
                if done % cfg.checkpoint_every == 0 or done == total:
                    save(done)
                    last_saved = done
                out_of_time = deadline is not None and deadline.reached()
                if done < total and any_rank(preempt.signum is not None or out_of_time):
                    if last_saved != done:
                        save(done)
                    raise collective_stop(done, preempt.signum, out_of_time,
                                          deadline.seconds_left() if out_of_time else None)
                t_step = time.perf_counter()
            step = max(total, start)
    finally:
        logger.close()
        getattr(data, "close", lambda: None)()  # stop generator-based pipelines (and their workers)
        method.model = unwrap(method.model)  # hand back the user's module (DDP only wraps)
    if not resumed and step == start:  # max_steps=0 on a fresh run: still leave a checkpoint
        save(step)
    return TrainResult(step, step * cfg.global_batch_size, step >= cfg.steps, ckpt.latest_path(run_dir), trained_by)
