"""Snakemake's retries resume a preempted or time-limited run, not one that fails the same way."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from webssl_repro.cli import main
from webssl_repro.train import attempts
from webssl_repro.resources import REFUSED_ATTEMPT
from webssl_repro.train.attempts import FutileRetry, begin, finish, futile_streak, history, predicts_refusal, read


def _checkpoint(ckpt, step):
    (ckpt / "checkpoints").mkdir(parents=True, exist_ok=True)
    (ckpt / "checkpoints" / "latest.json").write_text(json.dumps({"step": step, "complete": False}))


def test_history_pairs_starts_with_ends_and_measures_progress(tmp_path):
    begin(tmp_path, 1)  # no checkpoint yet: step 0
    _checkpoint(tmp_path, 40)
    finish(tmp_path, "preempted")
    begin(tmp_path, 2)
    finish(tmp_path, "failed", ValueError("warm-up 100 steps is longer than the run (4 steps)\nmore"))
    begin(tmp_path, 3)  # killed outright: no end record
    got = history(read(tmp_path), step_now=40, attempt=4)
    assert [(a["attempt"], a["step"], a["progress"], a["outcome"]) for a in got] == [
        (1, 0, 40, "preempted"), (2, 40, 0, "failed"), (3, 40, 0, None)]
    assert got[1]["error"] == "ValueError: warm-up 100 steps is longer than the run (4 steps)"
    assert [a["attempt"] for a in futile_streak(got)] == [2, 3]


def test_a_new_invocation_starts_counting_afresh(tmp_path):
    for attempt in (1, 2):
        begin(tmp_path, attempt)
        finish(tmp_path, "failed", "RuntimeError: boom")
    with pytest.raises(FutileRetry):
        begin(tmp_path, 3)
    begin(tmp_path, 1)  # the user fixed the cause and reran snakemake
    assert [a["attempt"] for a in history(read(tmp_path), 0, 2)] == [1]
    assert [r["outcome"] for r in read(tmp_path) if r["event"] == "end"] == ["failed", "failed", "refused"]


def test_two_futile_attempts_refuse_the_third_with_the_error(tmp_path):
    _checkpoint(tmp_path, 4000)
    begin(tmp_path, 1)
    finish(tmp_path, "failed", FloatingPointError("loss is nan at step 4210"))
    begin(tmp_path, 2)  # one futile attempt may be a bad node: retried
    finish(tmp_path, "failed", FloatingPointError("loss is nan at step 4210"))
    with pytest.raises(FutileRetry) as err:
        begin(tmp_path, 3)
    text = str(err.value)
    assert "not starting attempt 3" in text and "step 4000" in text
    assert "FloatingPointError: loss is nan at step 4210" in text
    with pytest.raises(FutileRetry, match="attempt 3: refused"):  # and every later one
        begin(tmp_path, 4)


@pytest.mark.parametrize("outcome", ["preempted", "complete"])
def test_preemption_or_completion_without_progress_keeps_retrying(tmp_path, outcome):
    _checkpoint(tmp_path, 64)
    begin(tmp_path, 1)
    finish(tmp_path, "failed", "OSError: stale file handle")
    begin(tmp_path, 2)
    finish(tmp_path, outcome)
    assert futile_streak(history(read(tmp_path), 64, 3)) == []
    begin(tmp_path, 3, max_futile=1)  # not refused, even by the strictest limit


def test_progress_breaks_the_streak(tmp_path):
    _checkpoint(tmp_path, 10)
    for attempt in (1, 2, 3, 4):
        begin(tmp_path, attempt)
        if attempt == 2:
            _checkpoint(tmp_path, 20)  # crashed again, but after checkpointing further
        finish(tmp_path, "failed", "RuntimeError: NCCL watchdog timeout")
    got = history(read(tmp_path), 20, 5)
    assert [(a["step"], a["progress"]) for a in got] == [(10, 0), (10, 10), (20, 0), (20, 0)]
    with pytest.raises(FutileRetry, match="attempt 3: failed; attempt 4: failed"):
        begin(tmp_path, 5)


def test_max_futile_is_configurable(tmp_path):
    begin(tmp_path, 1)
    finish(tmp_path, "failed", "ValueError: bad")
    with pytest.raises(FutileRetry):
        begin(tmp_path, 2, max_futile=1)
    with pytest.raises(ValueError, match="attempt 0"):
        begin(tmp_path, 0)


def test_an_invocation_is_an_unbroken_chain_of_attempt_numbers(tmp_path, monkeypatch):
    for attempt in (1, 2):  # an old invocation, both failed
        monkeypatch.setenv("SLURM_JOB_ID", f"7{attempt}")
        begin(tmp_path, attempt)
        finish(tmp_path, "failed", "ValueError: old bug")
    # A new invocation whose attempt 1 died before its guard ran: nothing known, not the old ones.
    assert history(read(tmp_path), 0, 2) == []
    monkeypatch.setenv("SLURM_JOB_ID", "80")
    begin(tmp_path, 2, max_futile=1)
    begin(tmp_path, 2)  # SLURM requeued job 80: attempt 2 again, which counts once
    finish(tmp_path, "failed", "ValueError: new bug")
    got = history(read(tmp_path), 0, 3)
    assert [(a["attempt"], a["job"], a["outcome"]) for a in got] == [(2, "80", "failed")]


def test_another_invocations_attempts_never_count(tmp_path, monkeypatch):
    from webssl_repro.workflow import INVOCATION_VAR, mark_invocation

    environ = {}
    old = mark_invocation(remote=False, environ=environ)
    monkeypatch.setenv(INVOCATION_VAR, old)
    begin(tmp_path, 1)
    finish(tmp_path, "failed", "ValueError: old bug")  # its attempt 2 died before its guard
    new = mark_invocation(remote=False, environ=environ)
    assert new != old and mark_invocation(remote=True, environ=environ) == new  # a job keeps it
    monkeypatch.setenv(INVOCATION_VAR, new)  # its attempt 1 died before its guard too
    assert history(read(tmp_path), 0, 2, invocation=new) == []
    begin(tmp_path, 2)
    finish(tmp_path, "failed", "ValueError: new bug")
    assert [(a["attempt"], a["invocation"]) for a in history(read(tmp_path), 0, 3, invocation=new)] == [(2, new)]
    begin(tmp_path, 3)  # one futile attempt of this invocation: retried


def test_a_requeued_attempt_is_not_its_own_past(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    begin(tmp_path, 1)
    finish(tmp_path, "failed", "RuntimeError: NCCL timeout")
    monkeypatch.setenv("SLURM_JOB_ID", "6")
    begin(tmp_path, 2)  # preempted by SIGKILL; SLURM requeues job 6
    got = history(read(tmp_path), 0, 2, job="6")
    assert [(a["attempt"], a["job"]) for a in got] == [(1, "5")]
    begin(tmp_path, 2, max_futile=2)  # the requeue: one futile attempt before it, not two


def test_attempts_killed_without_a_word_never_refuse_alone(tmp_path):
    for attempt in (1, 2, 3):  # e.g. preempted by SIGKILL while loading the model, each time
        begin(tmp_path, attempt)
    assert len(futile_streak(history(read(tmp_path), 0, 4))) == 3
    begin(tmp_path, 4)  # not refused
    finish(tmp_path, "failed", "RuntimeError: CUDA error: an illegal memory access")
    with pytest.raises(FutileRetry, match="attempt 1: killed without a word"):
        begin(tmp_path, 5)


def test_a_torn_ledger_line_is_skipped(tmp_path, capsys):
    begin(tmp_path, 1)
    with open(tmp_path / attempts.LEDGER, "a") as f:
        f.write('{"event": "end", "outcome": "fai')  # killed mid-write
    assert [r["event"] for r in read(tmp_path)] == ["start"]
    assert "attempts.jsonl:2: not a JSON record, skipped" in capsys.readouterr().err
    begin(tmp_path, 2)  # on a line of its own
    assert [(r["event"], r.get("attempt")) for r in read(tmp_path)] == [("start", 1), ("start", 2)]


def test_guard_checkpoints_cli_refuses_with_exit_1(tmp_path, capsys):
    data = tmp_path / "manifest.json"
    data.write_text('{"shards": ["a.tar"]}')
    ckpt = tmp_path / "ckpt"
    args = ["guard-checkpoints", "--config-json", json.dumps({"run": "dino1b-full2b-224"}),
            "--checkpoints", str(ckpt), "--data", str(data)]
    assert main(args) == 0  # attempt 1 by default
    finish(ckpt, "failed", "KeyError: 'arch'")
    assert main(args + ["--attempt", "2"]) == 0
    finish(ckpt, "failed", "KeyError: 'arch'")
    assert main(args + ["--attempt", "3"]) == 1
    captured = capsys.readouterr()
    assert "=== ckpt: attempt 3 from step 0" in captured.out
    assert "not starting attempt 3" in captured.err and "KeyError: 'arch'" in captured.err
    assert main(args + ["--attempt", "4", "--max-futile-attempts", "3"]) == 1  # the refused 3 counts too
    assert main(args + ["--attempt", "5", "--max-futile-attempts", "5"]) == 0
    assert len([r for r in read(ckpt) if r["event"] == "start"]) == 5
    assert attempts.LEDGER == "attempts.jsonl" and (ckpt / attempts.LEDGER).exists()


def test_a_running_attempt_of_another_job_stops_the_guard_first(tmp_path, monkeypatch, capsys):
    """A snakemake killed on the login node leaves its jobs running; rerun, it submits the same
    run again. The new job's guard refuses while squeue lists the old one as running, before a
    changed config could set the running job's checkpoints aside; a job that has ended, is
    forgotten, or is only pending (it would refuse itself on starting) is no obstacle."""
    from webssl_repro.train import deadline

    data = tmp_path / "manifest.json"
    data.write_text('{"shards": ["a.tar"]}')
    ckpt = tmp_path / "ckpt"

    def args(lr):
        return ["guard-checkpoints", "--config-json", json.dumps({"run": "dino1b-full2b-224", "lr": lr}),
                "--checkpoints", str(ckpt), "--data", str(data)]

    monkeypatch.setenv("SLURM_JOB_ID", "100")
    assert main(args(1.0)) == 0  # job 100's attempt 1: still training, no end record
    started = read(ckpt)[0]["time"]
    before = sorted(p.name for p in ckpt.iterdir())
    asked = []

    def squeue(state, start=started):
        def fields(job, *codes):
            asked.append((job, codes))
            if isinstance(state, BaseException):
                raise state
            return None if state is None else [state, start]
        return fields

    monkeypatch.setenv("SLURM_JOB_ID", "200")
    monkeypatch.setattr(deadline, "squeue_fields", squeue("RUNNING"))
    assert main(args(2.0)) == 1
    err = capsys.readouterr().err
    assert "SLURM job 100 (attempt 1, started " in err and "is still RUNNING on this run" in err
    assert "`scancel 100`" in err and asked == [("100", ("%T", "%S"))]
    assert sorted(p.name for p in ckpt.iterdir()) == before and len(read(ckpt)) == 1  # nothing touched
    import subprocess

    forgotten = subprocess.CalledProcessError(1, "squeue", stderr="slurm_load_jobs error: Invalid job id specified")
    for gone in ("COMPLETING", "PENDING", None, forgotten):
        monkeypatch.setattr(deadline, "squeue_fields", squeue(gone))
        assert attempts.refuse_if_live(ckpt) is None
    # the id reused by a job that started after the record (MaxJobId wrapped around)
    monkeypatch.setattr(deadline, "squeue_fields", squeue("RUNNING", "2999-01-01T00:00:00"))
    attempts.refuse_if_live(ckpt)
    for broken in (FileNotFoundError("squeue"), subprocess.CalledProcessError(1, "squeue", stderr="Unable to "
                                                                              "contact slurm controller")):
        monkeypatch.setattr(deadline, "squeue_fields", squeue(broken))
        with pytest.warns(UserWarning, match="squeue .*SLURM job 100.*starting anyway"):
            attempts.refuse_if_live(ckpt)
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # job 100 requeued: its own start is no other job's
    monkeypatch.setattr(deadline, "squeue_fields", squeue(AssertionError("not asked")))
    attempts.refuse_if_live(ckpt)
    monkeypatch.setenv("SLURM_JOB_ID", "300")
    finish(ckpt, "failed", "RuntimeError: an end without its start (e.g. another rank of a refused job)")
    with pytest.raises(attempts.LiveAttempt):  # it does not close job 100's start
        attempts.refuse_if_live(ckpt, squeue("RUNNING"))
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    finish(ckpt, "preempted")  # job 100 said how it ended: nothing to ask squeue
    monkeypatch.setenv("SLURM_JOB_ID", "200")
    assert main(args(2.0)) == 0
    monkeypatch.delenv("SLURM_JOB_ID")  # outside SLURM: nothing to check
    attempts.refuse_if_live(ckpt)


def test_squeue_is_read_from_the_jobs_own_row(tmp_path, monkeypatch):
    """``squeue --jobs <id>`` of an array's first task (whose id is the array's) lists every
    task: a sibling's row must not answer for it."""
    from webssl_repro.train.deadline import squeue_field, squeue_fields

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n"
                      "printf '1001 RUNNING 2026-12-04T10:00:00\\n1000 PENDING N/A\\n'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert squeue_fields("1000", "%T", "%S") == ["PENDING", "N/A"]
    assert (tmp_path / "args").read_text().split() == ["--noheader", "--jobs", "1000", "--format", "%A", "%T", "%S"]
    assert squeue_fields("42", "%T") is None and squeue_field("42", "%e") == ""
    assert squeue_field("1001", "%T") == "RUNNING"


