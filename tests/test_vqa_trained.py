"""The VQA probe trained by its own job and saved (evaluate/vqa/trained.py), the benchmarks
answered by another: what each job depends on, and the mini path through the CLI (the paper
path: test_vqa_paper.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_mini import REPO, mini_config, tiny_data  # noqa: F401  (fixture)
from helpers_stand_ins import save_tiny_encoder
from test_vqa_probe import TOKENS, VIS_DIM, tokenizer  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models on one thread


def test_answer_keys_leave_the_probe_job_alone():
    """What the workflow compares to rerun a job: a changed answer limit, eval batch or
    benchmark list changes the vqa job's params only; a changed recipe changes both, and so
    does the saved probe's hash, which the answer job checks."""
    from webssl_repro.config import load_config
    from webssl_repro.evaluate.vqa.trained import probe_hash
    from webssl_repro.workflow import Plan

    cfg = load_config(REPO / "config/paper.yaml")
    base = Plan(cfg)
    probe, answers = base.eval_config_json("vqa_probe"), base.eval_config_json("vqa")
    section = cfg["evaluate"]["vqa"]
    for change in ({"max_new_tokens": 64}, {"eval_batch_size": 4}, {"max_new_tokens_by_benchmark": {"mme": 8}},
                   {"data": {**section["data"], "benchmark_limit": 100}}):
        changed = Plan({**cfg, "evaluate": {**cfg["evaluate"], "vqa": {**section, **change}}})
        assert changed.eval_config_json("vqa_probe") == probe, change
        assert changed.eval_config_json("vqa") != answers, change
        assert probe_hash(json.loads(changed.eval_config_json("vqa"))) == probe_hash(json.loads(answers)), change
    for change in ({"stage2": {"lr": 1e-5}}, {"tokens": 256}, {"data": {**section["data"], "exclude_laion": False}}):
        changed = Plan({**cfg, "evaluate": {**cfg["evaluate"], "vqa": {**section, **change}}})
        assert changed.eval_config_json("vqa_probe") != probe, change
        assert probe_hash(json.loads(changed.eval_config_json("vqa"))) != probe_hash(json.loads(answers)), change
    # the probe job's params name no answering key; the settings stay out of both
    assert not {"max_new_tokens", "eval_batch_size"} & set(json.loads(probe))
    assert "benchmarks" not in json.loads(probe)["data"] and "benchmarks" in json.loads(answers)["data"]
    assert base.settings_json("vqa_probe") == base.settings_json("vqa")
    # each job keeps its progress (and its attempts ledger) in its own state directory
    from webssl_repro.evaluate.progress import state_dir

    states = "results/paper/eval_state/evals/r"
    assert state_dir(base.vqa_probe_path("r"), "vqa_probe").as_posix().endswith(f"{states}/vqa_probe")
    assert state_dir(base.eval_path("r", "vqa"), "vqa").as_posix().endswith(f"{states}/vqa")


def test_saved_state_of_the_probe_job_ignores_answer_keys():
    from webssl_repro.evaluate.jobs import state_config
    from webssl_repro.config import config_hash

    vqa = {"scale": "mini", "language_model": "tiny", "stage1": {"lr": 1e-3}}
    base = config_hash(state_config("vqa_probe", vqa))
    assert config_hash(state_config("vqa_probe", {**vqa, "max_new_tokens": 32, "eval_batch_size": 2})) == base
    assert config_hash(state_config("vqa_probe", {**vqa, "stage1": {"lr": 1e-2}})) != base
    assert config_hash(state_config("vqa", {**vqa, "max_new_tokens": 32})) != config_hash(state_config("vqa", vqa))
    # nor on their code defaults, which the resolved config would otherwise carry
    resolved = state_config("vqa_probe", vqa)
    assert not {"max_new_tokens", "max_new_tokens_by_benchmark", "eval_batch_size"} & set(resolved)
    assert state_config("vqa", vqa)["max_new_tokens"] == 512


