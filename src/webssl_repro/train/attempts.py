"""A run's attempts, so that Snakemake's retries resume preempted jobs but not broken ones.

The pretrain rules need many ``retries``: a run longer than the partition's time limit is a
chain of jobs, each ending with a checkpoint and exit 75. Snakemake retries on any exit
code, though, so a run that fails the same way every time (a bad config value, an OOM, NaNs
at a given step) would be resumed and fail again once per retry, each time on the run's full
allocation. ``attempts.jsonl`` in the checkpoint directory records each attempt: the step it
started from (``latest.json``) and, where the process lived to say so, how it ended. Before
an attempt starts, ``begin`` refuses it when the last ``max_futile`` attempts of this
Snakemake invocation each ended without a new checkpoint and not by preemption, the time
limit or completion, and at least one of them with an error.

Each invocation counts its attempts from 1 and has an id its jobs inherit
(``workflow.mark_invocation``), so a user who fixed the cause just reruns ``snakemake``; the
history is kept, and never counts against the new invocation. A job killed outright
(node failure, ``SIGKILL``) leaves no end record: it counts as futile without progress, but
such attempts alone never refuse one.

The submitting snakemake asks ``predicts_refusal`` before it sizes a retry's job
(``Plan.pretrain_job_resources``): Snakemake submits every retry, but one that will be
refused is submitted as a few minutes on one core, not on the run's nodes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..files import read_jsonl
from .checkpoint import read_pointer

LEDGER = "attempts.jsonl"
MAX_FUTILE = 2
# How an attempt ended that makes another worthwhile even without a new checkpoint.
RESUMABLE = ("preempted", "complete")


#: squeue states of a job whose trainer may still run (not PENDING: such a job, once it starts,
#: finds the new attempt open and running, and stops itself; not COMPLETING, which a job shows
#: as Snakemake submits its retry, though a trainer there may still be saving on its signal)
ACTIVE_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"})


class AttemptRefused(RuntimeError):
    """An attempt the guard does not start (the job exits 1, with this message)."""


class FutileRetry(AttemptRefused):
    """The last attempts made no progress and did not end by preemption: retrying would not help."""


class LiveAttempt(AttemptRefused):
    """Another SLURM job's attempt on the same directory is still running."""


def read(checkpoints: str | Path) -> list[dict[str, Any]]:
    """The ledger's records; a line cut short (a kill or a full disk mid-write) is skipped."""
    return read_jsonl(Path(checkpoints) / LEDGER)