def test_an_evaluation_job_is_refused_as_well(tmp_path, monkeypatch):
    """A long evaluation (the VQA probe: days) resumes from its directory as pretraining does."""
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import deadline

    settings = {"checkpoint_every_min": 30.0, "stop_margin_s": 300.0}
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    EvalProgress.open(tmp_path / "state", {"config": "a"}, settings, env={}, attempt=1)
    monkeypatch.setenv("SLURM_JOB_ID", "200")
    monkeypatch.setattr(deadline, "squeue_fields", lambda job, *codes: ["RUNNING", "N/A"] if job == "100" else None)
    with pytest.raises(attempts.LiveAttempt, match="SLURM job 100 .*is still RUNNING"):
        EvalProgress.open(tmp_path / "state", {"config": "b"}, settings, env={}, attempt=2)
    assert [r["job"] for r in read(tmp_path / "state")] == ["100"]


def _history(ckpt, outcomes):
    """One attempt per outcome, from 1: 'progress' checkpoints 10 more steps and fails; None
    is an attempt killed without an end record."""
    step = 0
    for attempt, outcome in enumerate(outcomes, 1):
        begin(ckpt, attempt, max_futile=99)
        if outcome == "progress":
            step += 10
            _checkpoint(ckpt, step)
            finish(ckpt, "failed", "RuntimeError: later")
        elif outcome is not None:
            finish(ckpt, outcome, "ValueError: bad" if outcome == "failed" else None)
    return len(outcomes) + 1