def test_answers_kept_for_one_trained_probe_are_set_aside_for_another(tmp_path, monkeypatch):
    """The answer job's saved answers are stamped with the probe's record: resumed while it is
    the same, set aside once the probe is trained again."""
    from webssl_repro.cli import main
    from webssl_repro.evaluate import jobs
    from webssl_repro.evaluate.vqa.trained import probe_hash
    from webssl_repro.train import Preempted

    cfg = {"scale": "mini", "language_model": "tiny", "stage1": {"lr": 1e-3}}
    probe = tmp_path / "evals" / "r" / "vqa_probe"
    probe.mkdir(parents=True)

    def train(loss: float) -> None:
        (probe / "probe.json").write_text(json.dumps({"run": "r", "config_hash": probe_hash(cfg), "loss": loss}))

    kept = []

    def answer(args, cfg, progress, *inputs):
        kept.append(progress.result("answers-gqa"))
        progress.finish("answers-gqa", ["B"])
        raise Preempted(0, None, "the time limit")

    monkeypatch.setattr(jobs, "_evaluation_inputs", lambda args: (None, {}, {}))  # no encoder to read
    monkeypatch.setattr(jobs, "_evaluate_metrics", answer)
    encoder = tmp_path / "encoder.safetensors"
    encoder.write_bytes(b"weights")
    args = ["evaluate", "vqa", "--run", "r", "--encoder", str(encoder), "--eval-json", json.dumps(cfg),
            "--probe", str(probe), "--out", str(tmp_path / "evals" / "r" / "vqa.json"), "--attempt", "1"]
    train(1.0)
    assert main(args) == 75 and main(args) == 75
    train(0.25)  # a retrained probe: another probe.json (its stage logs, its time)
    assert main(args) == 75
    assert kept == [None, ["B"], None]
    assert len(list((tmp_path / "eval_state" / "evals" / "r").glob("vqa.stale-*"))) == 1
    # a probe of another run is refused before the kept answers are looked at: none set aside,
    # no attempt recorded
    ledger = (tmp_path / "eval_state" / "evals" / "r" / "vqa" / "attempts.jsonl").read_text()
    assert main([*args[:3], "x", *args[4:]]) == 2 and kept == [None, ["B"], None]
    assert len(list((tmp_path / "eval_state" / "evals" / "r").glob("vqa.stale-*"))) == 1
    assert (tmp_path / "eval_state" / "evals" / "r" / "vqa" / "attempts.jsonl").read_text() == ledger


#: config/mini.yaml's probe on 64 captions, 2 + 3 steps
def _mini_probe_config() -> dict:
    section = {k: v for k, v in mini_config()["evaluate"]["vqa"].items() if k != "controls"}
    return {"scale": "mini", **section, "alignment_samples": 64,
            "stage1": {**section["stage1"], "max_steps": 2}, "stage2": {**section["stage2"], "max_steps": 3}}


def test_mini_vqa_as_two_jobs_equals_one(tiny_data, tmp_path, capsys):  # noqa: F811
    """The mini path of the two jobs: the probe job saves the tiny LM's tokenizer with the
    weights, the answer job reads it and the feature cache the probe job wrote (not recomputed),
    and scores what one process training and answering scores; with another encoder it refuses."""
    from webssl_repro.cli import main
    from webssl_repro.evaluate.features import encoder_fingerprint
    from webssl_repro.models.io import load_encoder

    encoder = save_tiny_encoder(tmp_path / "encoder.safetensors")
    cfg = _mini_probe_config()
    data = ["--data", tiny_data["vqa"], tiny_data["shards"]]

    def evaluate(kind: str, out: Path, *extra: str) -> int:
        return main(["evaluate", kind, "--run", "r", "--encoder", str(encoder), "--eval-json", json.dumps(cfg),
                     *data, "--out", str(out), *extra])

    one = tmp_path / "one" / "evals" / "r" / "vqa.json"
    assert evaluate("vqa", one) == 0
    probe = tmp_path / "two" / "evals" / "r" / "vqa_probe"
    assert evaluate("vqa_probe", probe) == 0
    assert (probe / "tokenizer").is_dir()
    features = tmp_path / "two" / "evals" / "r" / "vqa_work" / "features.safetensors"
    written = features.stat().st_mtime_ns
    two = tmp_path / "two" / "evals" / "r" / "vqa.json"
    assert evaluate("vqa", two, "--probe", str(probe)) == 0
    assert features.stat().st_mtime_ns == written
    whole, split = json.loads(one.read_text()), json.loads(two.read_text())
    assert split["metrics"] == whole["metrics"]
    steps = [[s[k] for k in ("stage", "steps", "final_loss")] for s in whole["details"]["training"]]
    assert [[s[k] for k in ("stage", "steps", "final_loss")] for s in split["details"]["training"]] == steps
    assert [s[:2] for s in steps] == [[1, 2], [2, 3]]
    # the run pretrained again: its probe, trained on the old encoder's tokens, is refused by name
    assert json.loads((probe / "probe.json").read_text())["encoder"] == encoder_fingerprint(load_encoder(encoder)[0])
    encoder = save_tiny_encoder(tmp_path / "encoder.safetensors", depth=2)
    capsys.readouterr()
    assert evaluate("vqa", two, "--probe", str(probe)) == 2
    assert "vqa_probe/probe.json: the probe was trained on the tokens of another encoder" in capsys.readouterr().err
    assert json.loads(two.read_text())["metrics"] == whole["metrics"]  # the last result is kept


