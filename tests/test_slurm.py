"""Snakemake → SLURM plumbing on a real (throwaway) cluster: `.ci/slurm/up.sh`.

Runs a toy workflow through `snakemake --profile slurm/ci` whose two rules take their
resources and launch command from the real ``Plan`` (the same functions behind
rules/pretrain.smk), with ``-m webssl_repro.cli`` swapped for a tiny all-reduce probe:

* a single-node job (``gpu=1``, ``torchrun --standalone``) must see one fake GPU;
* a 2-node × 1-process job (``mpi=srun``, ``nodes=2``, ``tasks=2``, ``tasks_per_gpu=0``,
  ``gres=gpu:1``, ``--ntasks-per-node=1``; ``srun … torchrun --rdzv-backend c10d``) must
  form one gloo group of world size 2 spanning n1 and n2, ranks from torchrun's env.

The same probe runs through ``webssl-repro launch``'s submitit job (2 nodes, rendezvous on
the first node of the job's node list).

When the mini pretraining stage is wired, ``run_profile(workflow_dir, <mini target>)``
on the real workflow replaces the toy one.
"""
from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, snakemake
from webssl_repro.config import load_config
from webssl_repro.workflow import Plan

pytestmark = pytest.mark.slurm

PROFILE = "slurm/ci"
SINGLE_RUN, MULTI_RUN = "dino2b-full1b-224", "dino1b-full1b-224"
# What slurm/ci can schedule on 2 CPUs / 4 GB per fake node; the layout keys (gpu,
# nodes, tasks, gres, mpi, …) stay exactly as Plan computes them.
SMALL = {"runtime": 5, "mem_mb": 500, "cpus_per_task": 1}