@pytest.mark.parametrize("outcomes", [
    [], ["failed"], ["failed", "failed"], ["progress", "failed", "failed"], ["failed", "progress", "failed"],
    [None, None, None], [None, "failed"], ["failed", "preempted"], ["failed", "failed", "preempted", "failed"]])
def test_the_submitter_predicts_exactly_what_the_guard_decides(tmp_path, outcomes):
    attempt = _history(tmp_path, outcomes)
    before = read(tmp_path)
    predicted = predicts_refusal(tmp_path, attempt)
    assert read(tmp_path) == before  # it only reads
    refused = False
    try:
        begin(tmp_path, attempt)
    except FutileRetry:
        refused = True
    assert predicted == refused
    assert predicted == (outcomes[-2:] in (["failed", "failed"], [None, "failed"]))


def test_a_requeued_refusal_is_predicted_inside_its_job(tmp_path, monkeypatch):
    for attempt, job in ((1, "71"), (2, "72")):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        begin(tmp_path, attempt)
        finish(tmp_path, "failed", "ValueError: bad")
    monkeypatch.setenv("SLURM_JOB_ID", "73")
    with pytest.raises(FutileRetry):
        begin(tmp_path, 3)
    # Job 73 requeued: attempt 3 starts again, inside the same job, and is refused again;
    # Snakemake sizes it inside the job (Plan.pretrain_job_resources) knowing the job's id.
    assert predicts_refusal(tmp_path, 3, job="73") and not predicts_refusal(tmp_path, 3)
    with pytest.raises(FutileRetry):
        begin(tmp_path, 3)


