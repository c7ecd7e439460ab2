"""Evaluation jobs longer than a time limit: finished parts kept, the part in training saved.

At paper scale the VQA probe (two training stages of an 8B LM, then 16 benchmarks) and the
classic probes of a 5B-7B encoder (ADE20K's 40k iterations on the encoder's own passes, NYUd's
38.4k) run longer than a partition's time limit. ``EvalProgress`` keeps what a job has done in
a directory its rule does not declare as an output (``state_dir``:
``results/{scale}/eval_state/evals/{run}/{kind}``), so that the retry of a stopped attempt
continues it instead of starting over:

* ``done/<part>.json``: the result of a finished part (a task's scores, a benchmark's answers),
  read back instead of recomputed;
* ``<part>.<iteration>/`` with the pointer ``<part>.json``: the state of the part under way
  (heads or probe, optimizer, data position, RNG, loss curves; a scoring's accumulators; the
  answers so far), written every
  ``checkpoint_every_min``, at the end of a dense head's training, and when the job must stop:
  on SIGTERM / SIGUSR1, or once its SLURM end time would not cover the next piece of work, a
  save and ``stop_margin_s`` (``train.deadline``). The job then exits 75 (``train.Preempted``)
  and the rule's retry resumes it, to the numbers an uninterrupted job computes.

The directory is stamped with the evaluation config as the job resolves it (``evaluate.jobs.state_config``:
code defaults filled in, settings left out), the encoder file, the eval-set manifests and, for
the VQA answers, the trained probe's record (``vqa.trained``);
state of other inputs is set aside (``train.fingerprint.guard_checkpoints``). The CLI removes it
once the job's output is written. Every rank of a torchrun job calls the same methods in the
same order: decisions to save or stop are taken together, rank 0 writes the pointers and results.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
import torch.nn as nn

from webssl_repro.files import read_json, write_json
from webssl_repro.train import attempts
from webssl_repro.train.attempts import Measure
from webssl_repro.train.checkpoint import capture_rng, remove_versions, restore_rank_rng, save_version
from webssl_repro.train.fingerprint import STAMP
from webssl_repro.train.deadline import Deadline, job_deadline
from webssl_repro.train.distributed import all_gather_object, any_rank, barrier, get_rank, get_world_size, is_main
from webssl_repro.train.loop import Preempted, PreemptionFlag, collective_stop

#: The keys of ``evaluate.classic`` / ``evaluate.vqa`` that say when a job saves, not what it
#: computes (``settings.SETTINGS``), and their defaults. ``checkpoint_every_min: 0`` saves after
#: every iteration.
DEFAULTS = {"checkpoint_every_min": 30.0, "stop_margin_s": 300.0}
DONE = "done"
STATE_FILE = "state.pt"
#: the subfolder of bulky files a part writes in place (``files``): derived from the encoder,
#: so a directory set aside for another fingerprint is set aside without them
FILES = "files"
#: ``files`` folders that earlier versions wrote in the directory itself (the ImageNet features,
#: f6cf52a..0f757ce): moved under ``FILES`` when the directory is opened, saved rows and all
LEGACY_FILES = ("linear_features",)

T = TypeVar("T")

PART_SAVES = 10**9  # iterations of one part's state are fewer: a finished part always counts more


def _drop_set_aside_files(moved: Path) -> None:
    """A set-aside directory keeps its results and saved states, but not its ``files`` (52 GB of
    ImageNet features at ViT-7B): they are a function of the old encoder and recomputable from it."""
    folder = moved / FILES
    if folder.is_dir():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        print(f"{moved.name}: removed its {FILES}/ ({size / 2**30:.1f} GiB of features of the old encoder)")


def _move_legacy_files(directory: Path) -> None:
    for name in LEGACY_FILES:
        old, new = directory / name, directory / FILES / name
        if old.is_dir() and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            old.rename(new)


def saved_progress(directory: Path) -> int:
    """How far a job's saved state has come, a number that grows with every save: each
    finished part counts ``PART_SAVES``, each part under way its saved iterations (the
    attempts ledger, ``train.attempts``, tells progress from a futile attempt by it)."""
    if not directory.is_dir():
        return 0
    done = sum(1 for _ in (directory / DONE).glob("*.json"))
    pointers = [p for p in directory.glob("*.json") if p.name != STAMP]
    return done * PART_SAVES + sum(int(read_json(p)["iteration"]) for p in pointers)


#: An evaluation job's progress for its attempts ledger.
SAVED = Measure(saved_progress, lambda n: f"{n // PART_SAVES} finished part(s) and {n % PART_SAVES} saved iterations")

#: ``checkpoint(done, make_state)``, called by a training loop after each iteration
#: (``EvalProgress.torch_saver``); ``make_state`` runs only when a save is due.
Checkpoint = Callable[[int, Callable[[], dict[str, Any]]], None]


def split_settings(cfg: Mapping[str, Any], section: str) -> tuple[dict[str, Any], dict[str, float]]:
    """``cfg`` without the progress keys, and those keys over ``DEFAULTS`` (checked)."""
    rest = {k: v for k, v in cfg.items() if k not in DEFAULTS}
    settings = {k: float(cfg.get(k, v)) for k, v in DEFAULTS.items()}
    for key, value in settings.items():
        if value < 0:
            raise ValueError(f"evaluate.{section}.{key}: {value} must be >= 0")
    return rest, settings


#: The evaluations that keep progress; alignment is one pass over features and caches those.
RESUMABLE = ("vqa", "vqa_probe", "classic")


def file_identity(path: str | Path) -> dict[str, Any]:
    """What ties saved state to one input file without reading it (a 7B encoder is 28 GB): its
    name, size and modification time, which a retrained run or a regenerated eval set changes."""
    stat = Path(path).stat()
    return {"name": Path(path).name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


#: the folders of the workflow's evaluation outputs: results/{scale}/<folder>/{name}/{kind}.json
OUTPUT_FOLDERS = ("evals", "controls")


def scale_results(out: str | Path) -> Optional[Path]:
    """``results/{scale}`` of an evaluation output laid out as the workflow writes it
    (``results/{scale}/{evals,controls}/{name}/{kind}.json``), else None."""
    out = Path(out).absolute()
    if len(out.parents) < 3 or out.parents[1].name not in OUTPUT_FOLDERS:
        return None
    return out.parents[2]


def state_dir(out: str | Path, kind: str) -> Optional[Path]:
    """Where the job writing ``out`` (``results/{scale}/{evals,controls}/{name}/{kind}.json``)
    keeps its progress: ``results/{scale}/eval_state/{evals,controls}/{name}/{kind}``, beside the
    outputs that Snakemake deletes when a job fails, not among them. None for an ``out`` laid out
    otherwise (a one-off run of the CLI keeps no progress unless given ``--state``)."""
    root = scale_results(out)
    if root is None:
        return None
    out = Path(out).absolute()
    return root / "eval_state" / out.parents[1].name / out.parent.name / kind


class EvalProgress:
    """A job's finished parts and the state of its part under way; ``directory=None`` keeps
    nothing (library use, benchmarks). Use as a context manager to catch preemption signals."""

    def __init__(self, directory: Optional[str | Path] = None, *,
                 checkpoint_every_min: float = DEFAULTS["checkpoint_every_min"], deadline: Optional[Deadline] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = None if directory is None else Path(directory)
        self.every_s = 60.0 * float(checkpoint_every_min)
        self.deadline, self.clock = deadline, clock
        self._flag = PreemptionFlag()
        self._last_save = clock()
        #: (part, iterations done, when) of the last iteration: a step is timed between two of one part
        self._last: Optional[tuple[str, int, float]] = None
        self._out_of_time = False

    @classmethod
    def open(cls, directory: str | Path, fingerprint: Mapping[str, Any], settings: Mapping[str, float],
             env: Optional[Mapping[str, str]] = None, attempt: Optional[int] = None) -> "EvalProgress":
        """The progress kept in ``directory``, set aside first when stamped with another
        ``fingerprint`` (rank 0; the other ranks read it only after a collective), and the
        SLURM job's deadline. With Snakemake's ``attempt``, rank 0 records it in the directory's
        attempts ledger, or raises ``FutileRetry`` after attempts that failed without saving
        anything, or ``LiveAttempt`` first while another SLURM job's attempt runs here
        (``train.attempts``)."""
        import os

        from webssl_repro.train.fingerprint import guard_checkpoints

        if int((os.environ if env is None else env).get("RANK", "0")) == 0:
            if attempt is not None:  # a job of a snakemake that is gone may still run here
                attempts.refuse_if_live(directory)
            _move_legacy_files(Path(directory))
            moved = guard_checkpoints(directory, fingerprint)
            if moved is not None:
                _drop_set_aside_files(moved)
            if attempt is not None:
                attempts.begin(directory, attempt, measure=SAVED)
        deadline = job_deadline(float(settings["stop_margin_s"]), env)
        return cls(directory, checkpoint_every_min=settings["checkpoint_every_min"], deadline=deadline)

    def __enter__(self) -> "EvalProgress":
        if self.directory is not None:  # else nothing can be saved: a signal keeps its default action
            self._flag.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.directory is not None:
            self._flag.__exit__(*exc)

    # ------------------------------------------------------------ finished parts

    def _done(self, part: str) -> Path:
        return self.directory / DONE / f"{part}.json"

    def result(self, part: str) -> Optional[Any]:
        """A finished part's result, or None."""
        if self.directory is None:
            return None
        barrier()
        path = self._done(part)
        return read_json(path)["value"] if path.exists() else None

    def finish(self, part: str, value: Any, also: Sequence[str] = ()) -> Any:
        """Keep ``value`` (JSON-able) as ``part``'s result and drop its training state, and that
        of the parts ``also`` that computed it (its scoring)."""
        if self.directory is not None:
            if is_main():
                write_json(self._done(part), {"part": part, "value": value})
                for name in (part, *also):
                    self.drop(name)
            barrier()
        return value

    def stop_point(self, label: str) -> None:
        """Between parts, with nothing unsaved: stop for a signal or the time limit (``Preempted``)."""
        if self.directory is not None and self._must_stop():
            raise self._stop(0, f"before {label}")

    # ------------------------------------------------------------ the part under way

    def _pointer(self, part: str) -> Path:
        return self.directory / f"{part}.json"

    def latest(self, part: str) -> Optional[tuple[int, Path]]:
        """(iterations done, directory) of ``part``'s last saved state, or None."""
        if self.directory is None:
            return None
        barrier()
        pointer = self._pointer(part)
        if not pointer.exists():
            return None
        meta = read_json(pointer)
        return int(meta["iteration"]), self.directory / meta["dir"]

    def iteration_done(self, part: str, done: int, total: int, write: Callable[[Path], None],
                       final_save: bool = False) -> None:
        """After ``done`` of ``total`` iterations: save when it is due or the job must stop, then
        stop (``Preempted``) if it must. ``write(directory)`` writes the state into an empty
        directory (on every rank: a sharded save is collective). After the last iteration only
        ``final_save`` saves (what follows, e.g. scoring, then starts from the trained heads)."""
        now = self.clock()
        if self.deadline is not None and self._last is not None and self._last[:2] == (part, done - 1):
            self.deadline.record_step(now - self._last[2])
        if self.directory is not None and done >= total and final_save:
            self.save(part, done, write)
            if self._must_stop():  # before what follows the training (scoring), which saves nothing
                raise self._stop(done, f"after training {part}")
        elif self.directory is not None and done < total:
            stop = self._must_stop()
            if stop or any_rank(now - self._last_save >= self.every_s):
                self.save(part, done, write)
            if stop:
                raise self._stop(done, f"after iteration {done} of {part}")
        self._last = (part, done, self.clock())

    def save(self, part: str, done: int, write: Callable[[Path], None]) -> None:
        """Write ``part``'s state at ``done`` iterations beside the last one, then point to it
        (nothing without a directory)."""
        if self.directory is None:
            return
        started = time.perf_counter()
        save_version(self.directory, f"{part}.{done}", write, self._pointer(part), {"iteration": done},
                     family=self._family(part))
        self._last_save = self.clock()
        if self.deadline is not None:
            self.deadline.record_save(time.perf_counter() - started)

    def drop(self, part: str) -> None:
        """Remove ``part``'s training state (rank 0)."""
        self._pointer(part).unlink(missing_ok=True)
        remove_versions(self.directory, self._family(part))

    @staticmethod
    def _family(part: str) -> str:
        return rf"{re.escape(part)}\.\d+"

    # ------------------------------------------------------------ one-process state (torch.save)

    def torch_state(self, part: str) -> Optional[dict[str, Any]]:
        """``part``'s last state saved by ``torch_saver``, its RNG restored; None for a fresh start."""
        found = self.latest(part)
        if found is None:
            return None
        state = torch.load(found[1] / STATE_FILE, map_location="cpu", weights_only=False)
        restore_rank_rng(state, get_rank(), get_world_size())
        return state

    def torch_saver(self, part: str, total: int, final_save: bool = True
                    ) -> Callable[[int, Callable[[], dict[str, Any]]], None]:
        """``checkpoint(done, make_state)`` for a training loop of ``total`` iterations: when a
        save is due, ``make_state()`` (with ``"iteration"``) goes to ``state.pt`` with the RNG
        (``final_save``: after the last iteration too)."""
        def checkpoint(done: int, make_state: Callable[[], dict[str, Any]]) -> None:
            def write(directory: Path) -> None:
                state = {**make_state(), "rng": all_gather_object(capture_rng())}
                if is_main():
                    torch.save(state, directory / STATE_FILE)

            self.iteration_done(part, done, total, write, final_save=final_save)

        return checkpoint

    def resumable_pass(self, part: str, state: Optional[Mapping[str, Any]], batches: Iterable[T], remaining: int,
                       per_batch: int, make_state: Callable[[], dict[str, Any]]) -> Iterator[T]:
        """``batches``: what is left, ``remaining`` items ``per_batch`` at a time, of an in-order
        pass (a val set's scoring, a benchmark's answers) whose last save is ``state``
        (``torch_state``, None for a fresh start). Once the caller has done a batch,
        ``make_state()`` is ``part``'s state, saved when due or before a stop; every batch is
        timed for the stop decision, the first too: it may be the longest piece of work of the
        job so far (a scoring batch after a head's training)."""
        first = 0 if state is None else int(state["iteration"])
        checkpoint = self.torch_saver(part, first + -(-remaining // per_batch), final_save=False)
        self._last = (part, first, self.clock())
        for k, batch in enumerate(batches, start=first + 1):
            yield batch
            checkpoint(k, lambda: {**make_state(), "iteration": k})

    # ------------------------------------------------------------ files written in place

    def files(self, name: str) -> Optional[Path]:
        """A folder of the state directory for files too large to copy at every save (a split's
        features), which a part writes in place and its saved state says how far; None
        without a directory. Removed when the directory is set aside for another fingerprint."""
        return None if self.directory is None else self.directory / FILES / name

    def drop_files(self, name: str) -> None:
        """Remove ``files(name)`` once no part reads it any more (rank 0)."""
        if self.directory is not None and is_main():
            shutil.rmtree(self.directory / FILES / name, ignore_errors=True)

    # ------------------------------------------------------------ the end

    def discard(self) -> None:
        """Remove the directory once the job's output holds everything (rank 0; after the process
        group is down every process counts as rank 0, so the caller keeps to the one that was)."""
        if self.directory is not None and is_main():
            shutil.rmtree(self.directory, ignore_errors=True)

    def _must_stop(self) -> bool:
        self._out_of_time = self.deadline is not None and self.deadline.reached()
        return any_rank(self._flag.signum is not None or self._out_of_time)

    def _stop(self, done: int, at: str) -> Preempted:
        """After ``_must_stop`` said so on every rank: the stop, its cause agreed over them."""
        return collective_stop(done, self._flag.signum, self._out_of_time,
                               self.deadline.seconds_left() if self._out_of_time else None, at=at)


def head_state(done: int, heads: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
               losses: Sequence[Sequence[float]]) -> dict[str, Any]:
    """What a probe-head training needs to resume after ``done`` iterations."""
    return {"iteration": done, "heads": [h.state_dict() for h in heads], "optimizer": optimizer.state_dict(),
            "losses": [list(curve) for curve in losses]}


def resume_heads(heads: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
                 state: Optional[Mapping[str, Any]]) -> tuple[int, list[list[float]]]:
    """Load a ``head_state``: (iterations done, loss curves so far); (0, empty) without one."""
    if state is None:
        return 0, [[] for _ in heads]
    for head, saved in zip(heads, state["heads"], strict=True):
        head.load_state_dict(saved)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"]), [list(curve) for curve in state["losses"]]
