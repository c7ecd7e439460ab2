"""``webssl-repro launch``: submit ONE pretraining run with submitit, outside Snakemake.

For users who want submitit's requeue-on-preemption (DINOv2's launcher style) for a
long run, or to run a single run by hand. Resources come from the same
``Plan.pretrain_resources`` as rules/pretrain.smk, and the job runs the same command
as the rule: one task per node (submitit's ``srun``), each starting one ``torchrun``
with G processes, which then runs ``webssl_repro.cli pretrain``. Preemption or timeout
requeues the job with the same command, and training resumes from the run's
checkpoint dir (``Plan.checkpoint_dir``), which Snakemake later treats like any other
finished run once its outputs exist.

The trainer stops by itself before the time limit (``train.deadline``: a checkpoint, exit 75,
which torchrun reports as 1), earlier than submitit's notice comes; the job then reads that
stop's cause in the run's attempts ledger and requeues through submitit's own handler, as the
notice would have.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from webssl_repro.resources import TORCHRUN_SHUTDOWN_TIMEOUT_S, TORCHRUN_SHUTDOWN_VAR, chain_retries
from webssl_repro.workflow import Plan

RDZV_PORT = 29500  # the rule's port (Plan.launcher); one rendezvous per job, on its first node
EXECUTORS = ("slurm", "local", "debug")
# USR2 this long before the kill: time for submitit to requeue while training writes
# its periodic checkpoints.
SIGNAL_DELAY_S = 120
#: how long a multi-node job's task waits for rank 0's end record (well inside the notice's lead)
RECORD_WAIT_S = 60.0
#: submitit's preemption / timeout notice (its default, SUBMITIT_PREEMPT_SIGNAL=USR2)
NOTICE = signal.SIGUSR2


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a pretraining job needs, fixed at submission time (pickled into the job)."""

    run: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem_mb: int
    timeout_min: int
    config_json: str
    settings_json: str  # how it runs (log/checkpoint cadence): Plan.pretrain_settings_json
    out: str  # relative to workdir, exactly as the rule passes it
    checkpoints: str
    workdir: str  # absolute: where the job runs (the repo root, like Snakemake)
    data: tuple[str, ...]  # the rule's input: the data manifest (corpus, or a filter result's kept shards)
    parent: str | None  # a hi-res fine-tune's 224 px state.pt
    #: requeues allowed after a *timeout* (submitit requeues preemptions without limit): the
    #: rule's retries for this run's chain of jobs (``resources.chain_retries``)
    max_timeouts: int
    rdzv_port: int = RDZV_PORT

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def launch_spec(plan: Plan, run: str, workdir: str | Path | None = None, rdzv_port: int = RDZV_PORT) -> LaunchSpec:
    """What the pretrain rule would run for ``run``: only a run this config trains (Snakemake
    has no rule for another, and a misspelt name must not become a multi-node job)."""
    if run not in plan.run_ids:
        raise ValueError(plan.not_a_run(run))
    if not plan.trained(run):
        raise ValueError(f"{run} is imported from a released checkpoint (pretrain.run_sources), not trained")
    res = plan.pretrain_resources(run)
    inputs = plan.pretrain_inputs(run)  # what the rule passes as {input.data} and {input.parent}
    return LaunchSpec(
        run=run,
        nodes=res.nodes,
        gpus_per_node=res.gpus // res.nodes,
        cpus_per_task=res.cpus_per_task,
        mem_mb=res.mem_mb,
        timeout_min=res.runtime_min,
        config_json=plan.run_config_json(run),
        settings_json=plan.pretrain_settings_json(run),
        out=plan.run_dir(run),
        checkpoints=plan.checkpoint_dir(run),
        workdir=str(Path(workdir or Path.cwd()).resolve()),
        data=tuple(inputs["data"]),
        parent=inputs.get("parent"),
        max_timeouts=chain_retries(res.jobs),
        rdzv_port=rdzv_port,
    )