def test_plan_submits_a_retry_to_be_refused_small(tmp_path, monkeypatch):
    import copy

    from helpers_mini import mini_config
    from webssl_repro.workflow import INVOCATION_VAR, Plan

    config = copy.deepcopy(mini_config())
    config["resources"].update(gpus_per_node=2, nodes={**config["resources"]["nodes"], "1b": 4})
    plan, run = Plan(config), "dino1b-full2b-224"
    own = plan.pretrain_resources(run).snakemake()
    assert (own["nodes"], own["gres"], own["slurm_extra"]) == (4, "gpu:2", "--ntasks-per-node=1 --exclusive")
    monkeypatch.chdir(tmp_path)  # the checkpoint directory is relative to the workflow's
    monkeypatch.setenv(INVOCATION_VAR, "first")
    _history(Path(plan.checkpoint_dir(run)), ["failed", "failed"])
    assert plan.pretrain_job_resources(run, 1) == {**own, "sized_for_refusal": 0}
    assert plan.pretrain_job_resources(run, 2) == {**own, "sized_for_refusal": 0}
    small = plan.pretrain_job_resources(run, 3)
    assert small == {**REFUSED_ATTEMPT, "sized_for_refusal": 1}
    assert (small["nodes"], small["gres"], small["slurm_extra"], small["runtime"]) == (1, "", "", 10)
    monkeypatch.setenv(INVOCATION_VAR, "second")  # a rerun: its attempt 3 follows its own 1 and 2
    assert plan.pretrain_job_resources(run, 3) == {**own, "sized_for_refusal": 0}
    # Inside the job of a refused attempt 3 that was requeued, the job's id keeps it small.
    monkeypatch.setenv(INVOCATION_VAR, "first")
    monkeypatch.setenv("SLURM_JOB_ID", "93")
    with pytest.raises(FutileRetry):
        begin(Path(plan.checkpoint_dir(run)), 3)
    assert plan.pretrain_job_resources(run, 3)["sized_for_refusal"] == 1
    monkeypatch.setenv("SLURM_JOB_ID", "94")  # the same ledger from another job: a new attempt 3
    assert plan.pretrain_job_resources(run, 3)["sized_for_refusal"] == 0


