"""The DAG on a cluster: launchers, job layouts and chains, the SLURM profile, and which jobs
Snakemake runs itself rather than submits."""
import re

import pytest
import yaml

from conftest import REPO, snakemake
from webssl_repro.config import load_config
from webssl_repro.workflow import Plan


@pytest.fixture(scope="module")
def paper_plan():
    return Plan(load_config(REPO / "config/paper.yaml"))


def test_multinode_runs_launch_srun_then_torchrun(paper_plan):
    launcher = paper_plan.launcher("dino7b-full2b-224")
    # one node's torchrun that exits ends the step: the others would wait out NCCL's timeout on it
    assert launcher.startswith("srun --nodes 32 --ntasks 32 --ntasks-per-node 1 --cpus-per-task 64 "
                               "--kill-on-bad-exit=1 env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 "
                               "torchrun --nnodes 32 --nproc-per-node 8")
    resources = paper_plan.pretrain_resources("dino7b-full2b-224").snakemake()
    assert resources["mpi"] == "srun" and resources["tasks_per_gpu"] == 0 and resources["gres"] == "gpu:8"


def test_the_launcher_is_a_resource_that_follows_the_config(workflow_dir):
    """srun / torchrun carry a run's node and GPU counts: as a param they would make every
    finished run out of date when its size is changed (Snakemake reruns a job whose params
    changed, and all evaluations after it), though a run held in memory resumes on any number
    of GPUs. They
    are a resource, which the job's command still reads."""
    for rules in ("pretrain.smk", "evaluate.smk"):
        text = (workflow_dir / "rules" / rules).read_text()
        assert "params.launcher" not in text and "{resources.launcher}" in text, rules
    config = yaml.safe_load((workflow_dir / "config/paper.yaml").read_text())
    config["resources"]["nodes"]["7b"] = 16
    (workflow_dir / "resized.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_dir, "-n", "-p", "results/paper/runs/dino7b-full8b-224/encoder.safetensors",
                     "--configfile", "resized.yaml")
    assert proc.returncode == 0, proc.stderr
    assert ("&& exec srun --nodes 16 --ntasks 16 --ntasks-per-node 1 --cpus-per-task 64 --kill-on-bad-exit=1 "
            "env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun --nnodes 16 --nproc-per-node 8") in proc.stdout


def test_the_jobs_that_save_when_preempted_run_in_their_shells_place(workflow_dir):
    """SLURM's preemption SIGTERM reaches every process of a job step: a shell left waiting on the
    trainer dies of it and the job ends before the save (tests/test_slurm.py shows it on a cluster).
    Each job whose program saves on the signal runs it with ``exec``, and a torchrun among them
    waits TORCHRUN_SHUTDOWN_TIMEOUT_S for its ranks, not its own 30 s."""
    one_node = yaml.safe_load((workflow_dir / "config/paper.yaml").read_text())
    one_node["resources"]["nodes"]["2b"] = 1
    (workflow_dir / "one_node.yaml").write_text(yaml.safe_dump(one_node))
    evals = "results/paper/evals/dino1b-full2b-224"
    proc = snakemake(workflow_dir, "-n", "-p", f"{evals}/vqa.json", f"{evals}/classic.json",
                     "results/paper/runs/dino2b-full2b-224/encoder.safetensors", "--configfile", "one_node.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [ln.split("Shell command: ", 1)[1] for ln in proc.stdout.splitlines()
                if ln.startswith("Shell command: ") and re.search(r" (pretrain --run-name|evaluate [a-z])", ln)]
    torchrun = "env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun"
    expected = {  # each kind of job, how its command starts its program
        " pretrain --run-name dino1b-full2b-224 ": "&& exec srun --nodes 8 --ntasks 8 ",
        " pretrain --run-name dino2b-full2b-224 ": f"&& exec {torchrun} --standalone --nnodes 1 --nproc-per-node 8 ",
        " evaluate vqa_probe ": f"exec {torchrun} --standalone ",
        " evaluate vqa ": f"exec {torchrun} --standalone ",
        " evaluate classic ": "exec webssl-repro evaluate classic ",
    }
    for kind, start in expected.items():
        found = [c for c in commands if kind in c]
        assert len(found) == 1 and start in found[0], (kind, found)
        assert not kind.startswith(" evaluate") or found[0].startswith(start), found[0]
    multinode = next(c for c in commands if " pretrain --run-name dino1b-full2b-224 " in c)
    assert f"--kill-on-bad-exit=1 {torchrun} --nnodes 8 " in multinode, multinode