def test_a_saved_probe_loads_into_another_init_exactly(tokenizer, tmp_path):  # noqa: F811
    """Every parameter, the LM's frozen ones included, comes back bit for bit into a probe built
    from another seed; the tokenizer is saved beside them."""
    from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe
    from webssl_repro.evaluate.vqa.trained import load_probe, load_tokenizer_of, save_probe

    def probe(seed: int):
        return build_probe(VqaConfig.from_mapping({"language_model": "tiny", "tokens": TOKENS, "chat_format": "mini",
                                                   "lm_hidden": 16, "lm_layers": 1, "lm_heads": 2, "seed": seed}),
                           VIS_DIM, tokenizer)

    trained, fresh = probe(0), probe(1)
    with torch.no_grad():  # as if trained: off its init
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    save_probe(tmp_path / "p", trained, {"config_hash": "x"}, tokenizer=tokenizer)
    pairs = list(zip(trained.state_dict().items(), fresh.state_dict().values()))
    assert not any(torch.equal(value, other) for (_, value), other in pairs)
    load_probe(tmp_path / "p", fresh)
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert load_tokenizer_of(tmp_path / "p").get_vocab() == tokenizer.get_vocab()
    assert json.loads((tmp_path / "p" / "probe.json").read_text()) == {"config_hash": "x", "tokenizer": True}
    for shard in (tmp_path / "p" / "weights").glob("*.distcp"):  # a save cut short
        shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"p: the trained probe's weights cannot be read \(CheckpointException: .+\); "
                                         r"remove the folder, and its vqa_probe job trains the probe again"):
        load_probe(tmp_path / "p", fresh)


def test_a_folder_that_is_no_trained_probe_is_named(tmp_path):
    from webssl_repro.evaluate.vqa.trained import load_tokenizer_of, read_record

    with pytest.raises(FileNotFoundError, match=r"empty: not a trained VQA probe \(no probe.json"):
        read_record(tmp_path / "empty", {})
    with pytest.raises(FileNotFoundError, match="a tiny-LM probe without its tokenizer/ folder"):
        load_tokenizer_of(tmp_path)


def test_a_probe_job_stopped_before_its_save_resumes_without_training(tiny_data, tmp_path):  # noqa: F811
    """The probe is not written in a job's last minutes: the job stops once both stages are
    saved, and its retry saves the probe they trained without training a step, with the
    losses of an uninterrupted job."""
    from helpers_progress import StopAfter, iterations_run
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.evaluate.vqa.stage import train_vqa_probe
    from webssl_repro.models.io import load_encoder
    from webssl_repro.train import Preempted

    encoder, meta = load_encoder(save_tiny_encoder(tmp_path / "encoder.safetensors"))
    manifests, cfg = {"vqa": tiny_data["vqa"], "shards": tiny_data["shards"]}, _mini_probe_config()
    whole = train_vqa_probe(encoder, meta, manifests, cfg, tmp_path / "whole", tmp_path / "work", run="r")
    state = tmp_path / "state"
    with pytest.raises(Preempted, match="before saving the trained probe"):  # 1 + 2 checks in training, then it
        with EvalProgress(state, checkpoint_every_min=0, deadline=StopAfter(4)) as progress:
            train_vqa_probe(encoder, meta, manifests, cfg, tmp_path / "probe", tmp_path / "work", run="r",
                            progress=progress)
    assert not (tmp_path / "probe").exists()
    retry = EvalProgress(state, checkpoint_every_min=0)
    seen = iterations_run(retry)
    record = train_vqa_probe(encoder, meta, manifests, cfg, tmp_path / "probe", tmp_path / "work", run="r",
                             progress=retry)
    assert seen == [] and (tmp_path / "probe" / "probe.json").is_file()
    assert [s["final_loss"] for s in record["training"]] == [s["final_loss"] for s in whole["training"]]


