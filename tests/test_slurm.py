"""Snakemake → SLURM on a real, throwaway cluster (CI: `.ci/slurm/up.sh` before, `down.sh` after).

The real workflow (``test_mini_pretraining_through_slurm``): a small mini config
(``ci_config``: 1 fake GPU per node, ViT-"1B" spread over two nodes, a 128-image corpus,
4 Web-DINO steps) through ``snakemake --profile slurm/ci``. The data rule, a 2-node ×
1-process gloo run (rule ``pretrain_multinode``: ``srun … torchrun --rdzv-backend c10d``)
and a 1-node ``gpu=1`` run (rule ``pretrain_single``: ``torchrun --standalone``) all
become SLURM jobs. The 2-node job must span n1 and n2 with world size 2, and its weights
must equal those of the same command run locally by ``torchrun --standalone`` with the
same world size and no SLURM. With a recipe its trainer rejects, the 2-node run fails twice
on two nodes, and its third attempt goes out as a one-node job that the guard refuses.

A toy workflow keeps the plumbing checks that the trainer cannot report: its two rules
take their resources and launch command from the real ``Plan`` with ``-m webssl_repro.cli``
swapped for a tiny all-reduce probe:

* a single-node job (``gpu=1``, ``torchrun --standalone``) must see one fake GPU;
* a 2-node × 1-process job (``mpi=srun``, ``nodes=2``, ``tasks=2``, ``tasks_per_gpu=0``,
  ``gres=gpu:1``, ``--ntasks-per-node=1``; ``srun … torchrun --rdzv-backend c10d``) must
  form one gloo group of world size 2 spanning n1 and n2, ranks from torchrun's env;
* either job, preempted (SIGTERM to its steps) while its ranks take 40 s to save, must last
  until they have saved.

The same probe runs through ``webssl-repro launch``'s submitit job (2 nodes, rendezvous on
the first node of the job's node list).

Without a responding two-node cluster every test here is skipped, naming the reason.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import REPO, snakemake, user_env
from webssl_repro.config import load_config, validate_config
from webssl_repro.workflow import Plan

pytestmark = pytest.mark.slurm

PROFILE = "slurm/ci"
SINGLE_RUN, MULTI_RUN = "dino2b-full2b-224", "dino1b-full2b-224"
# What slurm/ci can schedule on 2 CPUs / 4 GB per fake node; the layout keys (gpu,
# nodes, tasks, gres, mpi, …) stay exactly as Plan computes them.
SMALL = {"runtime": 5, "mem_mb": 500, "cpus_per_task": 1}


def _cluster_ready() -> str | None:
    """None when sinfo shows two responding nodes, otherwise why the test is skipped.

    Busy nodes count (another test's job may hold them while this module is imported)."""
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH: start the CI cluster with .ci/slurm/up.sh (as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc,comp", "-o", "%N"], capture_output=True,
                             text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    nodes = set(out.stdout.split())
    if out.returncode != 0 or len(nodes) < 2:
        return (f"sinfo reports {len(nodes)} responding node(s), need 2: run .ci/slurm/up.sh "
                f"({out.stderr.strip()})")
    return None


_SKIP = _cluster_ready()
if _SKIP:
    pytestmark = [pytest.mark.slurm, pytest.mark.skip(reason=_SKIP)]


def run_profile(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`snakemake --profile slurm/ci ARGS` in ``workdir`` (which holds a copy of slurm/):
    targets, and options such as ``--configfile``. The partition comes from the environment,
    as slurm/profile.yaml's does, which every job's own parse then runs without (the jobstep
    plugin strips SLURM_*). ``timeout`` guards against a hang, not a slow machine: beside
    ``make test``'s other workers the retry test took 268-347 s, as the plugin's status polls
    back off by 10 s a round while its jobs fail."""
    return snakemake(workdir, "--profile", PROFILE, *args, timeout=timeout, environ={"SLURM_PARTITION": "debug"})


@pytest.fixture
def cancel_leftovers(tmp_path: Path):
    """Cancel any job still queued from this test's scratch dir (e.g. after a timeout),
    so a hung rendezvous cannot block the cluster for later tests."""
    yield
    ids = _jobs_from(tmp_path)
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def _jobs_from(directory: Path) -> list[str]:
    """The ids of the queued jobs that run in ``directory`` or below it (squeue's working dir)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=20).stdout
    rows = [line.split() for line in out.splitlines() if len(line.split()) == 2]
    return [job for job, workdir in rows if workdir == str(directory) or workdir.startswith(f"{directory}/")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the real workflow
CI_SCALE = "slurmci"
CI_ITEM = "table7"  # needs only data, pretrain and classic; its runs include both below
CI_MULTI, CI_SINGLE = "dino1b-full2b-224", "dino2b-full2b-224"
CI_SAMPLES, CI_STEPS = 128, 4  # 4 steps of mini Web-DINO's global batch of 32
RDZV_PORT = 29500  # Plan.launcher's c10d port; both fake nodes are this one host
# SLURM and the local check run the same program with the same world size, gloo and
# inputs, so they agree bit for bit in practice (measured: max |Δ| = 0.0); 1e-5 leaves
# room only for intra-op thread counts (the SLURM task has no OMP_NUM_THREADS, a
# 2-process torchrun sets 1). The tolerance is small beside what training changes:
# with ci_config's lr and teacher momentum, 4 steps move the encoder by ~1e-2 and the
# student by more, so unseeded weights (init differing per run) fail this check.
WEIGHTS_ATOL = 1e-5


def ci_config() -> dict:
    """config/mini.yaml cut down to a seconds-long CI run, with real (fake-GPU) resources:
    ViT-"1B" on 2 nodes × 1 GPU (rule pretrain_multinode), ViT-"2B" on 1 node × 1 GPU."""
    config = copy.deepcopy(load_config(REPO / "config" / "mini.yaml"))
    config.update(scale=CI_SCALE, stages=["data", "pretrain", "classic"], items=[CI_ITEM])
    config["labels"]["samples"]["2b"] = CI_SAMPLES
    config["data"]["corpus"].update(n_images=128, shard_size=64)
    config["pretrain"]["train"] = {**config["pretrain"].get("train", {}), "checkpoint_every": 2,
                                   "log_every": 1, "strategy": "ddp"}
    # Short schedules for 4 steps; a larger lr and a fast-following EMA teacher so that
    # the exported encoder (the teacher's backbone) moves well beyond WEIGHTS_ATOL.
    config["pretrain"]["dino"].update(warmup_steps=1, warmup_teacher_temp_steps=2, freeze_last_layer_steps=1,
                                      base_lr=0.05, momentum_teacher=0.5, final_momentum_teacher=0.5)
    config["resources"].update(gpus_per_node=1, mem_mb_per_node=1000, max_runtime_min=60,
                               nodes={**config["resources"]["nodes"], "1b": 2, "2b": 1})
    validate_config(config, "ci_config()")
    return config


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a past run is fine
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _submitted_jobs(stderr: str) -> dict[str, list[tuple[str, Path]]]:
    """rule -> [(SLURM job id, job log)] from the plugin's 'has been submitted' lines."""
    jobs: dict[str, list[tuple[str, Path]]] = {}
    for job_id, log in re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", stderr):
        rule = re.search(r"/rule_([A-Za-z0-9_]+)/", log)
        assert rule, f"no rule in the job log path {log}"
        jobs.setdefault(rule.group(1), []).append((job_id, Path(log)))
    return jobs


def _slurm_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -d`` fields (finished jobs stay visible: MinJobAge=300 in up.sh)."""
    out = subprocess.run(["scontrol", "show", "job", "-d", "-o", job_id], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def _hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return sorted(out.stdout.split())


def _cli_args(job_log: Path) -> list[str]:
    """What the job ran after ``-m webssl_repro.cli`` (its printed shell command, up to the
    redirection; the checkpoint guard runs before it)."""
    line = next((ln for ln in job_log.read_text().splitlines() if ln.startswith("Shell command: ")), None)
    assert line is not None, f"no 'Shell command:' line in {job_log}"
    argv = shlex.split(line[len("Shell command: "):])
    i = argv.index("webssl_repro.cli")
    assert argv[i - 1] == "-m", argv
    rest = argv[i + 1:]
    return rest[:next(k for k, tok in enumerate(rest) if tok in (">", ">>"))]


def _replace_option(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _load_weights(run_dir: Path) -> tuple[dict, dict]:
    import torch
    from safetensors.torch import load_file

    return (load_file(str(run_dir / "encoder.safetensors")),
            torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True))


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()),
               default=0.0)


def test_mini_pretraining_through_slurm(workflow_dir: Path, cancel_leftovers):
    from webssl_repro.train import attempts
    from webssl_repro.train.checkpoint import read_pointer

    config = ci_config()
    plan = Plan(config)
    multi, single = plan.pretrain_resources(CI_MULTI), plan.pretrain_resources(CI_SINGLE)
    assert CI_MULTI in plan.runs_by_layout(multinode=True), plan.runs
    assert CI_SINGLE in plan.runs_by_layout(multinode=False), plan.runs
    assert (multi.nodes, multi.gpus, single.nodes, single.gpus) == (2, 2, 1, 1)
    assert config["pretrain"]["dino"]["batch_size"] % multi.gpus == 0  # the trainer's requirement
    if _port_in_use(RDZV_PORT):
        pytest.fail(f"port {RDZV_PORT} (the 2-node job's c10d rendezvous, Plan.launcher) is in use on this "
                    "host, where both fake nodes live: the job would join a foreign store")
    (workflow_dir / "ci.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"{plan.run_dir(run)}/encoder.safetensors" for run in (CI_MULTI, CI_SINGLE)]

    result = run_profile(workflow_dir, *targets, "--configfile", "ci.yaml")
    logs = "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in sorted((workflow_dir / "logs").rglob("*.log")))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-6000:]}\n{logs}"

    # Every job went through sbatch, the 2-node run as one job spanning n1 and n2.
    jobs = _submitted_jobs(result.stderr)
    assert {"shards", "pretrain_multinode", "pretrain_single"} <= jobs.keys(), result.stderr
    (multi_id, multi_log), = jobs["pretrain_multinode"]
    (single_id, _), = jobs["pretrain_single"]
    job = _slurm_job(multi_id)
    assert job["JobState"] == "COMPLETED", job
    assert (job["NumNodes"], job["NumTasks"]) == ("2", "2"), job
    assert _hostnames(job["NodeList"]) == ["n1", "n2"], job
    assert re.fullmatch(r"gres[:/]gpu:1", job.get("TresPerNode", "")), job  # one fake GPU per node
    job = _slurm_job(single_id)
    assert (job["JobState"], job["NumNodes"]) == ("COMPLETED", "1"), job
    assert job.get("JOB_GRES") == "gpu:1", job  # gpu=1: one fake GPU in all

    # The trainer formed one group of two ranks (one per srun task), and one of one.
    assert read_pointer(workflow_dir / plan.checkpoint_dir(CI_MULTI))["world_size"] == 2
    assert read_pointer(workflow_dir / plan.checkpoint_dir(CI_SINGLE))["world_size"] == 1
    done = f"pretrain {CI_MULTI}: step {CI_STEPS}, {CI_SAMPLES} samples seen, complete=True"
    train_log = (workflow_dir / "logs" / CI_SCALE / "pretrain" / f"{CI_MULTI}.log").read_text()
    assert train_log.count(done) == 2, train_log[-4000:]  # each rank's CLI finished
    # The job's guard recorded attempt 1 with its SLURM job id, and rank 0 alone its end.
    ledger = attempts.read(workflow_dir / plan.checkpoint_dir(CI_MULTI))
    assert [(r["event"], r.get("attempt"), r.get("job"), r.get("outcome")) for r in ledger] == [
        ("start", 1, multi_id, None), ("end", None, multi_id, "complete")], ledger
    assert len(ledger[0]["invocation"]) == 32, ledger  # the submitter's id reached the job (sbatch's env)
    for run in (CI_MULTI, CI_SINGLE):
        prov = json.loads((workflow_dir / plan.run_dir(run) / "provenance.json").read_text())
        assert (prov["steps"], prov["samples_seen"]) == (CI_STEPS, CI_SAMPLES), prov

    # The same command, locally: 2 processes of torchrun --standalone, no srun, no SLURM.
    args = _cli_args(workflow_dir / multi_log)
    config_json = args[args.index("--config-json") + 1]
    assert config_json == plan.run_config_json(CI_MULTI)
    local = workflow_dir / "local"
    args = _replace_option(args, "--out", str(local / "run"))
    args = _replace_option(args, "--checkpoints", str(local / "checkpoints"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", str(multi.gpus), "-m", "webssl_repro.cli", *args],
                          cwd=workflow_dir, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert read_pointer(local / "checkpoints")["world_size"] == 2

    slurm_encoder, slurm_state = _load_weights(workflow_dir / plan.run_dir(CI_MULTI))
    local_encoder, local_state = _load_weights(local / "run")
    encoder_diff = _max_abs_diff(slurm_encoder, local_encoder)
    state_diff = _max_abs_diff(slurm_state, local_state)  # student, teacher and heads
    assert encoder_diff <= WEIGHTS_ATOL, f"encoder: SLURM vs local max |Δ| = {encoder_diff:.3g}"
    assert state_diff <= WEIGHTS_ATOL, f"state.pt: SLURM vs local max |Δ| = {state_diff:.3g}"


def test_a_retry_to_be_refused_is_submitted_small(workflow_dir: Path, cancel_leftovers):
    """The 2-node run with a recipe its trainer rejects and ``--retries 2``: attempts 1 and 2
    fail on the run's two nodes; the submitter, reading their ledger, sends attempt 3 as
    ``REFUSED_ATTEMPT`` (one node, no GPU, ten minutes, not exclusive), and its guard refuses."""
    from webssl_repro.resources import REFUSED_ATTEMPT
    from webssl_repro.train import attempts

    config = ci_config()
    # TrainConfig rejects beta2 >= 1 at the trainer's start (the schema leaves betas to it; a
    # negative clip or a warm-up longer than the run stops the dry run itself)
    config["pretrain"]["dino"]["betas"] = [0.9, 1.5]
    plan = Plan(config)
    (workflow_dir / "ci.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    target = f"{plan.run_dir(CI_MULTI)}/encoder.safetensors"

    result = run_profile(workflow_dir, target, "--configfile", "ci.yaml", "--retries", "2")
    assert result.returncode != 0, result.stderr[-4000:]
    runs = _submitted_jobs(result.stderr)["pretrain_multinode"]
    assert len(runs) == 3, result.stderr[-6000:]
    jobs = [_slurm_job(job_id) for job_id, _ in runs]
    assert [(j["JobState"], j["NumNodes"]) for j in jobs] == [("FAILED", "2"), ("FAILED", "2"), ("FAILED", "1")], jobs
    assert all(re.fullmatch(r"gres[:/]gpu:1", j.get("TresPerNode", "")) for j in jobs[:2]), jobs
    refused = jobs[2]
    assert "gpu" not in refused.get("TresPerNode", "") + refused.get("JOB_GRES", ""), refused
    assert refused["TimeLimit"] == f"00:{REFUSED_ATTEMPT['runtime']:02d}:00", refused
    assert refused["OverSubscribe"] != "NO", refused  # not --exclusive
    ledger = attempts.read(workflow_dir / plan.checkpoint_dir(CI_MULTI))
    starts = [i for i, r in enumerate(ledger) if r["event"] == "start"]
    ended = [(ledger[i]["attempt"], ledger[i]["job"], [r["outcome"] for r in ledger[i + 1:j] if r["event"] == "end"])
             for i, j in zip(starts, [*starts[1:], len(ledger)])]
    # every rank that fails records it (torchrun may kill rank 0 first): one or two per 2-node attempt
    assert [(a, job, set(ends)) for a, job, ends in ended] == [
        (1, runs[0][0], {"failed"}), (2, runs[1][0], {"failed"}), (3, runs[2][0], {"refused"})], ledger
    assert [len(ends) for _, _, ends in ended][2] == 1 and all(1 <= len(e) <= 2 for _, _, e in ended[:2]), ledger
    log = (workflow_dir / "logs" / CI_SCALE / "pretrain" / f"{CI_MULTI}.log").read_text()
    assert "not starting attempt 3" in log and "betas must be in [0, 1)" in log, log[-3000:]


# ------------------------------------------------------------------ the toy workflow
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


def _rule(name: str, resources: dict, launcher: str,
          shell: str = "{resources.launcher} {output} > {log} 2>&1") -> str:
    """As the pretrain rules: the launcher is a string resource (not a param) the shell reads."""
    res = "".join(f"        {k}={v!r},\n" for k, v in {**resources, "launcher": launcher}.items())
    return (f"rule {name}:\n"
            f"    output: '{name}.json'\n"
            f"    log: 'logs/{name}.log'\n"
            f"    threads: 1\n"
            f"    resources:\n{res}"
            f"    shell: {shell!r}\n\n")


# As the pretrain rules hand Snakemake's attempt to their guard, and keep a rule's retries
# out of the job itself (Plan.pretrain_retries): a job that fails on its first attempt and
# succeeds on its retry, each a job of its own.
RETRIED_RULE = """rule retried:
    output: 'retried.txt'
    retries: 0 if workflow.remote_exec else 1
    resources:
        attempt=lambda w, attempt: attempt,
    shell: 'echo {resources.attempt} $SLURM_JOB_ID >> attempts.txt; test {resources.attempt} -ge 2 && touch {output}'
"""


@pytest.fixture
def toy_workflow(tmp_path: Path) -> Path:
    plan = _test_plan()
    single = {**plan.pretrain_resources(SINGLE_RUN).snakemake(), **SMALL}
    multi = {**plan.pretrain_resources(MULTI_RUN).snakemake(), **SMALL}
    # The same layout rules/pretrain.smk hands to the plugin for a multi-node run.
    assert single["gpu"] == 1 and single["nodes"] == 1
    assert {k: multi[k] for k in ("mpi", "nodes", "tasks", "tasks_per_gpu", "gres", "slurm_extra")} == {
        "mpi": "srun", "nodes": 2, "tasks": 2, "tasks_per_gpu": 0, "gres": "gpu:1",
        "slurm_extra": "--ntasks-per-node=1 --exclusive"}
    # As rules/common.smk: torchrun comes from this venv, activated or not.
    snakefile = ("from webssl_repro.workflow import put_cli_on_path\nput_cli_on_path()\n\n"
                 "rule all:\n    input: 'single.json', 'multi.json', 'retried.txt'\n\n"
                 + _rule("single", single, _probe_launcher(plan, SINGLE_RUN, 0))
                 + _rule("multi", multi, _probe_launcher(plan, MULTI_RUN, _free_port()))
                 + RETRIED_RULE)
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

    (first, job1), (second, job2) = (line.split() for line in (toy_workflow / "attempts.txt").read_text().splitlines())
    assert (first, second) == ("1", "2") and job1 != job2, (job1, job2)


def _check_multi(result: dict) -> None:
    assert result["world_size"] == 2
    assert result["sum"] == 1.0 + 2.0  # ranks contribute rank + 1
    assert sorted(r["rank"] for r in result["ranks"]) == [0, 1]
    assert {r["local_rank"] for r in result["ranks"]} == {0}  # one process per node
    assert sorted(r["node"] for r in result["ranks"]) == ["n1", "n2"], result["ranks"]
    # gres=gpu:1 is per node: each node's torchrun sees its own single GPU.
    assert all(r["cuda_visible_devices"] in ("0", "1") for r in result["ranks"]), result["ranks"]


# A rank that needs SAVE_S seconds once signalled, as a multi-billion-parameter save does: more
# than torchrun's own 30 s before it kills its workers (resources.TORCHRUN_SHUTDOWN_TIMEOUT_S).
SAVE_S = 40
SLOW_SAVE = f'''
import json, signal, sys, time
import torch.distributed as dist

signalled = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: signalled.append(time.time()))
dist.init_process_group("gloo")
mark = f"{{sys.argv[1]}}.rank{{dist.get_rank()}}"
open(mark + ".started", "w").close()
while not signalled:
    time.sleep(0.1)
time.sleep({SAVE_S})
with open(mark + ".saved", "w") as f:
    json.dump({{"signalled": signalled[0], "saved": time.time()}}, f)
sys.exit(75)  # as train.Preempted
'''
# rules/pretrain.smk's command: its guard, then the launcher in the shell's place (`exec`).
PRETRAIN_SHAPE = "echo guard > {log} && exec {resources.launcher} {output} >> {log} 2>&1"


@pytest.mark.parametrize("run", [SINGLE_RUN, MULTI_RUN])
def test_a_preempted_job_lasts_until_its_ranks_have_saved(tmp_path: Path, run: str, cancel_leftovers):
    """SIGTERM to the job's steps, as SLURM's preemption sends it at the start of the partition's
    GraceTime (``scancel --signal=TERM`` without ``--full``: on this Slurm, partition_prio
    preemption signals the steps and not the batch script alike). Each rank, saving for SAVE_S
    seconds, must finish inside the job: torchrun must not kill it after its own 30 s, and the
    shell between the job's Snakemake and torchrun must not die of the signal and end the job
    (on a cgroup cluster, the end of a job kills what it left running). Only the one-node job's
    shell is in the signalled step (a multi-node job's runs in the batch step, with its snakemake)."""
    plan = _test_plan()
    layout = plan.pretrain_resources(run)
    res, ranks = {**layout.snakemake(), **SMALL}, layout.nodes
    launcher = plan.launcher(run).replace("-m webssl_repro.cli", "-m slow_save").replace(":29500", f":{_free_port()}")
    (tmp_path / "Snakefile").write_text("from webssl_repro.workflow import put_cli_on_path\nput_cli_on_path()\n\n"
                                        + _rule("job", res, launcher, PRETRAIN_SHAPE))
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    with open(tmp_path / "snakemake.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", PROFILE, "job.json"], cwd=tmp_path,
                                env=user_env({"SLURM_PARTITION": "debug"}), stdout=subprocess.DEVNULL, stderr=err)
    try:
        limit = time.monotonic() + 300
        while len(list(tmp_path.glob("job.json.rank*.started"))) < ranks:
            assert proc.poll() is None and time.monotonic() < limit, (tmp_path / "snakemake.err").read_text()[-4000:]
            time.sleep(1)
        jobs = _jobs_from(tmp_path)
        assert len(jobs) == 1, f"the job's ranks started, but squeue shows {jobs} for this workflow"
        job_id, = jobs
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=20)
        proc.wait(timeout=SAVE_S + 240)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "logs" / "job.log").read_text()
    assert proc.returncode != 0, log  # the job ends with the ranks' exit 75, for a retry to resume
    saved = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("job.json.rank*.saved"))]
    assert len(saved) == ranks, f"{len(saved)} of {ranks} ranks saved:\n{log}"
    job = _slurm_job(job_id)
    ended = datetime.strptime(job["EndTime"], "%Y-%m-%dT%H:%M:%S").timestamp()
    for rank in saved:
        assert ended >= int(rank["saved"]), (job["EndTime"], rank, log)  # the job outlived the save


def test_trainer_reads_its_job_end_time(tmp_path: Path, cancel_leftovers):
    """``train.deadline.slurm_end_time`` inside a real job with ``--time=7``: the job's end is
    7 minutes after its start, read from ``SLURM_JOB_END_TIME`` where SLURM exports it and from
    ``squeue`` without it, and the two agree."""
    out = tmp_path / "end.json"
    probe = textwrap.dedent(f"""
        import json, os, time
        from webssl_repro.train.deadline import slurm_end_time
        json.dump({{"now": time.time(), "end": slurm_end_time(),
                   "end_squeue": slurm_end_time({{"SLURM_JOB_ID": os.environ["SLURM_JOB_ID"]}}),
                   "exported": os.environ.get("SLURM_JOB_END_TIME")}}, open({str(out)!r}, "w"))
    """)
    (tmp_path / "probe.py").write_text(probe)
    sub = subprocess.run(["sbatch", "--parsable", "--time=7", "--partition=debug", "--ntasks=1",
                          "--mem=200", f"--chdir={tmp_path}", f"--output={tmp_path}/job.log",
                          f"--wrap={shlex.quote(sys.executable)} probe.py"],
                         capture_output=True, text=True, timeout=30)
    assert sub.returncode == 0, sub.stderr
    limit = time.monotonic() + 120
    while not out.exists() and time.monotonic() < limit:
        time.sleep(1)
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert out.exists(), f"job {sub.stdout.strip()} wrote nothing in 120 s:\n{log}"
    time.sleep(0.5)  # json.dump then close: let the write finish
    got = json.loads(out.read_text())
    left = got["end"] - got["now"]
    assert 7 * 60 - 90 < left <= 7 * 60 + 1, got  # started at most 90 s before the probe ran
    assert abs(got["end_squeue"] - got["end"]) <= 1.0, got  # squeue's local time read back right


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
