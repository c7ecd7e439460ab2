"""Evaluation jobs that stop at their time limit and resume (evaluate/progress.py): when a job
stops and saves, the VQA probe stopped in training or answering and resumed, state of another
config set aside, and the CLI's exit code and retries."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from helpers_mini import tiny_data  # noqa: F401  (fixture)
from helpers_progress import StopAfter, iterations_run
from test_classic_streaming import DENSE
from test_vqa_probe import TOKENS, VIS_DIM, _exact, _world, answered_batches, tokenizer  # noqa: F401  (fixture)


def test_a_signal_stops_between_parts(tmp_path):
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    with EvalProgress(tmp_path) as progress:
        progress.stop_point("depth")  # nothing asked: goes on
        signal.raise_signal(signal.SIGUSR1)
        with pytest.raises(Preempted, match="SIGUSR1 before depth") as err:
            progress.stop_point("depth")
    assert err.value.exit_code == 75


def test_state_of_another_config_is_set_aside(tmp_path):
    """Set aside with its results, but without its feature files (a function of the old encoder)."""
    from webssl_repro.evaluate.progress import EvalProgress

    settings = {"checkpoint_every_min": 30.0, "stop_margin_s": 300.0}
    directory = tmp_path / "classic"
    first = EvalProgress.open(directory, {"config": "a"}, settings, env={})
    first.files("linear_features").mkdir(parents=True)
    (first.files("linear_features") / "train.f32").write_bytes(bytes(4096))
    first.finish("depth", {"nyud_lin1": 1.0})
    again = EvalProgress.open(directory, {"config": "a"}, settings, env={})
    assert again.result("depth") == {"nyud_lin1": 1.0} and again.files("linear_features").is_dir()
    again = EvalProgress.open(directory, {"config": "b"}, settings, env={})
    assert again.result("depth") is None
    (aside,) = tmp_path.glob("classic.stale-*")
    assert json.loads((aside / "done" / "depth.json").read_text())["value"] == {"nyud_lin1": 1.0}
    assert not (aside / "files").exists()


def test_progress_settings_are_checked():
    from webssl_repro.evaluate.progress import split_settings

    rest, settings = split_settings({"seed": 1, "checkpoint_every_min": 5}, "classic")
    assert rest == {"seed": 1} and settings == {"checkpoint_every_min": 5.0, "stop_margin_s": 300.0}
    with pytest.raises(ValueError, match="evaluate.vqa.stop_margin_s: -1.0"):
        split_settings({"stop_margin_s": -1}, "vqa")


@pytest.mark.parametrize("stop_after", [2, 4, 8, 10], ids=["in-stage-1", "in-stage-2", "in-answering",
                                                       "between-benchmarks"])
def test_vqa_probe_stopped_and_resumed_ends_as_uninterrupted(tokenizer, tmp_path, stop_after):  # noqa: F811
    """Stage 1 has 3 steps and stage 2 has 5; the first benchmark is 3 batches of 2 questions.
    The stop comes after stage-1 step 2, after stage-2 step 2, after the first benchmark's first
    batch, or once it is answered, before the second benchmark."""
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.evaluate.vqa.data import FeatureCache
    from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe, fit_and_evaluate
    from webssl_repro.train import Preempted

    torch.set_num_threads(1)
    cfg = VqaConfig.from_mapping({
        "language_model": "tiny", "tokens": TOKENS, "chat_format": "mini", "lm_hidden": 32, "lm_layers": 1,
        "lm_heads": 4, "max_length": 64, "max_new_tokens": 3, "eval_batch_size": 2,
        "stage1": {"lr": 1e-2, "batch_size": 8, "micro_batch_size": 4, "max_steps": 3, "warmup_ratio": 0.3},
        "stage2": {"lr": 3e-3, "batch_size": 8, "micro_batch_size": 4, "max_steps": 5, "warmup_ratio": 0.3}})
    train, train_feats = _world(20, seed=3)  # 20 samples: the data order spans epochs mid-stage
    test, test_feats = _world(6, seed=4)
    feats = FeatureCache(train_feats.ids + test_feats.ids, torch.cat([train_feats.features, test_feats.features]))
    benchmarks = {"gqa": test, "mmvp": test[:3]}

    def run(progress=None):
        probe = build_probe(cfg, VIS_DIM, tokenizer)
        return probe, fit_and_evaluate(cfg, probe, feats, train[:12], train, benchmarks, _exact, progress=progress)

    whole_probe, whole = run()
    with pytest.raises(Preempted):
        with EvalProgress(tmp_path, checkpoint_every_min=0, deadline=StopAfter(stop_after)) as progress:
            run(progress)
    answered = sorted(p.name for p in (tmp_path / "done").iterdir()) if (tmp_path / "done").exists() else []
    assert answered == (["answers-gqa.json"] if stop_after == 10 else [])
    assert (tmp_path / "answering-gqa.json").exists() == (stop_after == 8)  # 2 of 6 answers saved
    torch.manual_seed(99)
    retry = EvalProgress(tmp_path, checkpoint_every_min=0)
    seen = iterations_run(retry)
    with answered_batches() as calls:
        probe, resumed = run(retry)
    stage2 = [("stage2", k) for k in range(1, 6)]  # the steps the retry trained: none before the stop
    assert [it for it in seen if it[0].startswith("stage")] == {2: [("stage1", 3), *stage2], 4: stage2[2:],
                                                                8: [], 10: []}[stop_after]
    assert [n for n, _ in calls] == {2: [2, 2, 2, 2, 1], 4: [2, 2, 2, 2, 1], 8: [2, 2, 2, 1], 10: [2, 1]}[stop_after]
    assert resumed["benchmarks"] == whole["benchmarks"]
    assert [s["final_loss"] for s in resumed["training"]] == [s["final_loss"] for s in whole["training"]]
    for (name, value), expected in zip(probe.state_dict().items(), whole_probe.state_dict().values()):
        assert torch.equal(value, expected), name
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["answers-gqa.json", "answers-mmvp.json"]


def test_cli_stops_before_the_time_limit_with_exit_75_and_its_retry_finishes(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """`webssl-repro evaluate classic --state`: inside a SLURM job that ends within stop_margin_s
    the job stops at once with exit 75, its state directory stamped; the retry, with time,
    writes the output and removes the directory."""
    import time

    from helpers_stand_ins import save_tiny_encoder
    from webssl_repro.cli import main
    from webssl_repro.evaluate.jobs import state_config
    from webssl_repro.config import config_hash

    encoder = save_tiny_encoder(tmp_path / "encoder.safetensors", depth=4)  # lin.4 needs 4 blocks
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 2}, "depth": {**DENSE["depth"], "iters": 2}}
    out, state = tmp_path / "evals" / "r" / "classic.json", tmp_path / "eval_state" / "evals" / "r" / "classic"
    args = ["evaluate", "classic", "--run", "r", "--encoder", str(encoder), "--eval-json", json.dumps(cfg),
            "--settings-json", json.dumps({"stop_margin_s": 60}), "--data", *map(str, tiny_data.values()),
            "--out", str(out)]  # the state goes beside the evals folder by default
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 30))
    assert main(args) == 75
    stamp = json.loads((state / "fingerprint.json").read_text())
    assert not out.exists() and stamp["kind"] == "classic"
    assert stamp["config"] == config_hash(state_config("classic", cfg)) != config_hash(cfg)
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    assert main(args) == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"in1k_linear", "ade20k_linear", "ade20k_ms",
                                                            "nyud_lin1", "nyud_lin4"}
    assert not state.exists()


def test_only_consecutive_iterations_of_a_part_time_a_step(tmp_path):
    """The gap between two parts (the last one's scoring, the next one's token cache) is not a
    step: counted as one, it would stop every later part hours early."""
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train.deadline import Deadline

    now = [0.0]
    deadline = Deadline(end_time=10_000.0, margin_s=10.0, clock=lambda: now[0])
    progress = EvalProgress(tmp_path, checkpoint_every_min=60, deadline=deadline, clock=lambda: now[0])
    for t, part, done in [(0, "a", 1), (2, "a", 2), (3, "a", 3), (3000, "b", 1), (3004, "b", 2)]:
        now[0] = float(t)
        progress.iteration_done(part, done, 10, lambda d: None)
    assert deadline.longest_step_s == 4.0
    now[0] = 10_000.0 - 10.0 - 4.0 - 1.0
    assert not deadline.reached()
    now[0] += 1.0
    assert deadline.reached()


def test_signals_are_caught_only_where_progress_can_be_saved(tmp_path):
    from webssl_repro.evaluate.progress import EvalProgress

    before = signal.getsignal(signal.SIGTERM)
    with EvalProgress():  # library use, alignment: SIGTERM keeps its default action
        assert signal.getsignal(signal.SIGTERM) is before
    with EvalProgress(tmp_path):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_eval_retries_come_from_the_config_and_are_zero_inside_a_cluster_job():
    from helpers_mini import REPO

    from webssl_repro.config import load_config
    from webssl_repro.workflow import Plan

    paper, mini = Plan(load_config(REPO / "config/paper.yaml")), Plan(load_config(REPO / "config/mini.yaml"))
    assert paper.eval_retries() == 4 and paper.eval_retries(remote=True) == 0
    assert mini.eval_retries() is None  # the profile's


def test_state_dir_only_for_the_workflows_output_layout(tmp_path):
    from webssl_repro.evaluate.progress import state_dir

    results = tmp_path / "results" / "paper"
    assert state_dir(results / "evals" / "r" / "vqa.json", "vqa") == results / "eval_state" / "evals" / "r" / "vqa"
    assert state_dir(results / "controls" / "blind" / "vqa.json", "vqa") == \
        results / "eval_state" / "controls" / "blind" / "vqa"
    assert state_dir(tmp_path / "classic.json", "classic") is None  # a one-off CLI run keeps no progress


def test_atomic_files_follow_the_umask(tmp_path):
    import os

    from webssl_repro.files import write_json

    old = os.umask(0o002)
    try:
        write_json(tmp_path / "d" / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "d" / "x.json").stat().st_mode & 0o777 == 0o664
    assert json.loads((tmp_path / "d" / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.json"]  # no temporary left


def test_every_round_of_answers_is_timed_the_first_included(tmp_path):
    """The first round of a benchmark may be the job's longest piece of work (a long-answer
    benchmark after short ones): the stop decision after it must know its time."""
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.evaluate.vqa.answering import answer_benchmark
    from webssl_repro.train.deadline import Deadline

    now = [0.0]
    deadline = Deadline(end_time=10_000.0, margin_s=0.0, clock=lambda: now[0])
    progress = EvalProgress(tmp_path, checkpoint_every_min=60, deadline=deadline, clock=lambda: now[0])

    class Probe:  # answers a batch in 100 s, then 10 s
        def answer_batch(self, samples, features, max_new_tokens, all_finished=None):
            now[0] += 10.0 if now[0] else 100.0
            return [f"{q}!" for q in samples]

    assert answer_benchmark(Probe(), "gqa", ["a", "b", "c", "d", "e"], None, batch_size=2,
                            progress=progress) == ["a!", "b!", "c!", "d!", "e!"]
    assert deadline.longest_step_s == 100.0


def test_saved_progress_grows_with_every_save(tmp_path):
    from webssl_repro.evaluate.progress import PART_SAVES, EvalProgress, saved_progress

    directory = tmp_path / "classic"
    progress = EvalProgress.open(directory, {"config": "a"}, {"checkpoint_every_min": 30.0, "stop_margin_s": 300.0},
                                 env={}, attempt=1)
    assert saved_progress(directory) == 0  # stamped, one start record: nothing saved yet
    progress.save("depth", 5, lambda d: (d / "state.pt").write_bytes(b"s"))
    assert saved_progress(directory) == 5
    progress.finish("depth", {"nyud_lin1": 1.0})  # its 5 iterations dropped, one finished part
    assert saved_progress(directory) == PART_SAVES
    progress.save("segmentation", 7, lambda d: (d / "state.pt").write_bytes(b"s"))
    assert saved_progress(directory) == PART_SAVES + 7


@pytest.mark.parametrize("saves_in_first", [False, True])
def test_cli_refuses_a_retry_after_attempts_that_failed_without_saving(tmp_path, monkeypatch, capsys, saves_in_first):
    """Two attempts that fail without saving anything refuse the third (exit 1, quoting the
    error); an attempt that saved progress before failing breaks the streak."""
    from webssl_repro import cli
    from webssl_repro.evaluate import jobs
    from webssl_repro.train import attempts

    encoder, data = tmp_path / "encoder.safetensors", tmp_path / "set.json"
    encoder.write_bytes(b"weights")
    data.write_text("{}")
    out, state = tmp_path / "evals" / "r" / "classic.json", tmp_path / "eval_state" / "evals" / "r" / "classic"
    args = ["evaluate", "classic", "--run", "r", "--encoder", str(encoder), "--data", str(data), "--out", str(out)]
    calls = []

    def fails(*_):
        calls.append(1)
        if saves_in_first and len(calls) == 1:  # three iterations of a part saved, then the failure
            (state / "depth.json").write_text(json.dumps({"iteration": 3, "dir": "depth.3"}))
        raise FloatingPointError("loss is nan at iteration 4")

    monkeypatch.setattr(jobs, "_evaluate_metrics", fails)

    monkeypatch.setattr(jobs, "_evaluation_inputs", lambda args: (None, {}, {}))  # no real encoder
    for attempt in (1, 2):
        with pytest.raises(FloatingPointError):
            cli.main([*args, "--attempt", str(attempt)])
    if saves_in_first:
        with pytest.raises(FloatingPointError):  # one futile attempt since the save: retried
            cli.main([*args, "--attempt", "3"])
        assert len(calls) == 3
        return
    assert cli.main([*args, "--attempt", "3"]) == 1 and len(calls) == 2
    err = capsys.readouterr().err
    assert "not starting attempt 3" in err and "FloatingPointError: loss is nan at iteration 4" in err
    assert "0 finished part(s) and 0 saved iterations" in err
    assert [r["outcome"] for r in attempts.read(state) if r["event"] == "end"] == ["failed", "failed", "refused"]


def test_a_failure_on_another_rank_counts(tmp_path, monkeypatch, capsys):
    """Under torchrun a rank other than 0 may fail alone; torchrun then kills rank 0 before it
    can say how the attempt ended, so the failing rank records it."""
    from webssl_repro import cli
    from webssl_repro.evaluate import jobs
    from webssl_repro.train import attempts

    encoder, data = tmp_path / "encoder.safetensors", tmp_path / "set.json"
    encoder.write_bytes(b"weights")
    data.write_text("{}")
    out, state = tmp_path / "evals" / "r" / "vqa.json", tmp_path / "eval_state" / "evals" / "r" / "vqa"
    args = ["evaluate", "vqa", "--run", "r", "--encoder", str(encoder), "--data", str(data), "--out", str(out)]

    def oom(*_):
        raise MemoryError("rank 1: CUDA out of memory")

    monkeypatch.setattr(jobs, "_evaluate_metrics", oom)

    monkeypatch.setattr(jobs, "_evaluation_inputs", lambda args: (None, {}, {}))  # no real encoder
    finish = attempts.finish
    for attempt in (1, 2):
        monkeypatch.setenv("RANK", "0")  # stamps the state, records the start, then is killed
        monkeypatch.setattr(attempts, "finish", lambda *a, **k: None)
        with pytest.raises(MemoryError):
            cli.main([*args, "--attempt", str(attempt)])
        monkeypatch.setattr(attempts, "finish", finish)
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(MemoryError):
            cli.main([*args, "--attempt", str(attempt)])
    monkeypatch.setenv("RANK", "0")
    assert cli.main([*args, "--attempt", "3"]) == 1
    assert "MemoryError: rank 1: CUDA out of memory" in capsys.readouterr().err
    ends = [r["outcome"] for r in attempts.read(state) if r["event"] == "end"]
    assert ends == ["failed", "failed", "refused"]  # rank 1's, then rank 0's refusal


def test_saved_state_depends_on_the_code_defaults_not_on_the_settings(monkeypatch):
    """The state's fingerprint holds the config as the job resolves it: a default written out
    changes nothing, a setting changes nothing, and a changed code default (e.g. answers 32 ->
    512 tokens long) sets the old state aside like a changed config file would."""
    from webssl_repro.evaluate.jobs import state_config
    from webssl_repro.config import config_hash
    from webssl_repro.evaluate import classic as classic_eval

    vqa = {"scale": "mini", "language_model": "tiny", "stage1": {"lr": 1e-3}}
    base = config_hash(state_config("vqa", vqa))
    assert config_hash(state_config("vqa", {**vqa, "max_new_tokens": 512})) == base
    assert config_hash(state_config("vqa", {**vqa, "gradient_checkpointing": True,
                                            "stage1": {"lr": 1e-3, "micro_batch_size": 2}})) == base
    assert config_hash(state_config("vqa", {**vqa, "max_new_tokens": 32})) != base

    classic = {"scale": "mini", "linear": {"epochs": 3}}
    before = state_config("classic", classic)
    assert before["linear"] == {**classic_eval.DEFAULTS["linear"], "epochs": 3}
    assert state_config("classic", {**classic, "batch_size": 8, "workers": 2}) == before
    assert state_config("classic", {**classic, "depth": {"iters": 5}}) != before
    monkeypatch.setitem(classic_eval.DEFAULTS, "linear", {**classic_eval.DEFAULTS["linear"], "epoch_length": 100})
    assert state_config("classic", classic) != before
    assert state_config("classic", classic) == {**before, "linear": {**before["linear"], "epoch_length": 100}}


def test_a_rerun_with_an_unreadable_encoder_leaves_the_saved_state_alone(tiny_data, tmp_path, monkeypatch,
                                                                          capsys):  # noqa: F811
    """The encoder is read before the state is looked at: a cut-short encoder file stops the job
    with its name, and the state it would not match stays, to be resumed with the right file."""
    import time

    from helpers_stand_ins import save_tiny_encoder
    from webssl_repro.cli import main

    encoder = save_tiny_encoder(tmp_path / "encoder.safetensors", depth=4)
    cut = tmp_path / "cut" / "encoder.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(encoder.read_bytes()[:-100])
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 2}, "depth": {**DENSE["depth"], "iters": 2}}
    out, state = tmp_path / "evals" / "r" / "classic.json", tmp_path / "eval_state" / "evals" / "r" / "classic"

    def args(path):
        return ["evaluate", "classic", "--run", "r", "--encoder", str(path), "--eval-json", json.dumps(cfg),
                "--settings-json", json.dumps({"stop_margin_s": 60}), "--data", *map(str, tiny_data.values()),
                "--out", str(out)]

    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 30))
    assert main(args(encoder)) == 75
    stamp = (state / "fingerprint.json").read_text()
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    assert main(args(cut)) == 2
    assert f"{cut}: not a readable safetensors file" in capsys.readouterr().err
    assert (state / "fingerprint.json").read_text() == stamp and not list(state.parent.glob("classic.stale-*"))
    assert main(args(encoder)) == 0 and out.exists()
