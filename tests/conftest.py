import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "config", "environment.yml", "slurm", "report", "results/published")


@pytest.fixture(scope="session", autouse=True)
def child_tmpdir(tmp_path_factory):
    """Child processes' temporary files go under pytest's base temp, which pytest prunes:
    torchrun leaves an empty ``torchelastic_*`` log tree in the temp dir at every launch."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("children"))
    yield
    if before is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    """A copy of the workflow in a scratch directory, so tests never write into the repo."""
    for name in WORKFLOW_FILES:
        src, dst = REPO / name, tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return tmp_path


def user_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user who runs the venv's snakemake without activating the venv (its
    bin dir is not on PATH); ``environ``: variables the user exported."""
    env = {**os.environ, **(environ or {})}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return env


def snakemake(workdir: Path, *args: str, timeout: int = 300, environ: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """Snakemake as a user runs it (``user_env``)."""
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=user_env(environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the
    OpenMP spin-wait of two threads makes small-matrix tests many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
