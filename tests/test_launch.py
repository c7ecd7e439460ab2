"""webssl_repro.launch: the submitit job for one run matches the Snakemake rule's job."""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from webssl_repro import launch
from webssl_repro.config import load_config
from webssl_repro.workflow import Plan

BIG_RUN = "dino7b-full8b-224"  # 32 nodes × 8 GPUs in config/paper.yaml
SMALL_RUN = "dino1b-full2b-224"


@pytest.fixture(scope="module")
def paper() -> dict:
    return load_config(REPO / "config" / "paper.yaml")


@pytest.fixture
def one_node_plan(paper) -> Plan:
    """paper.yaml with ViT-1B on one node of 8 GPUs (the paper grid has no 1-node run)."""
    config = copy.deepcopy(paper)
    config["resources"]["nodes"] = {**config["resources"]["nodes"], "1b": 1}
    return Plan(config)


def _rule_torchrun(plan: Plan, run: str, node: str, job_id: str) -> list[str]:
    """The torchrun part of the rule's launcher with the shell's $(hostname)/$SLURM_JOB_ID filled in."""
    launcher = plan.launcher(run).replace("$(hostname)", node).replace("$SLURM_JOB_ID", job_id)
    return shlex.split(launcher[launcher.index("torchrun") + len("torchrun"):])


def test_32_node_parameters_and_command(paper):
    plan = Plan(paper)
    res = plan.pretrain_resources(BIG_RUN)
    assert res.nodes == 32 and res.gpus == 256
    spec = launch.launch_spec(plan, BIG_RUN, workdir="/repo")
    params = launch.executor_parameters(spec, partition="gpu", account="proj")
    assert params == {
        "name": BIG_RUN, "nodes": 32, "tasks_per_node": 1, "gpus_per_node": 8,
        "cpus_per_task": res.cpus_per_task, "mem_gb": res.mem_mb / 1024, "timeout_min": res.runtime_min,
        "slurm_signal_delay_s": launch.SIGNAL_DELAY_S, "slurm_partition": "gpu", "slurm_account": "proj",
        "slurm_srun_args": ["--cpus-per-task", str(res.cpus_per_task)], "slurm_exclusive": True,
    }
    cmd = launch.torchrun_command(spec, first_node="gpu-017", job_id="4242")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == [*_rule_torchrun(plan, BIG_RUN, "gpu-017", "4242"), *launch.pretrain_args(spec)]
    assert cmd[3:13] == ["--nnodes", "32", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "gpu-017:29500", "--rdzv-id", "4242"]
    # The rule's arguments, relative to the repo root where the job runs.
    assert launch.pretrain_args(spec) == [
        "pretrain", "--run-name", BIG_RUN, "--config-json", plan.run_config_json(BIG_RUN),
        "--settings-json", plan.pretrain_settings_json(BIG_RUN), "--out", "results/paper/runs/" + BIG_RUN,
        "--checkpoints", "results/paper/checkpoints/" + BIG_RUN,
        "--data", "results/paper/data/shards/manifest.json"]
    assert json.loads(spec.config_json)["run"] == BIG_RUN
    with pytest.raises(ValueError, match="first node"):
        launch.torchrun_command(spec)  # a multi-node rendezvous needs the job's nodes


def test_1_node_parameters_and_command(one_node_plan):
    spec = launch.launch_spec(one_node_plan, SMALL_RUN, workdir="/repo")
    params = launch.executor_parameters(spec)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 1, 8)
    assert "slurm_exclusive" not in params  # one node's share: 8 GPUs, like the rule's gpu=8
    assert "slurm_partition" not in params and "slurm_account" not in params
    cmd = launch.torchrun_command(spec)
    assert cmd[3:] == [*_rule_torchrun(one_node_plan, SMALL_RUN, "-", "-"), *launch.pretrain_args(spec)]
    assert cmd[3:8] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "8"]