@pytest.mark.parametrize("kind", ["vqa", "classic"])
def test_plan_submits_an_eval_retry_to_be_refused_small(tmp_path, monkeypatch, kind):
    """The vqa job on a node's 8 GPUs (classic: on one), after two attempts that failed
    without saving anything: its attempt 3 asks for REFUSED_ATTEMPT's values of the same
    resources, as is attempt 4 after it; progress since makes attempt 5 worth its GPUs again."""
    import copy

    from helpers_mini import mini_config
    from webssl_repro.evaluate.progress import SAVED, EvalProgress, state_dir
    from webssl_repro.workflow import INVOCATION_VAR, Plan

    config = copy.deepcopy(mini_config())
    config["resources"].update(gpus_per_node=8, eval_gpus=8, cpus_per_gpu=8, mem_mb_per_node=480000)
    plan, run = Plan(config), "dino1b-full2b-224"
    out = plan.eval_path(run, kind)
    own = plan.eval_resources(kind)
    assert own["gpu"] == {"vqa": 8, "classic": 1}[kind] and own["nodes"] == 1
    monkeypatch.chdir(tmp_path)  # the state directory is relative to the workflow's
    monkeypatch.setenv(INVOCATION_VAR, "first")
    ledger = state_dir(out, kind)
    for attempt in (1, 2):
        begin(ledger, attempt, max_futile=99, measure=SAVED)
        finish(ledger, "failed", "ValueError: bad", measure=SAVED)
    assert plan.eval_job_resources(kind, out, 2) == {**own, "sized_for_refusal": 0}
    small = plan.eval_job_resources(kind, out, 3)
    assert small == {"gpu": 0, "runtime": REFUSED_ATTEMPT["runtime"], "nodes": 1, "mem_mb": REFUSED_ATTEMPT["mem_mb"],
                     "cpus_per_task": 1, "sized_for_refusal": 1}
    assert plan.eval_job_resources("vqa", plan.eval_path("other-run", "vqa"), 3)["sized_for_refusal"] == 0
    with pytest.raises(FutileRetry):
        begin(ledger, 3, measure=SAVED)  # the small attempt 3, refused
    assert plan.eval_job_resources(kind, out, 4)["sized_for_refusal"] == 1
    EvalProgress(ledger).finish("classification", {"in1k_linear": 1.0})  # a part finished by hand since
    assert plan.eval_job_resources(kind, out, 5) == {**own, "sized_for_refusal": 0}