def _cluster_ready() -> str | None:
    """None when sinfo shows two responding nodes, otherwise why the test is skipped."""
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH: start the CI cluster with .ci/slurm/up.sh (as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix", "-o", "%N"], capture_output=True,
                             text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    nodes = set(out.stdout.split())
    if out.returncode != 0 or len(nodes) < 2:
        return f"sinfo reports {len(nodes)} idle node(s), need 2: run .ci/slurm/up.sh ({out.stderr.strip()})"
    return None


_SKIP = _cluster_ready()
if _SKIP:
    pytestmark = [pytest.mark.slurm, pytest.mark.skip(reason=_SKIP)]


def run_profile(workdir: Path, *targets: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`snakemake --profile slurm/ci TARGETS` in ``workdir`` (which holds a copy of slurm/)."""
    return snakemake(workdir, "--profile", PROFILE, *targets, timeout=timeout)


@pytest.fixture
def cancel_leftovers(tmp_path: Path):
    """Cancel any job still queued from this test's scratch dir (e.g. after a timeout),
    so a hung rendezvous cannot block the cluster for later tests."""
    yield
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True)
    ids = [line.split()[0] for line in out.stdout.splitlines()
           if len(line.split()) == 2 and line.split()[1].startswith(str(tmp_path))]
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _test_plan() -> Plan:
    """The mini config with 1 GPU per node, and the 1b size spread over two nodes."""
    config = copy.deepcopy(load_config(REPO / "config" / "mini.yaml"))
    config["resources"]["gpus_per_node"] = 1
    config["resources"]["mem_mb_per_node"] = SMALL["mem_mb"]
    config["resources"]["nodes"] = {**config["resources"]["nodes"], "1b": 2, "2b": 1}
    return Plan(config)


PROBE = '''
"""All-reduce over gloo with the rank layout torchrun exports (never SLURM_JOB_NUM_NODES)."""
import json, os, socket, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
rank, world = dist.get_rank(), dist.get_world_size()
assert (rank, world) == (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
me = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
      "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
ranks = [None] * world
dist.all_gather_object(ranks, me)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"world_size": world, "sum": value.item(), "ranks": ranks,
                   "master_addr": os.environ["MASTER_ADDR"]}, f)
dist.destroy_process_group()
'''


def _probe_launcher(plan: Plan, run: str, port: int) -> str:
    launcher = plan.launcher(run)
    assert launcher.endswith("-m webssl_repro.cli"), launcher
    return launcher.replace("-m webssl_repro.cli", "-m allreduce_probe").replace(":29500", f":{port}")


def _rule(name: str, resources: dict, launcher: str) -> str:
    res = "".join(f"        {k}={v!r},\n" for k, v in resources.items())
    return (f"rule {name}:\n"
            f"    output: '{name}.json'\n"
            f"    log: 'logs/{name}.log'\n"
            f"    threads: 1\n"
            f"    resources:\n{res}"
            f"    shell: {launcher + ' {output} > {log} 2>&1'!r}\n\n")


@pytest.fixture
def toy_workflow(tmp_path: Path) -> Path:
    plan = _test_plan()
    single = {**plan.pretrain_resources(SINGLE_RUN).snakemake(), **SMALL}
    multi = {**plan.pretrain_resources(MULTI_RUN).snakemake(), **SMALL}
    # The same layout rules/pretrain.smk hands to the plugin for a multi-node run.
    assert single["gpu"] == 1 and "nodes" not in single
    assert {k: multi[k] for k in ("mpi", "nodes", "tasks", "tasks_per_gpu", "gres", "slurm_extra")} == {
        "mpi": "srun", "nodes": 2, "tasks": 2, "tasks_per_gpu": 0, "gres": "gpu:1",
        "slurm_extra": "--ntasks-per-node=1 --exclusive"}
    snakefile = ("rule all:\n    input: 'single.json', 'multi.json'\n\n"
                 + _rule("single", single, _probe_launcher(plan, SINGLE_RUN, 0))
                 + _rule("multi", multi, _probe_launcher(plan, MULTI_RUN, _free_port())))
    (tmp_path / "Snakefile").write_text(snakefile)
    (tmp_path / "allreduce_probe.py").write_text(textwrap.dedent(PROBE))
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    return tmp_path


def test_single_and_multinode_jobs(toy_workflow: Path, cancel_leftovers):
    result = run_profile(toy_workflow, "all")
    logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted((toy_workflow / "logs").rglob("*.log")))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    # Each job went through sbatch (not a local fallback).
    assert "Job " in result.stderr and "has been submitted with SLURM jobid" in result.stderr, result.stderr

    single = json.loads((toy_workflow / "single.json").read_text())
    assert single["world_size"] == 1 and single["sum"] == 1.0
    cvd = single["ranks"][0]["cuda_visible_devices"]
    assert cvd in ("0", "1"), f"gpu=1 should expose one fake GPU, got CUDA_VISIBLE_DEVICES={cvd!r}"

    _check_multi(json.loads((toy_workflow / "multi.json").read_text()))


def _check_multi(result: dict) -> None:
    assert result["world_size"] == 2
    assert result["sum"] == 1.0 + 2.0  # ranks contribute rank + 1
    assert sorted(r["rank"] for r in result["ranks"]) == [0, 1]
    assert {r["local_rank"] for r in result["ranks"]} == {0}  # one process per node
    assert sorted(r["node"] for r in result["ranks"]) == ["n1", "n2"], result["ranks"]
    # gres=gpu:1 is per node: each node's torchrun sees its own single GPU.
    assert all(r["cuda_visible_devices"] in ("0", "1") for r in result["ranks"]), result["ranks"]


def test_submitit_launch_two_nodes(tmp_path: Path):
    from webssl_repro import launch

    (tmp_path / "allreduce_probe.py").write_text(textwrap.dedent(PROBE))
    job = launch.submit(_test_plan(), MULTI_RUN, executor="slurm", folder=tmp_path / "submitit",
                        partition="debug", workdir=tmp_path, program=["-m", "allreduce_probe", "multi.json"],
                        check_inputs=False, rdzv_port=_free_port())
    try:
        deadline = time.monotonic() + 180
        while not job.done() and time.monotonic() < deadline:  # done: every task wrote its result
            time.sleep(1)
    finally:
        if not job.done():  # a hung rendezvous must not hold the cluster for later tests
            job.cancel(check=False)
    logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted((tmp_path / "submitit").glob("*_log.*")))
    assert job.done(), f"job {job.job_id} not done after 180 s:\n{logs}"
    assert job.results() == [0, 0], logs  # one result per node (task)
    _check_multi(json.loads((tmp_path / "multi.json").read_text()))