def test_sbatch_script(paper, tmp_path, monkeypatch):
    """What submitit would sbatch for the 32-node run (no Slurm needed: srun detection is faked)."""
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    spec = launch.launch_spec(Plan(paper), BIG_RUN, workdir="/repo")
    ex = launch.make_executor("slurm", tmp_path, spec.max_timeouts)
    ex.update_parameters(**launch.executor_parameters(spec, partition="gpu"))
    text = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--nodes=32", "--ntasks-per-node=1", "--gpus-per-node=8", f"--cpus-per-task={spec.cpus_per_task}",
                 f"--mem={spec.mem_mb}MB", f"--time={spec.timeout_min}", "--signal=USR2@120",
                 "--partition=gpu", f"--job-name={BIG_RUN}"):
        assert f"#SBATCH {line}\n" in text, (line, text)
    assert "#SBATCH --exclusive\n" in text
    # the step gets the node's CPUs (the rule's launcher asks for them the same way)
    assert f"--cpus-per-task {spec.cpus_per_task} python -u -m submitit" in text, text
    # the rule's retries for its 25-job chain (test_workflow_cluster)
    assert ex._executor.max_num_timeout == spec.max_timeouts == Plan(paper).pretrain_retries() == 32


def test_checkpoint_requeues_the_same_job(one_node_plan):
    job = launch.PretrainJob(launch.launch_spec(one_node_plan, SMALL_RUN, workdir="/repo"), ["x.py"])
    delayed = job.checkpoint()
    assert isinstance(delayed.function, launch.PretrainJob)
    assert (delayed.function.spec, delayed.function.program) == (job.spec, job.program)
    assert delayed.args == () and delayed.kwargs == {}


PROGRAM = """
import json, os, signal, sys
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "shutdown": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"),
           "usr2_ignored": signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN}, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_runs_the_command_through_submitit(executor, tmp_path):
    """A CPU-only mini run through submitit, with a stand-in program for the trainer."""
    plan = Plan(load_config(REPO / "config" / "mini.yaml"))
    run = "dino1b-full2b-224"
    (tmp_path / "fake_train.py").write_text(PROGRAM)
    job = launch.submit(plan, run, executor=executor, folder=tmp_path / "submitit", workdir=tmp_path,
                        program=["fake_train.py", "out.json"], check_inputs=False)
    deadline = time.monotonic() + 120
    while executor == "local" and not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.result() == 0
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["cwd"] == str(tmp_path) and got["argv"] == ["out.json"] and got["usr2_ignored"]
    assert got["shutdown"] == "600"  # a torchrun there gives its ranks the rule's time to save
    assert (tmp_path / plan.run_dir(run)).is_dir() and (tmp_path / plan.checkpoint_dir(run)).is_dir()


def test_failing_command_fails_the_job(tmp_path):
    plan = Plan(load_config(REPO / "config" / "mini.yaml"))
    (tmp_path / "boom.py").write_text("raise SystemExit(3)\n")
    # local, not debug: the debug executor opens pdb on a failure.
    job = launch.submit(plan, "dino1b-full2b-224", executor="local", folder=tmp_path / "s", workdir=tmp_path,
                        program=["boom.py"], check_inputs=False)
    with pytest.raises(Exception, match="exit status 3"):
        job.result()


STOPS_ONCE = """
import sys
from pathlib import Path
from webssl_repro.train import attempts
checkpoints, runs = sys.argv[1], Path(sys.argv[2])
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
if len(runs.read_text()) == 1:  # the first job: a checkpoint before the time limit, exit 75
    attempts.finish(checkpoints, "preempted", cause="time limit")
    raise SystemExit(75)
attempts.finish(checkpoints, "complete")
"""


def test_a_stop_before_the_time_limit_requeues_the_job(tmp_path):
    """The trainer's own deadline stop (exit 75, recorded in the ledger) comes before submitit's
    notice; the job requeues through submitit's handler and the requeued job finishes the run."""
    plan = Plan(load_config(REPO / "config" / "mini.yaml"))
    run = "dino1b-full2b-224"
    (tmp_path / "stops_once.py").write_text(STOPS_ONCE)
    job = launch.submit(plan, run, executor="local", folder=tmp_path / "s", workdir=tmp_path,
                        program=["stops_once.py", plan.checkpoint_dir(run), "runs.txt"], check_inputs=False)
    assert job.result() == 0
    assert (tmp_path / "runs.txt").read_text() == "xx"
    from webssl_repro.train import attempts

    assert [r["outcome"] for r in attempts.read(tmp_path / plan.checkpoint_dir(run))] == ["preempted", "complete"]