def test_a_probe_job_failing_in_its_teardown_keeps_its_state(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """A job that fails after writing its output (e.g. a rank's process group teardown) loses
    that output to Snakemake: its state is discarded only after the teardown, so the retry saves
    the trained probe again without training a step."""
    import shutil

    from webssl_repro.cli import main
    from webssl_repro.evaluate.vqa import probe as probe_module
    from webssl_repro.train import distributed

    cfg, probe = _mini_probe_config(), tmp_path / "evals" / "r" / "vqa_probe"
    args = ["evaluate", "vqa_probe", "--run", "r", "--encoder", str(save_tiny_encoder(tmp_path / "encoder.safetensors")),
            "--eval-json", json.dumps(cfg), "--data", tiny_data["vqa"], tiny_data["shards"], "--out", str(probe),
            "--attempt", "1"]

    def teardown_fails() -> None:
        raise RuntimeError("a rank died in destroy_process_group")

    with monkeypatch.context() as m:
        m.setattr(distributed, "shutdown", teardown_fails)
        with pytest.raises(RuntimeError, match="destroy_process_group"):
            main(args)
    first = json.loads((probe / "probe.json").read_text())
    state = tmp_path / "eval_state" / "evals" / "r" / "vqa_probe"
    assert (state / "stage2.json").is_file()  # both stages saved
    shutil.rmtree(probe)  # what Snakemake does with a failed job's output
    steps = []
    monkeypatch.setattr(probe_module, "backward_global_batch", lambda *a, **k: steps.append(1))
    assert main([*args[:-1], "2"]) == 0
    again = json.loads((probe / "probe.json").read_text())
    assert steps == [] and again["encoder"] == first["encoder"]
    losses = [[s[k] for k in ("stage", "steps", "final_loss")] for s in first["training"]]
    assert [[s[k] for k in ("stage", "steps", "final_loss")] for s in again["training"]] == losses
    assert not state.exists()


def test_mini_vqa_pads_each_image_with_its_encoders_own_mean(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """Every image the mini VQA path encodes is padded to a square with the mean pixel of the
    statistics its encoder trained with (OpenAI's for a CLIP tower, ImageNet's otherwise), and the
    feature cache is keyed by that colour: another encoder's cache is not read."""
    from webssl_repro.evaluate.imagesets import IMAGENET_MEAN
    from webssl_repro.evaluate.vqa import stage
    from webssl_repro.methods.clip import OPENAI_MEAN, OPENAI_STD
    from webssl_repro.models.io import load_encoder

    pads, digests = [], []
    real_tensor, real_digest = stage.images_tensor, stage.images_digest
    monkeypatch.setattr(stage, "images_tensor", lambda *a, **kw: pads.append(kw["pad_mean"]) or real_tensor(*a, **kw))
    monkeypatch.setattr(stage, "images_digest", lambda *a: digests.append(real_digest(*a)) or digests[-1])
    manifests, cfg = {"vqa": tiny_data["vqa"], "shards": tiny_data["shards"]}, _mini_probe_config()
    for stats, mean in ((None, IMAGENET_MEAN), ((OPENAI_MEAN, OPENAI_STD), OPENAI_MEAN)):
        encoder, meta = load_encoder(save_tiny_encoder(tmp_path / "encoder.safetensors"))
        if stats is not None:
            encoder.input_stats = stats
        pads.clear()
        stage.vqa_inputs(encoder, meta, manifests, cfg, tmp_path / "work", part="test")
        assert pads and set(pads) == {tuple(mean)}
    assert digests[0] != digests[1]