def executor_parameters(spec: LaunchSpec, partition: str | None = None,
                        account: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``AutoExecutor.update_parameters``: one task per node."""
    params: dict[str, Any] = {
        "name": spec.run,
        "nodes": spec.nodes,
        "tasks_per_node": 1,  # one torchrun per node; torchrun starts the per-GPU processes
        "gpus_per_node": spec.gpus_per_node or None,  # None: not set (a CPU-only run)
        "cpus_per_task": spec.cpus_per_task,
        # Per node, as with Snakemake's mem_mb; submitit writes a non-integral GB as MB.
        "mem_gb": spec.mem_mb / 1024,
        "timeout_min": spec.timeout_min,
        "slurm_signal_delay_s": SIGNAL_DELAY_S,
        # as the rule's launcher: srun of Slurm 22.05-23.02 does not pass the job's cpus-per-task
        # on to its step, where the ranks and their loader workers would share one CPU
        "slurm_srun_args": ["--cpus-per-task", str(spec.cpus_per_task)],
    }
    if spec.nodes > 1:  # as the rule's slurm_extra: whole nodes, so the rendezvous port is free
        params["slurm_exclusive"] = True
    if partition:
        params["slurm_partition"] = partition
    if account:
        params["slurm_account"] = account
    return params


def pretrain_args(spec: LaunchSpec) -> list[str]:
    """The rule's arguments after the launcher (rules/pretrain.smk, _PRETRAIN_SHELL)."""
    args = ["pretrain", "--run-name", spec.run, "--config-json", spec.config_json,
            "--settings-json", spec.settings_json, "--out", spec.out, "--checkpoints", spec.checkpoints, "--data", *spec.data]
    return args + (["--parent", spec.parent] if spec.parent else [])


def torchrun_command(spec: LaunchSpec, first_node: str | None = None, job_id: str | None = None,
                     program: Sequence[str] | None = None) -> list[str]:
    """The command each node runs; mirrors ``Plan.launcher`` with SLURM's values resolved.

    ``program`` is what python/torchrun runs (default: ``-m webssl_repro.cli pretrain …``,
    the rule's command). ``torchrun`` is invoked as ``python -m torch.distributed.run``
    (the same program) so that the job's interpreter is used even off the venv's PATH.
    """
    program = list(program) if program is not None else ["-m", "webssl_repro.cli", *pretrain_args(spec)]
    if spec.gpus == 0:
        return [sys.executable, *program]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if spec.nodes == 1:
        layout = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(spec.gpus_per_node)]
    else:
        if not first_node or not job_id:
            raise ValueError(f"a {spec.nodes}-node run needs the job's first node and id for its rendezvous")
        layout = ["--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.gpus_per_node),
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first_node}:{spec.rdzv_port}",
                  "--rdzv-id", job_id]
    return [*torchrun, *layout, *program]


