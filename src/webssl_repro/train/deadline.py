"""Stop before the job's time limit, with a checkpoint, rather than be killed at it.

At the limit SLURM signals the job's processes and kills them ``KillWait`` seconds later (30 s
by default). A checkpoint of a multi-billion-parameter model can take longer than that, and in a
Snakemake job the signal also reaches the processes between the job step and the trainer
(the job's own snakemake, its shell), which die on it first. So the trainer reads when its job
ends and stops by itself while there is time: when the time left would not cover the next step,
a checkpoint and a margin, it checkpoints and exits as preempted (``Preempted``, exit code 75)
and the job's retry resumes from there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import warnings
from datetime import datetime
from typing import Callable, Mapping, Optional

#: SLURM's ``--signal`` and schedulers' preemption notices, sent to every process of the job;
#: SIGTERM is also what torchrun forwards
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


#: squeue's %e for a job without an end time (no time limit, or not yet known)
_NO_END = {"", "N/A", "NONE", "UNKNOWN", "UNLIMITED", "INVALID"}


def slurm_end_time(env: Mapping[str, str] | None = None,
                   squeue: Callable[[str], str] | None = None) -> Optional[float]:
    """When this SLURM job reaches its time limit (Unix time), or None outside SLURM / without one.

    ``SLURM_JOB_END_TIME`` when SLURM exports it (recent versions), else ``squeue``'s end
    time of ``SLURM_JOB_ID`` (SLURM formats it in the local time zone, read back the same way).
    """
    env = os.environ if env is None else env
    stamp = env.get("SLURM_JOB_END_TIME", "").strip()
    if stamp:
        try:
            end = float(stamp)
            return end if end > 0 else None
        except ValueError:
            warnings.warn(f"SLURM_JOB_END_TIME={stamp!r} is not a Unix time; reading the end time from squeue")
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return None
    try:
        text = (squeue or (lambda job: squeue_field(job, "%e")))(job_id).strip()
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"cannot read the end time of SLURM job {job_id} ({err}); "
                      "training on without stopping before the time limit")
        return None
    if text.upper() in _NO_END:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        warnings.warn(f"squeue gave {text!r} as the end time of SLURM job {job_id}; "
                      "training on without stopping before the time limit")
        return None


def squeue_fields(job_id: str, *fields: str) -> Optional[list[str]]:
    """``squeue``'s ``fields`` (``--format`` codes without spaces in their values: %e end time,
    %S start time, %T state) of SLURM job ``job_id``, from its own row: an array's first task
    has the array's id, under which squeue lists every task (%A is each task's own id). None
    where squeue lists it no more; a ``CalledProcessError`` where squeue refuses the id (one it
    has forgotten, "Invalid job id") or cannot reach the controller, an ``OSError`` without it."""
    out = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", " ".join(["%A", *fields])],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    for line in out.splitlines():
        row = line.split()
        if row and row[0] == job_id:
            return (row[1:] + [""] * len(fields))[:len(fields)]
    return None


def squeue_field(job_id: str, field: str) -> str:
    """One of ``squeue_fields``; "" where squeue lists the job no more."""
    row = squeue_fields(job_id, field)
    return row[0] if row else ""


class Deadline:
    """Whether the loop must stop now to checkpoint before ``end_time``.

    Stop when ``now + margin + longest step + longest checkpoint save`` reaches the end: the
    longest step and save are those of this job (a save not yet seen counts as 0, which the
    margin covers).
    """

    def __init__(self, end_time: float, margin_s: float, clock: Callable[[], float] = time.time) -> None:
        if margin_s < 0:
            raise ValueError(f"train config: stop_margin_s must be >= 0, got {margin_s}")
        self.end_time, self.margin_s, self.clock = float(end_time), float(margin_s), clock
        self.longest_step_s = 0.0
        self.longest_save_s = 0.0

    def record_step(self, seconds: float) -> None:
        self.longest_step_s = max(self.longest_step_s, seconds)

    def record_save(self, seconds: float) -> None:
        self.longest_save_s = max(self.longest_save_s, seconds)

    def seconds_left(self) -> float:
        return self.end_time - self.clock()

    def reached(self) -> bool:
        """Whether to stop now: the time left would not cover the margin, a save and the next
        step, as long as the longest so far."""
        return self.seconds_left() <= self.margin_s + self.longest_step_s + self.longest_save_s


def job_deadline(margin_s: float, env: Mapping[str, str] | None = None,
                 squeue: Callable[[str], str] | None = None) -> Optional[Deadline]:
    """The :class:`Deadline` of this SLURM job, or None. One process per node asks (local rank
    0, or a process outside torchrun); the loop makes the decision collective."""
    env = os.environ if env is None else env
    if env.get("LOCAL_RANK", "0") != "0":
        return None
    end = slurm_end_time(env, squeue)
    return None if end is None else Deadline(end, margin_s)