def test_torchrun_hands_the_vqa_jobs_their_arguments(workflow_dir):
    """The paper VQA jobs run ``torchrun ... -m webssl_repro.cli evaluate vqa_probe|vqa ...``:
    torchrun's own parser must leave every argument after the module to the CLI (it takes
    ``--run`` for an abbreviation of its ``--run-path`` and stops), and the CLI must read them;
    the answering job is handed the folder the training job writes."""
    import shlex

    from torch.distributed.run import get_args_parser

    from webssl_repro.cli import build_parser

    target = "results/paper/evals/dino1b-full2b-224/vqa.json"
    proc = snakemake(workflow_dir, "-n", "-p", target, "--configfile", "config/paper.yaml")
    assert proc.returncode == 0, proc.stderr
    jobs = {}
    for line in [ln for ln in proc.stdout.splitlines() if "torchrun" in ln and "evaluate vqa" in ln]:
        words = shlex.split(line[line.index("torchrun"):].split(" > ")[0])
        args = get_args_parser().parse_args(words[1:])
        assert args.module and args.training_script == "webssl_repro.cli"
        cli = build_parser().parse_args(args.training_script_args)
        jobs[cli.kind] = cli
    probe = "results/paper/evals/dino1b-full2b-224/vqa_probe"
    assert {k: (c.run, c.out.as_posix()) for k, c in jobs.items()} == {
        "vqa_probe": ("dino1b-full2b-224", probe), "vqa": ("dino1b-full2b-224", target)}
    assert jobs["vqa"].probe.as_posix() == probe and jobs["vqa_probe"].probe is None