@pytest.mark.xdist_group("snakemake")
def test_snakemake_stops_retrying_a_run_that_fails_without_progress(workflow_dir):
    """The real pretrain rule with ``--retries 3`` and a recipe the trainer rejects at start:
    two attempts run the trainer, the next two are refused by the guard in seconds."""
    import yaml
    from conftest import snakemake
    from helpers_mini import mini_config

    cfg = mini_config()
    cfg["data"]["corpus"].update(n_images=128, shard_size=128)
    cfg["labels"]["samples"]["2b"] = 128  # 4 steps of 32
    # TrainConfig rejects beta2 >= 1 at the trainer's start (the schema leaves betas to it; a
    # negative clip or a warm-up longer than these 4 steps would stop the dry run instead)
    cfg["pretrain"]["dino"].update(warmup_steps=2, betas=[0.9, 1.5])
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/mini/runs/dino1b-full2b-224/encoder.safetensors"
    done = snakemake(workflow_dir, "--cores", "2", target, "--configfile", "tiny.yaml", "--retries", "3", timeout=600)
    assert done.returncode != 0
    ledger = read(workflow_dir / "results/mini/checkpoints/dino1b-full2b-224")
    assert [r["attempt"] for r in ledger if r["event"] == "start"] == [1, 2, 3, 4]
    ends = [r for r in ledger if r["event"] == "end"]
    assert [r["outcome"] for r in ends] == ["failed", "failed", "refused", "refused"]
    assert ends[0]["error"] == "ValueError: train config: betas must be in [0, 1), got [0.9, 1.5]"
    log = (workflow_dir / "logs/mini/pretrain/dino1b-full2b-224.log").read_text()
    # Snakemake empties the log per attempt: the refusal quotes the error the ledger kept.
    assert log.startswith("=== dino1b-full2b-224: attempt 4 from step 0")
    assert "not starting attempt 4" in log and "the last error: ValueError: train config: betas must be in [0, 1)" in log
    # The submitting snakemake sized the two refused attempts as such, from the ledger.
    sized = [(int(a), int(r), int(m)) for a, r, m in re.findall(
        r"attempt=(\d+), sized_for_refusal=(\d), mem_mb=(\d+)", done.stdout + done.stderr)]
    own = cfg["resources"]["mem_mb_per_node"]
    assert sized == [(1, 0, own), (2, 0, own), (3, 1, REFUSED_ATTEMPT["mem_mb"]), (4, 1, REFUSED_ATTEMPT["mem_mb"])]
