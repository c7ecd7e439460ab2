"""The VQA probe data-parallel over 2 gloo ranks (DDP and FSDP2) equals the single-process probe.

Run as a script under torchrun, this file is also the 2-rank worker (as in test_train_distributed.py).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from webssl_repro.evaluate.vqa.data import MINI_CHAT
from webssl_repro.evaluate.vqa.lm import build_tiny_lm, build_tokenizer
from webssl_repro.evaluate.vqa.probe import MultimodalProbe, StageConfig, evaluate_vqa, train_stage

from helpers_dist import rerun_if_aborted, torchrun, worker_env
from test_vqa_probe import COLOURS, SHAPES, TOKENS, VIS_DIM, _world, answered_batches  # the probe tests' toy world

#: Global batch 8 = 2 ranks x 2 micro-batches x 2 samples; stage 2 trains the LM as well, in
#: Cambrian's device batches of 2 (per_device_batch: each rank weighs its samples by the whole batch).
STAGES = [(1, StageConfig(lr=1e-2, batch_size=8, micro_batch_size=2, max_steps=3, warmup_ratio=0.0)),
          (2, StageConfig(lr=5e-3, batch_size=8, micro_batch_size=2, max_steps=3, warmup_ratio=0.3,
                          per_device_batch=2))]


def _probe() -> MultimodalProbe:
    tok = build_tokenizer(["USER: ASSISTANT: what colour is the object? which shape is shown in the picture?",
                           " ".join(COLOURS + SHAPES)])
    lm = build_tiny_lm(len(tok), hidden=32, layers=2, heads=4, seed=0, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return MultimodalProbe(lm, tok, VIS_DIM, tokens=TOKENS, chat=MINI_CHAT)


def _full_state(probe: MultimodalProbe) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in probe.state_dict().items()}


def run(strategy: str, save_to: Path | None = None) -> dict:
    """Train both stages and evaluate; the answers are recorded by the (rank-0) scorer. With
    ``save_to``, the trained probe is saved there as the vqa_probe job saves it (``vqa.trained``)."""
    from webssl_repro.evaluate.vqa.distributed import parallelize

    torch.set_num_threads(1)
    probe = _probe()
    parallel = parallelize(probe, strategy)
    # two image-free samples: a rank may get an image-free micro-batch (projector unused there)
    train, feats = _world(16, seed=1, text_only=4)
    losses = []
    for stage, cfg in STAGES:
        losses += train_stage(probe, train, feats, stage, cfg, seed=stage, parallel=parallel)["losses"]
    tests, test_feats = _world(8, seed=2, text_only=2)
    # 4 batches (rank 0's first image-free), 1 batch (rank 1 repeats one, unused), none
    sets = {"gqa": tests[:7], "mme": tests[7:], "pope": []}
    answers: dict[str, list[str]] = {}

    def scorer(name, preds, refs):
        answers[name] = list(preds)
        return 100.0 * sum(p == r["answer"] for p, r in zip(preds, refs)) / max(1, len(refs))

    result = evaluate_vqa(probe, sets, scorer, features=test_feats, batch_size=2, max_new_tokens=6,
                          parallel=parallel)
    if save_to is not None:
        from webssl_repro.evaluate.vqa.trained import save_probe

        save_probe(save_to, probe, {"strategy": strategy})
    out = {"losses": losses, "state": _full_state(probe), "answers": answers, "result": result}
    if strategy == "fsdp2":
        from torch.distributed.tensor import DTensor

        out["sharded"] = isinstance(probe.lm.model.layers[0].mlp.up_proj.weight, DTensor)
    return out


def run_paper_layout() -> dict:
    """The paper's layout (config/paper.yaml): fp32 LM and projector weights, the forward under
    bf16 autocast (``precision: bf16``; on CUDA only, so forced here on CPU), the decoder layers
    recomputed in the backward (``gradient_checkpointing``), sharded by FSDP2."""
    from webssl_repro.evaluate.vqa import probe as probe_mod
    from webssl_repro.evaluate.vqa.distributed import parallelize
    from webssl_repro.evaluate.vqa.probe import checkpoint_layers

    probe = _probe()
    probe.precision = "bf16"
    checkpoint_layers(probe.lm)
    recomputed = [0]
    for layer in probe.lm.model.layers:  # count the layer forwards that go through checkpointing
        def counted(*args, _inner=layer._gradient_checkpointing_func, **kwargs):
            recomputed[0] += 1
            return _inner(*args, **kwargs)
        layer._gradient_checkpointing_func = counted
    logits = []
    probe.lm.lm_head.register_forward_hook(lambda module, inputs, out: logits.append(out.dtype))
    initial = _full_state(probe)
    autocast_dtype = probe_mod.autocast_dtype
    probe_mod.autocast_dtype = lambda precision, device: torch.bfloat16
    try:
        parallel = parallelize(probe, "fsdp2")
        train, feats = _world(16, seed=1, text_only=4)
        losses = [loss for stage, cfg in STAGES
                  for loss in train_stage(probe, train, feats, stage, cfg, seed=stage, parallel=parallel)["losses"]]
    finally:
        probe_mod.autocast_dtype = autocast_dtype
    return {"losses": losses, "initial": initial, "state": _full_state(probe), "recomputed": recomputed[0],
            "logits": sorted({str(d) for d in logits})}


def run_resumed(state_dir: Path) -> dict:
    """fsdp2 stopped after stage-2 step 2 (``evaluate.progress``), then resumed by a new probe:
    each rank's shards of the LM and its AdamW state go through torch.distributed.checkpoint."""
    from helpers_progress import StopAfter, iterations_run
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.evaluate.vqa.distributed import parallelize
    from webssl_repro.train import Preempted

    def attempt(progress: EvalProgress) -> tuple[MultimodalProbe, list[float]]:
        probe = _probe()
        parallel = parallelize(probe, "fsdp2")
        train, feats = _world(16, seed=1, text_only=4)
        return probe, [loss for stage, cfg in STAGES for loss in train_stage(
            probe, train, feats, stage, cfg, seed=stage, parallel=parallel, progress=progress)["losses"]]

    try:
        attempt(EvalProgress(state_dir, checkpoint_every_min=0, deadline=StopAfter(4)))
        raise AssertionError("the first attempt did not stop")
    except Preempted:
        pass
    retry = EvalProgress(state_dir, checkpoint_every_min=0)
    seen = iterations_run(retry)
    probe, losses = attempt(retry)
    return {"losses": losses, "state": _full_state(probe), "iterations": seen}


