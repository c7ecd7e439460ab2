"""A fake job deadline for the tests of jobs that stop at their time limit and resume."""
from __future__ import annotations


class StopAfter:
    """A job deadline reached at its ``n``-th check: ``EvalProgress`` checks after every training
    iteration but a part's last, and at each ``stop_point``."""

    def __init__(self, n: int) -> None:
        self.n, self.checks, self.saves = n, 0, 0

    def record_step(self, seconds: float) -> None:
        pass

    def record_save(self, seconds: float) -> None:
        self.saves += 1

    def reached(self) -> bool:
        self.checks += 1
        return self.checks >= self.n

    def seconds_left(self) -> float:
        return 0.0


def iterations_run(progress) -> list[tuple[str, int]]:
    """The ``(part, done)`` of each iteration ``progress`` is told of from now on: what a job
    computed, so that a test tells a retry that resumed from one that started over."""
    seen: list[tuple[str, int]] = []
    original = progress.iteration_done

    def recorded(part, done, *args, **kwargs):
        seen.append((part, done))
        return original(part, done, *args, **kwargs)

    progress.iteration_done = recorded
    return seen
