"""The suite's own scheduling: `make test` runs pytest-xdist with `--dist loadgroup`, and the
tests that share one long session fixture (the 8192-step DINO probe run, the CI SLURM cluster)
carry one `xdist_group`, so that one worker runs them while the others run the rest. pytest
9.2 broke that for pytest-xdist 3.8 (the group no longer reaches the scheduler): both workers
then waited on the probe run's file lock for ~20 minutes of every CI run."""
import subprocess
import sys
import textwrap


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
