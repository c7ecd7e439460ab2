"""Launching 2-rank gloo workers under torchrun from a test, as the workflow launches them."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

SRC = Path(__file__).parents[1] / "src"


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command that starts ``nproc`` local ranks of ``args`` (a script, or ``-m module``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def worker_env() -> dict[str, str]:
    """This environment minus any rank variables, one thread per rank, the package importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def rerun_if_aborted(proc: subprocess.CompletedProcess, rerun: Callable[[], subprocess.CompletedProcess],
                     what: str) -> subprocess.CompletedProcess:
    """One fresh rerun when a rank aborted (SIGABRT); a second abort, or any other failure, stays.

    Seen in CI under load, never on an idle machine: a gloo rank ends with "terminate called
    without an active exception", a C++ thread torn down while joinable.
    """
    if proc.returncode != 0 and "Signal 6 (SIGABRT)" in proc.stdout + proc.stderr:
        warnings.warn(f"{what}: a rank aborted (SIGABRT); rerunning once:\n" + proc.stderr[-1500:])
        return rerun()
    return proc