def test_the_vqa_controls_run_on_the_ranks_they_are_given(workflow_dir):
    """The controls' probe (evaluate.vqa.controls) trains the same 8B LM as a run's: it gets the
    eval node's GPUs and must start its ranks on them, not one process beside 7 idle GPUs."""
    import shlex

    from torch.distributed.run import get_args_parser

    from webssl_repro.cli import build_parser

    (workflow_dir / "controls.yaml").write_text("evaluate: {vqa: {controls: true}}\n")
    gpus = load_config(REPO / "config/paper.yaml")["resources"]["eval_gpus"]
    proc = snakemake(workflow_dir, "-n", "-p", "results/paper/controls/pixels/vqa.json", "--configfile",
                     "config/paper.yaml", "controls.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "evaluate vqa" in ln]
    start = "Shell command: exec env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun "
    assert len(lines) == 2 and all(ln.startswith(start) for ln in lines), lines
    kinds = []
    for line in lines:
        args = get_args_parser().parse_args(shlex.split(line[line.index("torchrun"):].split(" > ")[0])[1:])
        assert args.nproc_per_node == str(gpus) and args.training_script == "webssl_repro.cli"
        cli = build_parser().parse_args(args.training_script_args)
        assert (cli.run, cli.control) == ("control-pixels", "pixels")
        kinds.append(cli.kind)
    assert sorted(kinds) == ["vqa", "vqa_probe"]


def test_the_slurm_profile_keeps_a_result_whose_command_was_only_reworded(workflow_dir, monkeypatch):
    """Updating the checkout over finished runs must not retrain them because a rule's command
    reads differently (Snakemake's ``code`` trigger): the profile leaves that trigger out."""
    monkeypatch.setenv("SLURM_ACCOUNT", "myaccount")
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    args = ("paper/published/tables/table6.md", "--configfile", "config/published.yaml")
    done = snakemake(workflow_dir, "-c1", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    rules = workflow_dir / "rules" / "paper.smk"
    old = 'shell:\n        "webssl-repro render {wildcards.item:q} --scale'
    assert old in rules.read_text()  # render_table's and render_figure's
    rules.write_text(rules.read_text().replace(old, 'shell:\n        "webssl-repro  render {wildcards.item:q} --scale'))
    plain = snakemake(workflow_dir, "-n", *args)
    assert plain.returncode == 0 and "render_table" in plain.stdout and "Code has changed" in plain.stdout, plain.stdout
    profiled = snakemake(workflow_dir, "--profile", "slurm", "-n", *args)
    assert profiled.returncode == 0 and "Nothing to be done" in profiled.stdout + profiled.stderr, profiled.stdout


def test_single_node_layout_uses_gpu_and_standalone_torchrun():
    config = load_config(REPO / "config/paper.yaml")
    config["resources"]["nodes"]["1b"] = 1
    plan = Plan(config)
    assert plan.launcher("dino1b-full2b-224").startswith(
        "env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun --standalone --nnodes 1 --nproc-per-node 8")
    resources = plan.pretrain_resources("dino1b-full2b-224").snakemake()
    assert (resources["gpu"], resources["nodes"]) == (8, 1)  # --gpus=8 alone may span smaller nodes
    assert "dino1b-full2b-224" in plan.runs_by_layout(multinode=False)
    assert re.fullmatch(plan.run_pattern(multinode=True), "dino1b-full2b-224") is None


def test_runs_longer_than_the_time_limit_become_chains_of_jobs():
    """dino7b-full8b-224: 69,994 estimated minutes on 32 nodes; at a 2,880-minute limit that
    is 25 jobs, so the pretrain rules retry 24 times, a quarter more for a run slower than the
    MFU assumed (30), plus 2 for preemptions. The GPU-hours
    count the whole run, not one job; without a limit there is one job and no rule retries."""
    config = load_config(REPO / "config/paper.yaml")
    plan = Plan(config)
    res = plan.pretrain_resources("dino7b-full8b-224")
    assert (res.total_min, res.runtime_min, res.jobs) == (69_994, 2_880, 25)
    assert res.gpu_hours == pytest.approx(256 * 69_994 / 60)
    assert plan.pretrain_retries() == 32
    assert plan.pretrain_retries(remote=True) == 0  # inside a cluster job: the submitter retries
    del config["resources"]["max_runtime_min"]
    uncapped = Plan(config)
    assert uncapped.pretrain_resources("dino7b-full8b-224").runtime_min == 69_994
    assert uncapped.pretrain_resources("dino7b-full8b-224").jobs == 1 and uncapped.pretrain_retries() is None
    assert uncapped.gpu_hours() == pytest.approx(plan.gpu_hours())


def test_slurm_profile_dry_run_works_verbatim(workflow_dir, monkeypatch):
    """As the README says: export the account and partition the profile reads, then dry-run."""
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    args = ("--profile", "slurm", "-n", "all", "--configfile", "config/paper.yaml")
    proc = snakemake(workflow_dir, *args)
    assert proc.returncode != 0 and "slurm_account reads $SLURM_ACCOUNT" in proc.stdout + proc.stderr
    # A job's own parse, as the jobstep plugin runs it: remote, SLURM_* stripped, the profile's
    # default-resources passed on unexpanded. The submitter checked them; the job must not.
    job = ("--mode", "remote", "--default-resources", "slurm_account=$SLURM_ACCOUNT",
           "slurm_partition=$SLURM_PARTITION", "runtime=60", "--cores", "1", "-n",
           "results/paper/data/shards/manifest.json", "--configfile", "config/paper.yaml")
    proc = snakemake(workflow_dir, *job)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    monkeypatch.setenv("SLURM_ACCOUNT", "myaccount")
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    proc = snakemake(workflow_dir, *args)
    assert proc.returncode == 0, proc.stderr


def test_data_jobs_that_only_list_files_are_not_submitted():
    """At paper scale the shard and eval-set manifests and the merge of 2,000 filter parts are
    seconds of work: Snakemake runs them itself, where a cluster would queue each for a node.
    The mini scale's, which generate its data, stay ordinary jobs."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    jobs = ("shards", "in1k", "evalset", "text_filter")
    rules = {"shards": "shards", "in1k": "in1k_data", "evalset": "evalset", "text_filter": "text_filter"}
    for scale, local in (("paper", True), ("mini", False)):
        plan = Plan(load_config(REPO / f"config/{scale}.yaml"))
        assert [plan.lists_only(j) for j in jobs] == [local] * 4, scale
        with SnakemakeApi() as api:
            workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "Snakefile",
                                    config_settings=ConfigSettings(configfiles=[REPO / f"config/{scale}.yaml"]),
                                    workdir=REPO)._workflow
            local_rules = workflow._localrules  # is_local() is True for every rule without an executor plugin
            assert [rules[j] in local_rules for j in jobs] == [local] * 4, scale
            assert "fig8_samples" in local_rules and "text_filter_part" not in local_rules
    config = load_config(REPO / "config/paper.yaml")
    config["data"]["filter"]["parts"] = 1  # one job filters the whole corpus: a GPU job
    assert not Plan(config).lists_only("text_filter")
    with pytest.raises(KeyError, match="no data job 'fig8'"):
        Plan(config).lists_only("fig8")