def answer_gqa(parallel=None, progress=None) -> list[str]:
    """The untrained probe's answers to 7 questions in batches of 2: 2 rounds on 2 ranks."""
    probe = _probe()
    if parallel is not None:
        from webssl_repro.evaluate.vqa.distributed import parallelize

        parallel = parallelize(probe, parallel)
    tests, test_feats = _world(8, seed=2, text_only=2)
    answers: list[str] = []
    evaluate_vqa(probe, {"gqa": tests[:7]}, lambda name, preds, refs: answers.extend(preds) or 0.0,
                 features=test_feats, batch_size=2, max_new_tokens=6, parallel=parallel, progress=progress)
    return answers


def run_answering_resumed(state_dir: Path) -> dict:
    """fsdp2 stopped after the first round of answering, then resumed: its answers, each rank's
    batch sizes and saves in the retry. The state saved at the stop is kept in
    ``<state_dir>-at-stop`` for a one-process retry."""
    from helpers_progress import StopAfter
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted
    from webssl_repro.train.distributed import all_gather_object

    try:  # the 1st check is before answering gqa, the 2nd after its 1st round
        answer_gqa("fsdp2", EvalProgress(state_dir, checkpoint_every_min=0, deadline=StopAfter(2)))
        raise AssertionError("the first attempt did not stop")
    except Preempted:
        pass
    if torch.distributed.get_rank() == 0:
        shutil.copytree(state_dir, f"{state_dir}-at-stop")
    torch.distributed.barrier()
    never = StopAfter(10**9)
    with answered_batches() as calls:  # saving after every round that is not the last: none in a retry of one round
        answers = answer_gqa("fsdp2", EvalProgress(state_dir, checkpoint_every_min=0, deadline=never))
    return {"answers": answers, "calls": all_gather_object([n for n, _ in calls]), "saves": never.saves}


def loaded_probe(lm: Path, strategy: str):
    """The paper-scale build: an LM loaded from ``lm`` (a saved random-init Llama stand-in)."""
    from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe

    return build_probe(VqaConfig.from_mapping({"language_model": str(lm), "tokens": TOKENS, "strategy": strategy}),
                       VIS_DIM)


def run_loaded(lm: Path) -> dict:
    """fsdp2 over a loaded LM: rank 1 builds it on the meta device and receives rank 0's values."""
    from webssl_repro.evaluate.vqa.distributed import parallelize

    probe = loaded_probe(lm, "fsdp2")
    on_meta = [p.is_meta for p in probe.parameters()]
    parallelize(probe, "fsdp2")
    return {"meta": (all(on_meta), any(on_meta)), "state": _full_state(probe)}