def first_node() -> str:
    """The first host of this SLURM job: where every node's torchrun meets (c10d store)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("not inside a SLURM job: SLURM_JOB_NODELIST is unset")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        import submitit

        out = list(submitit.JobEnvironment().hostnames)  # its own parser of the node list
    if not out:
        raise RuntimeError(f"no hosts in SLURM node list {nodelist!r}")
    return out[0]


def _ignore_usr2() -> None:
    # Slurm signals every process of the step. USR2 (preemption/timeout notice) is for
    # submitit's handler in the parent, which requeues; torchrun and the trainers would
    # otherwise die on it at once instead of training until the actual kill.
    signal.signal(NOTICE, signal.SIG_IGN)


def stopped_at_time_limit(checkpoints: str | Path, seen: int, wait_s: float = RECORD_WAIT_S) -> bool:
    """Whether the attempt that writes the ledger's records after the first ``seen`` stopped for
    the job's time limit (``Preempted.cause``; checkpoint saved) and no rank failed. A stop on a
    signal is not: scancel's, or a preemption SLURM requeues itself. Rank 0 writes the record,
    maybe on another node whose torchrun ends later: up to ``wait_s`` for an end record."""
    import time

    from webssl_repro.train import attempts

    def end_records() -> list[dict]:
        return [r for r in attempts.read(checkpoints)[seen:] if r.get("event") == "end"]

    until = time.monotonic() + wait_s
    while not (ends := end_records()) and time.monotonic() < until:
        time.sleep(2.0)
    if ends and wait_s > 0:  # another node's rank that failed records it as its torchrun ends
        time.sleep(min(5.0, max(0.0, until - time.monotonic())))
        ends = end_records()
    return bool(ends) and all(r.get("outcome") == "preempted" for r in ends) and \
        any(r.get("cause") == "time limit" for r in ends)


class PretrainJob:
    """The callable submitit runs on every node (one task per node)."""

    def __init__(self, spec: LaunchSpec, program: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.program = list(program) if program is not None else None  # tests: a stand-in trainer

    def build_command(self) -> list[str]:
        if self.spec.nodes == 1 or self.spec.gpus == 0:
            return torchrun_command(self.spec, program=self.program)
        return torchrun_command(self.spec, first_node(), os.environ.get("SLURM_JOB_ID"), self.program)

    def __call__(self) -> int:
        from webssl_repro.train import attempts

        workdir = Path(self.spec.workdir)
        for path in (self.spec.out, self.spec.checkpoints):
            (workdir / path).mkdir(parents=True, exist_ok=True)
        seen = len(attempts.read(workdir / self.spec.checkpoints))
        cmd = self.build_command()
        print("launch:", subprocess.list2cmdline(cmd), flush=True)
        env = {**os.environ, TORCHRUN_SHUTDOWN_VAR: str(TORCHRUN_SHUTDOWN_TIMEOUT_S)}  # as the rule's launcher
        proc = subprocess.Popen(cmd, cwd=workdir, preexec_fn=_ignore_usr2, env=env)
        try:
            code = proc.wait()
        finally:
            # submitit's requeue handler exits via SystemExit during wait(): stop torchrun
            # gracefully (it forwards SIGTERM to its workers, and gives them the time to save that
            # it gives them under the rule) rather than orphaning it.
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=TORCHRUN_SHUTDOWN_TIMEOUT_S + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        # on one node rank 0 wrote its end record before torchrun could exit; on several it may be
        # on a node whose torchrun ends later
        wait_s = RECORD_WAIT_S if self.spec.nodes > 1 else 0.0
        if code != 0 and stopped_at_time_limit(workdir / self.spec.checkpoints, seen, wait_s) and self._requeue():
            return code  # another node's task: the first node's requeues the job
        if code != 0:
            raise subprocess.CalledProcessError(code, cmd)
        return code

    @staticmethod
    def _requeue() -> bool:
        """Requeue as submitit does on its notice: its handler calls ``checkpoint`` and requeues
        (``scontrol requeue``, counting a timeout against ``LaunchSpec.max_timeouts``), then
        exits; on other tasks than the first it only logs. The notice itself, due about a step
        later, is ignored from here on, so the handler runs once. False without a handler (the
        debug executor)."""
        handler = signal.getsignal(NOTICE)
        if not callable(handler):
            return False
        print("launch: the trainer stopped for the time limit with a checkpoint; requeueing", flush=True)
        signal.signal(NOTICE, signal.SIG_IGN)
        handler(NOTICE, None)
        return True

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue with the same command: the trainer resumes from ``spec.checkpoints``."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.spec, self.program))


def make_executor(kind: str, folder: str | Path, max_timeouts: int):
    import submitit

    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
    return submitit.AutoExecutor(folder=str(folder), cluster=kind, slurm_max_num_timeout=max_timeouts)


def missing_inputs(plan: Plan, spec: LaunchSpec) -> list[str]:
    """Inputs rules/pretrain.smk would require before this run (data, hi-res parent)."""
    needed = [*spec.data, *([spec.parent] if spec.parent else [])]
    return [p for p in needed if not (Path(spec.workdir) / p).exists()]


def submit(plan: Plan, run: str, executor: str = "slurm", folder: str | Path = "logs/submitit",
           partition: str | None = None, account: str | None = None, workdir: str | Path | None = None,
           program: Sequence[str] | None = None, check_inputs: bool = True, rdzv_port: int = RDZV_PORT):
    """Submit one run; returns the submitit Job. ``program`` replaces ``-m webssl_repro.cli
    pretrain …`` after the launcher (tests); the launcher itself is unchanged."""
    spec = launch_spec(plan, run, workdir, rdzv_port)
    if spec.nodes > 1 and executor != "slurm":
        raise ValueError(f"{run} needs {spec.nodes} nodes: only --executor slurm can run it")
    if check_inputs:
        missing = missing_inputs(plan, spec)
        if missing:
            raise FileNotFoundError(f"{run} needs inputs that do not exist yet (build them with "
                                    f"snakemake first): {', '.join(missing)}")
        # as the rule does before launching: checkpoints of another config or inputs go aside
        from webssl_repro.train.fingerprint import guard_checkpoints, run_fingerprint

        root = Path(spec.workdir)
        parent = str(root / spec.parent) if spec.parent else None
        guard_checkpoints(root / spec.checkpoints,
                          run_fingerprint(json.loads(spec.config_json), [root / d for d in spec.data], parent))
    ex = make_executor(executor, folder, spec.max_timeouts)
    ex.update_parameters(**executor_parameters(spec, partition, account))
    return ex.submit(PretrainJob(spec, program))


def _launch(args: argparse.Namespace) -> int:
    from webssl_repro.config import load_configs

    plan = Plan(load_configs(args.configfile))
    job = submit(plan, args.run, args.executor, args.folder, args.partition, args.account,
                 check_inputs=not args.no_input_check)
    print(f"{args.run}: submitted job {job.job_id} ({args.executor}); logs in {args.folder}")
    if args.wait or args.executor == "debug":  # a debug job only runs when its result is asked for
        job.results()  # one per node; raises with the failing task's traceback
        print(f"{args.run}: finished")
    return 0


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``launch`` on the CLI's subparsers (webssl_repro.cli.build_parser)."""
    p = subparsers.add_parser("launch", help="submit one pretraining run with submitit (outside Snakemake), "
                                             "requeued on preemption")
    p.add_argument("--run", required=True, help="a run name, e.g. dino7b-full8b-224")
    p.add_argument("--configfile", nargs="+", default=[Path("config/paper.yaml")], type=Path,
                   help="one or more config files, each merged over the ones before it (as snakemake's; "
                        "default: config/paper.yaml, the scale SLURM launches)")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm",
                   help="slurm (default): sbatch; local: a subprocess here; debug: in this process")
    p.add_argument("--folder", default="logs/submitit",
                   help="submitit's job files and per-task logs (default: logs/submitit)")
    p.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"),
                   help="default: $SLURM_PARTITION, as in slurm/profile.yaml")
    p.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"),
                   help="default: $SLURM_ACCOUNT, as in slurm/profile.yaml")
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.add_argument("--no-input-check", action="store_true",
                   help="submit even if the run's data/parent inputs are not built yet")
    p.set_defaults(func=_launch)
    return p