def refuse_if_live(checkpoints: str | Path,
                   listed: Optional[Callable[[str], Optional[list[str]]]] = None) -> None:
    """Raise ``LiveAttempt`` where an attempt of another SLURM job, started and not ended in the
    ledger, is still running. A submitting snakemake that died without cancelling its jobs (a
    lost login session) leaves them running; rerun, it submits the same runs again (an
    incomplete output is rerun), and two trainers would write one checkpoint directory. Called
    before anything touches the directory; outside SLURM, and where squeue cannot be asked
    (with a warning), there is nothing to check. ``listed``: squeue's state and start time of a
    job id (None: no longer listed)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    from . import deadline

    listed = listed or (lambda other: deadline.squeue_fields(other, "%T", "%S"))
    open_starts: dict[str, dict[str, Any]] = {}
    last = None
    for r in read(checkpoints):
        if r.get("event") == "start":
            last = str(r["job"]) if r.get("job") else None
            if last is not None:
                open_starts[last] = r
        elif r.get("event") == "end":  # its job's, where it says (an end of a job without a start)
            open_starts.pop(str(r["job"]) if r.get("job") else last, None)
    for other, start in reversed(list(open_starts.items())):
        if other == job:  # this job's own earlier start: SLURM requeued it
            continue
        try:
            row = listed(other)
        except subprocess.CalledProcessError as err:
            if "invalid job id" in str(err.stderr or "").lower():  # forgotten by squeue: long over
                continue
            said = str(err.stderr or "").strip() or str(err)
            warnings.warn(f"{checkpoints}: squeue cannot say whether SLURM job {other}, whose attempt "
                          f"{start.get('attempt')} has no end record, still runs ({said}); starting anyway")
            continue
        except (OSError, subprocess.SubprocessError) as err:
            warnings.warn(f"{checkpoints}: cannot ask squeue whether SLURM job {other}, whose attempt "
                          f"{start.get('attempt')} has no end record, still runs ({err}); starting anyway")
            continue
        state, started = (row or ["", ""])[:2]
        if started[:4].isdigit() and start.get("time") and started > str(start["time"]):
            continue  # a job that started after the record: the id reused (ISO times, the nodes' zone)
        if state.strip().upper() in ACTIVE_STATES:
            raise LiveAttempt(
                f"{checkpoints}: SLURM job {other} (attempt {start.get('attempt')}, started {start.get('time')} on "
                f"{start.get('host')}) is still {state.strip().upper()} on this run, with no end record: two "
                f"trainers would write the same checkpoints. It was submitted by a snakemake that is gone "
                f"(`squeue -u $USER`). Wait for it to end, or `scancel {other}`, then rerun snakemake, which "
                f"resumes from its last checkpoint.")


def _append(checkpoints: str | Path, record: dict[str, Any]) -> None:
    path = Path(checkpoints) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        line = json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        f.write((("\n" if torn else "") + line).encode())  # a torn last line stays alone


def current_step(checkpoints: str | Path) -> int:
    pointer = read_pointer(checkpoints)
    return int(pointer["step"]) if pointer else 0


@dataclass(frozen=True)
class Measure:
    """How far a job's saved state has come: ``read(directory)``, an integer that only grows as
    state is saved (recorded as each record's ``step``), and ``say(n)`` for messages."""

    read: Callable[[Path], int]
    say: Callable[[int], str]


#: A pretraining run: the optimizer steps of its latest checkpoint.
STEPS = Measure(current_step, lambda n: f"step {n}")


def history(records: list[dict[str, Any]], step_now: int, attempt: int, job: Optional[str] = None,
            invocation: Optional[str] = None) -> list[dict[str, Any]]:
    """The attempts before ``attempt`` in this invocation, oldest first: ``attempt``, ``job``,
    ``step`` (at its start), ``progress`` (steps checkpointed during it), ``outcome`` (None: no
    end record) and ``error``.

    This invocation's are the unbroken chain attempt - 1, attempt - 2, ... back from the
    latest start record, all of ``invocation`` where it is known (``workflow.INVOCATION_VAR``).
    A number started twice by one SLURM job (requeued) counts once, by its latest start, and
    the current ``attempt`` of ``job`` not at all. A break (an attempt that died before its
    guard ran) ends the chain: what lies beyond may be another invocation's."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    runs = []
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(records)
        ends = [r for r in records[i + 1:end] if r.get("event") == "end"]
        step_after = records[end]["step"] if end < len(records) else step_now
        runs.append({"attempt": records[i]["attempt"], "job": records[i].get("job"),
                     "invocation": records[i].get("invocation"), "step": records[i]["step"],
                     "progress": step_after - records[i]["step"],
                     "outcome": ends[-1]["outcome"] if ends else None,
                     "error": ends[-1].get("error") if ends else None})

    def requeue_of(run: dict[str, Any], n: int, of_job: Optional[str]) -> bool:
        return of_job is not None and (run["attempt"], run["job"]) == (n, of_job)

    while runs and requeue_of(runs[-1], attempt, job):  # this attempt, requeued: not a past one
        runs.pop()
    chain: list[dict[str, Any]] = []
    for run in reversed(runs):
        if invocation is not None and run["invocation"] != invocation:
            break
        if chain and requeue_of(run, chain[0]["attempt"], chain[0]["job"]):
            continue
        if run["attempt"] != (chain[0]["attempt"] if chain else attempt) - 1:
            break
        chain.insert(0, run)
    return chain


def futile_streak(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trailing attempts that checkpointed nothing and ended neither preempted nor complete."""
    streak: list[dict[str, Any]] = []
    for a in reversed(attempts):
        if a["progress"] > 0 or a["outcome"] in RESUMABLE:
            break
        streak.insert(0, a)
    return streak


def refuses(streak: list[dict[str, Any]], max_futile: int) -> bool:
    """``max_futile`` futile attempts in a row, one of them failing with an error of its own:
    attempts killed without a word (preempted by SIGKILL, node failures, a signal before
    the trainer's handler was installed) alone never stop the retries."""
    return len(streak) >= max_futile and any(a["outcome"] in ("failed", "refused") for a in streak)


def _describe(streak: list[dict[str, Any]]) -> str:
    how = {None: "killed without a word (no end record)"}
    last = next((a for a in reversed(streak) if a["error"]), None)
    ended = [f"attempt {a['attempt']}: {how.get(a['outcome'], a['outcome'])}" for a in streak]
    said = f"; the last error: {last['error']}" if last else ""
    return f"{'; '.join(ended)}{said}"


def _streak(checkpoints: str | Path, step: int, attempt: int, job: Optional[str],
            invocation: Optional[str]) -> list[dict[str, Any]]:
    return futile_streak(history(read(checkpoints), step, attempt, job, invocation))


def _check(attempt: int, max_futile: int) -> None:
    if attempt < 1 or max_futile < 1:
        raise ValueError(f"attempt {attempt} and max_futile {max_futile} must be >= 1")


def predicts_refusal(checkpoints: str | Path, attempt: int, invocation: Optional[str] = None,
                     max_futile: int = MAX_FUTILE, job: Optional[str] = None, measure: Measure = STEPS) -> bool:
    """Whether ``begin`` will refuse ``attempt`` of ``invocation`` in SLURM job ``job`` (None:
    not yet submitted), as the ledger stands (read only)."""
    _check(attempt, max_futile)
    if attempt <= max_futile:  # fewer attempts before it than a refusal needs: no need to read
        return False
    return refuses(_streak(checkpoints, measure.read(Path(checkpoints)), attempt, job, invocation), max_futile)


def sized_for_attempt(cache: dict[tuple, dict[str, Any]], name: str, directory: Optional[str | Path], attempt: int,
                      own: Callable[[], dict[str, Any]], refused: Mapping[str, Any],
                      measure: Measure = STEPS) -> dict[str, Any]:
    """The rule resources of attempt ``attempt`` of the job ``name``, whose ledger is in
    ``directory``: ``own()``, or ``refused`` (a few minutes of one core) where ``begin`` will
    refuse the attempt, plus ``sized_for_refusal`` (0/1) for the job's listing. Decided once
    per (job, attempt, invocation, SLURM job) in ``cache``: Snakemake asks for each resource in
    turn, and again inside the job, where the job's id tells a requeue from a new attempt."""
    from webssl_repro.workflow import INVOCATION_VAR

    job, invocation = os.environ.get("SLURM_JOB_ID"), os.environ.get(INVOCATION_VAR)
    key = (name, attempt, invocation, job)
    if key not in cache:
        will_refuse = attempt > 1 and directory is not None and \
            predicts_refusal(directory, attempt, invocation, job=job, measure=measure)  # attempt 1 never is
        cache[key] = {**(dict(refused) if will_refuse else own()), "sized_for_refusal": int(will_refuse)}
    return cache[key]


def begin(checkpoints: str | Path, attempt: int, max_futile: int = MAX_FUTILE, measure: Measure = STEPS) -> None:
    """Record attempt ``attempt`` (Snakemake's, from 1); raise ``FutileRetry`` instead of
    starting it when the attempts before it ``refuses``. ``measure``: what progress is
    (pretraining: checkpointed steps; an evaluation: ``evaluate.progress.SAVED``)."""
    _check(attempt, max_futile)
    from webssl_repro.workflow import INVOCATION_VAR

    step = measure.read(Path(checkpoints))
    record = {"event": "start", "attempt": attempt, "step": step, "job": os.environ.get("SLURM_JOB_ID"),
              "invocation": os.environ.get(INVOCATION_VAR), "host": socket.gethostname()}
    streak = _streak(checkpoints, step, attempt, record["job"], record["invocation"])
    _append(checkpoints, record)
    print(f"=== {Path(checkpoints).name}: attempt {attempt} from {measure.say(step)}, job {record['job']} "
          f"on {record['host']}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===", flush=True)
    if refuses(streak, max_futile):
        finish(checkpoints, "refused")
        raise FutileRetry(
            f"{checkpoints}: not starting attempt {attempt}. The last {len(streak)} attempts of this "
            f"snakemake invocation ended without saving progress (still at {measure.say(step)}) and not by "
            f"preemption or the time limit ({_describe(streak)}). Another retry would fail the same way; "
            f"fix the cause and rerun snakemake, which resumes from {measure.say(step)}. History: "
            f"{Path(checkpoints) / LEDGER}")


def record_end(checkpoints: str | Path, outcome: str, error: Optional[BaseException] = None,
               measure: Measure = STEPS, cause: Optional[str] = None) -> None:
    """``finish`` from the process that should say it: rank 0 records how the attempt stopped;
    any rank that fails records its failure (torchrun then kills rank 0, which could not)."""
    if error is not None or int(os.environ.get("RANK", "0")) == 0:
        finish(checkpoints, outcome, error, measure, cause)


def finish(checkpoints: str | Path, outcome: str, error: Optional[BaseException | str] = None,
           measure: Measure = STEPS, cause: Optional[str] = None) -> None:
    """Record how the current attempt ended: rank 0 records how it stopped (a preemption's
    ``cause``: ``Preempted.cause``), and every rank that fails records its failure (``history``
    reads the last end record of an attempt)."""
    record: dict[str, Any] = {"event": "end", "outcome": outcome, "step": measure.read(Path(checkpoints)),
                              "job": os.environ.get("SLURM_JOB_ID")}
    if cause is not None:
        record["cause"] = cause
    if error is not None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        record["error"] = text.strip().splitlines()[0][:300] if text.strip() else text
    _append(checkpoints, record)