@pytest.mark.parametrize("records", [[("preempted", "time limit"), ("failed", None)], [("preempted", "signal")], []])
def test_a_failure_or_a_signal_is_not_requeued(tmp_path, records):
    """Exit 75 beside a rank's failure, after a signal (scancel's; SLURM requeues its own
    preemptions), or without the ledger's record, fails the job."""
    plan = Plan(load_config(REPO / "config" / "mini.yaml"))
    run = "dino1b-full2b-224"
    record = "; ".join(f"attempts.finish(sys.argv[1], {o!r}, cause={c!r})" for o, c in records)
    (tmp_path / "fails.py").write_text(f"import sys\nfrom webssl_repro.train import attempts\n{record}\n"
                                       "raise SystemExit(75)\n")
    job = launch.submit(plan, run, executor="local", folder=tmp_path / "s", workdir=tmp_path,
                        program=["fails.py", plan.checkpoint_dir(run)], check_inputs=False)
    with pytest.raises(Exception, match="exit status 75"):
        job.result()


@pytest.mark.parametrize("run,parent", [("dino2b-heavy2b-224", None), ("dino7b-full8b-518", "dino7b-full8b-224")])
def test_pretrain_args_are_what_the_cli_accepts(paper, run, parent):
    """The job's arguments parse as the real ``webssl-repro pretrain`` command line, with the
    rule's inputs: the data manifest (a filter result for a heavy run), and a hi-res run's
    parent state.pt."""
    from webssl_repro.cli import build_parser

    plan = Plan(paper)
    spec = launch.launch_spec(plan, run, workdir="/repo")
    args = build_parser().parse_args(launch.pretrain_args(spec))
    assert args.run == run and args.data == plan.pretrain_inputs(run)["data"]
    assert args.data == [plan.filter_stats("heavy") if "heavy" in run else plan.data_manifest("shards")]
    assert args.parent == (None if parent is None else f"{plan.run_dir(parent)}/state.pt")
    assert launch.missing_inputs(plan, spec) == [*args.data, *([args.parent] if parent else [])]


def test_refusals(paper, tmp_path):
    plan = Plan(paper)
    with pytest.raises(ValueError, match="32 nodes"):
        launch.submit(plan, BIG_RUN, executor="local", folder=tmp_path)
    # a run Snakemake has no rule for is not submitted (a misspelt 7B would take 32 nodes)
    with pytest.raises(ValueError, match="clip3b-heavy8b-518 is not a run of this config's items.*dino1b-full2b-224"):
        launch.submit(plan, "clip3b-heavy8b-518", executor="debug", folder=tmp_path, check_inputs=False)
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {SMALL_RUN: {"checkpoint": f"facebook/webssl-{SMALL_RUN}", "path": "/ckpt/x"}}
    with pytest.raises(ValueError, match=f"{SMALL_RUN} is imported from a released checkpoint"):
        launch.launch_spec(Plan(cfg), SMALL_RUN)
    mini = Plan(load_config(REPO / "config" / "mini.yaml"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        launch.submit(mini, "dino1b-full2b-224", executor="debug", folder=tmp_path, workdir=tmp_path)


def test_cli_parser(monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    parser = argparse.ArgumentParser()
    launch.add_launch_parser(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["launch", "--run", BIG_RUN, "--configfile", "config/paper.yaml", "my.yaml"])
    assert (args.run, args.executor, args.folder, args.partition, args.account) == (
        BIG_RUN, "slurm", "logs/submitit", "gpu", None)
    assert args.configfile == [Path("config/paper.yaml"), Path("my.yaml")]  # an overlay, as snakemake takes it
    assert args.func is launch._launch
    with pytest.raises(SystemExit):
        parser.parse_args(["launch", "--run", BIG_RUN, "--executor", "chronos"])


def test_launch_merges_config_overlays(monkeypatch, tmp_path):
    """`launch --configfile config/paper.yaml my.yaml` plans with the overlay merged in."""
    overlay = tmp_path / "my.yaml"
    overlay.write_text("resources: {max_runtime_min: 1440}\n")
    seen = {}

    def fake_submit(plan, run, *args, **kwargs):
        seen["plan"] = plan
        raise SystemExit(0)

    monkeypatch.setattr(launch, "submit", fake_submit)
    parser = argparse.ArgumentParser()
    launch.add_launch_parser(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["launch", "--run", BIG_RUN, "--configfile", str(REPO / "config/paper.yaml"),
                              str(overlay)])
    with pytest.raises(SystemExit):
        args.func(args)
    assert seen["plan"].config["resources"]["max_runtime_min"] == 1440
    assert seen["plan"].config["resources"]["gpus_per_node"] == 8  # the rest from config/paper.yaml