def reloaded(saved: Path, strategy: str) -> dict[str, torch.Tensor]:
    """A new probe (the untrained init) sharded as ``strategy`` says, ``saved`` loaded into it."""
    from webssl_repro.evaluate.vqa.distributed import parallelize
    from webssl_repro.evaluate.vqa.trained import load_probe

    probe = _probe()
    parallelize(probe, strategy)
    load_probe(saved, probe)
    return _full_state(probe)


def _worker(out: Path) -> None:
    results = {s: run(s, out / f"probe-{s}") for s in ("ddp", "fsdp2")}
    results["fsdp2"]["reloaded"] = reloaded(out / "probe-fsdp2", "fsdp2")
    resumed = run_resumed(out / "progress")
    answered = run_answering_resumed(out / "answering")
    paper_layout = run_paper_layout()
    loaded = run_loaded(out / "lm")
    rank = torch.distributed.get_rank()
    assert loaded["meta"] == ((True, True) if rank else (False, False)), loaded["meta"]
    # every rank returns rank 0's scores; only rank 0 scored
    assert all(r["result"]["benchmarks"] for r in results.values())
    assert all(bool(r["answers"]) == (rank == 0) for r in results.values())
    if rank == 0:
        torch.save({**results, "resumed": resumed, "answered": answered, "paper_layout": paper_layout, "loaded": loaded["state"]}, out / "multi.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from helpers_stand_ins import build_tiny_llama

    out = tmp_path_factory.mktemp("vqa_dist")
    build_tiny_llama(out / "lm", ["what colour is the object?", " ".join(COLOURS + SHAPES)])

    def start() -> subprocess.Popen:
        for left in ("progress", "answering", "answering-at-stop"):  # a rerun starts afresh, not from the state left
            shutil.rmtree(out / left, ignore_errors=True)
        return subprocess.Popen(torchrun(2, __file__, str(out)), env=worker_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
        stdout, stderr = proc.communicate(timeout=240)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    proc = start()
    before = torch.get_num_threads()
    try:
        single = run("none")  # meanwhile, in this process
    finally:
        torch.set_num_threads(before)
    done = rerun_if_aborted(finish(proc), lambda: finish(start()), "two-rank VQA probe")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return single, {**torch.load(out / "multi.pt", weights_only=False), "lm_path": out / "lm",
                    "answering_at_stop": out / "answering-at-stop", "saved": out}


def test_single_process_initialises_no_process_group(runs):
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_train_like_one_process(runs, strategy):
    single, multi = runs
    got = multi[strategy]
    assert got.get("sharded", True)
    assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert len(single["losses"]) == 6
    init = _probe().state_dict()
    assert single["state"].keys() == got["state"].keys()
    assert max((single["state"][k] - v).abs().max().item() for k, v in init.items()) > 1e-3  # weights moved
    for k, ref in single["state"].items():
        assert got["state"][k].shape == ref.shape, k
        torch.testing.assert_close(got["state"][k], ref, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_evaluate_like_one_process(runs, strategy):
    single, multi = runs
    got = multi[strategy]
    assert got["answers"] == single["answers"]
    assert [len(a) for a in single["answers"].values()] == [7, 1, 0]
    assert got["result"] == single["result"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_probe_saved_on_two_ranks_loads_exactly_on_two_ranks_or_one(runs, strategy):
    """The vqa_probe job's save (``vqa.trained``) from 2 ranks, each writing its shards under
    FSDP2, read back bit for bit by one process, and by 2 FSDP2 ranks resharding it."""
    from webssl_repro.evaluate.vqa.trained import load_probe

    got = runs[1][strategy]
    probe = _probe()
    load_probe(runs[1]["saved"] / f"probe-{strategy}", probe)
    init = _probe().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in got["state"].items())  # trained off the init
    for k, ref in got["state"].items():
        assert torch.equal(probe.state_dict()[k], ref), k
        if strategy == "fsdp2":
            assert torch.equal(got["reloaded"][k], ref), k


def test_fsdp2_probe_stopped_and_resumed_trains_as_uninterrupted(runs):
    whole, resumed = runs[1]["fsdp2"], runs[1]["resumed"]
    assert resumed["losses"] == whole["losses"]
    assert resumed["iterations"] == [("stage2", 3)]  # the retry trained only the step after the stop
    for k, ref in whole["state"].items():
        assert torch.equal(resumed["state"][k], ref), k


def test_answering_stopped_after_a_round_resumes_on_two_ranks_or_one(runs):
    """The 2-rank job stopped with 4 of 7 answers saved; its retry on 2 ranks, and a retry of
    the same state in this one process, answer the other 3 as an uninterrupted process does."""
    from webssl_repro.evaluate.progress import EvalProgress

    saved = runs[1]["answering_at_stop"]
    state = torch.load(saved / "answering-gqa.1" / "state.pt", weights_only=False)
    assert (state["iteration"], len(state["answers"])) == (1, 4)
    whole = answer_gqa()
    assert len(whole) == 7 and state["answers"] == whole[:4]
    retry = runs[1]["answered"]
    assert retry["answers"] == whole
    assert retry["calls"] == [[2], [1]] and retry["saves"] == 0  # one round: questions 5-6 and 7
    with answered_batches() as calls:
        assert answer_gqa(progress=EvalProgress(saved, checkpoint_every_min=0)) == whole
    assert [n for n, _ in calls] == [2, 1]  # questions 5-6, then 7
    assert sorted(p.name for p in saved.iterdir()) == ["done"]  # the answering state dropped with the result


def test_fsdp2_ranks_other_than_0_receive_a_loaded_lm_without_reading_it(runs, tmp_path):
    """Rank 1 built the LM from its config on the meta device (asserted in the worker); after
    sharding, every weight equals the one-process build, LM as loaded and projector as seeded."""
    expected = _full_state(loaded_probe(runs[1]["lm_path"], "none"))
    got = runs[1]["loaded"]
    assert got.keys() == expected.keys() and len(got) > 10
    for k, ref in expected.items():
        assert torch.equal(got[k], ref), k


def test_fsdp2_trains_the_paper_layout_fp32_weights_under_bf16_autocast(runs):
    """What paper.yaml runs: the steps' arithmetic in bf16, the weights AdamW updates in fp32
    (a bf16 weight of 0.02 would not move by a 4e-5 step), every decoder layer recomputed."""
    single, multi = runs
    got = multi["paper_layout"]
    assert got["logits"] == ["torch.bfloat16"]  # the LM head ran under the autocast
    assert got["recomputed"] >= 2 * 6  # both decoder layers, in every training step
    weights = {k: v for k, v in got["state"].items() if v.is_floating_point()}
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    moved = [(v != got["initial"][k]).float().mean().item() for k, v in weights.items() if k.startswith("lm.")
             and k.endswith("proj.weight")]
    assert moved and min(moved) > 0.95  # stage 2 trained the LM's fp32 weights
    # the same training as in fp32 (the fsdp2 run above), to bf16's precision
    assert got["losses"] == pytest.approx(multi["fsdp2"]["losses"], rel=0.02)
    assert got["losses"] != pytest.approx(multi["fsdp2"]["losses"], rel=1e-6)  # the autocast changed the arithmetic


def test_global_batch_must_split_evenly():
    from webssl_repro.evaluate.vqa.distributed import Parallel
    from webssl_repro.train.distributed import DistEnv

    par = Parallel("ddp", DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu")))
    assert par.local_indices(list(range(8)), 2) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="divide by world size 2"):
        par.local_indices(list(range(8)), 3)


def test_vqa_rule_launches_torchrun_only_for_a_parallel_probe():
    from webssl_repro.config import load_config
    from webssl_repro.evaluate.vqa.probe import VqaConfig
    from webssl_repro.workflow import Plan

    repo = Path(__file__).parents[1]
    paper = load_config(repo / "config/paper.yaml")
    assert paper["evaluate"]["vqa"]["strategy"] == "fsdp2" and VqaConfig().strategy == "none"
    gpus = paper["resources"]["eval_gpus"]
    torchrun = (f"env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 torchrun --standalone --nnodes 1 --nproc-per-node {gpus} "
                "-m webssl_repro.cli")
    assert Plan(paper).eval_launcher() == torchrun
    # an attempt sized to be refused checks its ledger in one process, on its one core
    assert Plan(paper).eval_launcher(sized_for_refusal=1) == "webssl-repro"
    assert Plan(load_config(repo / "config/mini.yaml")).eval_launcher() == "webssl-repro"
    paper["resources"]["eval_gpus"] = 1
    assert Plan(paper).eval_launcher() == "webssl-repro"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_ddp_refuses_a_replica_larger_than_the_gpu(monkeypatch):
    """ddp holds fp32 weights, gradients and both AdamW moments of the whole probe on each GPU:
    16 bytes a parameter, 128 GB for Llama-3-8B. Refused by name before the first step."""
    from types import SimpleNamespace

    from webssl_repro.evaluate.vqa import distributed

    probe = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters: 16.0 MB as a replica
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=10_000_000))
    with pytest.raises(ValueError, match="evaluate.vqa.strategy: ddp replicates .*: use fsdp2"):
        distributed.check_replica_fits(probe, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=17_000_000))
    distributed.check_replica_fits(probe, torch.device("cuda"))  # fits
    distributed.check_replica_fits(probe, torch.device("cpu"))  # CPU: no limit checked
