"""pytest plugin: the xdist workers other than the one running the DINO probe run yield it CPU.

The suite's critical path is the probe run (``helpers_mini.PROBE_SAMPLES``, ~800 CPU-s of
trainer and ~500 of its dataloader worker on CI's 2 cores), which starts first on one worker
(``--dist loadgroup``) while the others run everything else. At equal priority the trainer got
under half a core, and the suite ended when it did: ~1,700 s of its ~1,800. A worker lowers
its own priority (``os.nice``) before its first test outside ``CRITICAL_GROUP``, so that the
probe run takes what it needs of the cores and the rest of the suite the remainder; the
probe's worker does the same once its group is done. Processes started by a test inherit
the priority; nothing is changed outside pytest-xdist workers.
"""
from __future__ import annotations

import os

import pytest

CRITICAL_GROUP = "dino_probe"
#: 5 steps of nice: Linux's scheduler weighs such a process ~1/3 of one at the default
YIELD_BY = 5

_lowered = False


def group_of(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    if marker is None:
        return None
    return str(marker.args[0] if marker.args else marker.kwargs.get("name"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _lowered
    if _lowered or not os.environ.get("PYTEST_XDIST_WORKER") or group_of(item) == CRITICAL_GROUP:
        return
    os.nice(YIELD_BY)
    _lowered = True
