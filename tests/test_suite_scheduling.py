"""The suite's own scheduling: `make test` runs pytest-xdist with `--dist loadgroup`, and the
tests that share one long session fixture (the 8192-step DINO probe run, the CI SLURM cluster)
carry one `xdist_group`, so that one worker runs them while the others run the rest. pytest
9.2 broke that for pytest-xdist 3.8 (the group no longer reaches the scheduler): both workers
then waited on the probe run's file lock for ~20 minutes of every CI run. The other workers
then yield the probe run CPU (``suite_priority``)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from suite_priority import CRITICAL_GROUP, YIELD_BY


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "test_groups.py").write_text(textwrap.dedent("""
        import os, time
        import pytest

        GROUP = pytest.mark.xdist_group("probe")

        @GROUP
        @pytest.mark.parametrize("k", range(3))
        def test_grouped(k):
            time.sleep(0.2)
            with open("workers.txt", "a") as f:
                f.write(f"grouped {os.environ['PYTEST_XDIST_WORKER']}\\n")

        @pytest.mark.parametrize("k", range(3))
        def test_free(k):
            time.sleep(0.2)
            with open("workers.txt", "a") as f:
                f.write(f"free {os.environ['PYTEST_XDIST_WORKER']}\\n")
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
                           "-p", "no:cacheprovider", "test_groups.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = [line.split() for line in (tmp_path / "workers.txt").read_text().splitlines()]
    grouped = {w for kind, w in workers if kind == "grouped"}
    assert len(workers) == 6 and len(grouped) == 1, workers


def test_workers_outside_the_critical_group_yield_it_cpu(tmp_path):
    """The group's tests run first on their worker at the session's priority; every other test,
    on any worker, runs YIELD_BY nice steps lower, and so do its child processes."""
    (tmp_path / "test_priority.py").write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        import pytest

        def record(kind):
            child = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True, text=True)
            with open("nice.txt", "a") as f:
                f.write(f"{{kind}} {{os.environ['PYTEST_XDIST_WORKER']}} {{os.nice(0)}} {{child.stdout.strip()}}\\n")

        @pytest.mark.xdist_group("{CRITICAL_GROUP}")
        @pytest.mark.parametrize("k", range(3))
        def test_critical(k):
            record("critical")

        @pytest.mark.parametrize("k", range(4))
        def test_other(k):
            record("other")
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    base = os.nice(0)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
                           "-p", "no:cacheprovider", "-p", "suite_priority", "test_priority.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split() for line in (tmp_path / "nice.txt").read_text().splitlines()]
    assert sorted({(kind, int(mine), int(child)) for kind, _, mine, child in rows}) == [
        ("critical", base, base), ("other", base + YIELD_BY, base + YIELD_BY)], rows
    assert len(rows) == 7 and len({w for kind, w, *_ in rows if kind == "critical"}) == 1
