"""Dataloader workers in a SLURM job: the job's preemption signals are the trainer's.

SLURM signals every process of a job (SIGTERM at the time limit or a preemption, SIGUSR1 for
``--signal``), dataloader workers too. A worker the signal kills makes its loader raise in the
process that should save and stop (``train.loop.PreemptionFlag``, ``EvalProgress``), so a
``JobDataLoader``'s workers ignore both, whatever starts them (fork, spawn, forkserver). What
ended a worker with SIGTERM then ends it with SIGKILL: the loader's ``terminate`` when a
worker does not leave in time, and, before multiprocessing's own exit handler joins the
workers still alive (without a timeout), an exit handler of this module. A subprocess that a
worker starts (a ``pipe:`` shard's command) inherits the ignored signals; the job's end kills it.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
import weakref
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from webssl_repro.train.deadline import PREEMPT_SIGNALS

#: the workers started by ``JobDataLoader``s, killed at exit if still alive
_WORKERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def ignore_preemption(then: Optional[Callable[[int], None]], worker_id: int) -> None:
    """A worker's start (``worker_init_fn``), then ``then``'s; module-level, so that workers
    started by spawn or forkserver can unpickle it."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


class _Tracked:
    """A worker process that ``_kill_workers_left`` can find, and whose ``terminate`` kills."""

    def start(self) -> None:
        super().start()  # type: ignore[misc]
        _WORKERS.add(self)

    def terminate(self) -> None:
        self.kill()  # type: ignore[attr-defined]


# Module-level classes, so that spawn and forkserver can pickle the processes.
class ForkWorker(_Tracked, multiprocessing.context.ForkProcess):
    pass


class SpawnWorker(_Tracked, multiprocessing.context.SpawnProcess):
    pass


class ForkServerWorker(_Tracked, multiprocessing.context.ForkServerProcess):
    pass


class _ForkContext(multiprocessing.context.ForkContext):
    Process = ForkWorker


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = SpawnWorker


class _ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = ForkServerWorker


_CONTEXTS = {"fork": _ForkContext, "spawn": _SpawnContext, "forkserver": _ForkServerContext}


@atexit.register  # after multiprocessing's handler (imported with torch), so run before it
def _kill_workers_left() -> None:
    alive = [w for w in list(_WORKERS) if w.is_alive()]
    if alive:  # the loaders' SIGCHLD check would take these deaths for failures
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in alive:
        worker.kill()
        worker.join(timeout=5)


class JobDataLoader(DataLoader):
    """A ``DataLoader`` whose workers leave the job's preemption signals to its process.

    They are forked wherever the platform can fork, whatever Python's default, unless
    ``multiprocessing_context`` says otherwise: the batch pipelines are closures
    (``train.run.build``) and the filters' collates hold their backend (an ONNX session, an
    MLLM), which spawn and forkserver (the Linux default from Python 3.14) cannot pickle; and a
    fork shares an in-memory corpus instead of pickling it into every worker."""

    def __init__(self, *args: Any, worker_init_fn: Optional[Callable[[int], None]] = None,
                 multiprocessing_context: Optional[str] = None, **kwargs: Any) -> None:
        workers = {}
        if kwargs.get("num_workers", 0):  # torch refuses a context without workers
            fork = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            method = multiprocessing_context or fork or multiprocessing.get_start_method()
            workers = {"worker_init_fn": functools.partial(ignore_preemption, worker_init_fn),
                       "multiprocessing_context": _CONTEXTS[method]()}
        super().__init__(*args, **workers, **kwargs)


def worker_batches(dataset: Any, workers: int, seed: int) -> Any:
    """An iterator over ``dataset``'s batches, made by ``workers`` processes (0: this one). A
    worker-aware ``dataset`` lets worker ``i`` of ``n`` make every ``n``-th batch from the
    ``i``-th, and the loader polls workers in turn, so the order is that of one process. The
    workers' base seed comes from a generator of ``seed``: drawing it from the global one
    would shift the trainer's random stream (drop path) at every resume. The workers are
    forked where the platform can (``JobDataLoader``)."""
    if workers == 0:
        return iter(dataset)
    return iter(JobDataLoader(dataset, batch_size=None, num_workers=workers,
                              generator=torch.Generator().manual_seed(seed)))
