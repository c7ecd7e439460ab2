"""The built stages end to end at a tiny budget: pretraining lowers its loss, and its encoder
should beat the random-init encoder it started from on every evaluation family.

Runs are the mini grid's own (``Plan.run_config`` from config/mini.yaml, recipe unchanged)
on a corpus of the mini size; eval sets are smaller than the mini ones (see
``helpers_mini.TINY_EVALSETS``). The probes compare the Web-DINO run trained for
``helpers_mini.PROBE_SAMPLES`` (8192 steps) with its init; the loss checks use the grid's
64-step run. The probe run's tests share an xdist group, so one worker trains it while the
other runs the rest of the suite. "Random init" is the very model the run started from (same
seed, same arch, same recipe), so a difference is what training did.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import snakemake
from webssl_repro.config import config_hash
from webssl_repro.evaluate.knn import attribute_knn, object_attributes
from helpers_mini import (  # noqa: F401  (fixtures)
    CLIP_RUN, TINY_EVALSETS, clip_probe_run, clip_probe_shards, dino_encoders, dino_probe_run, dino_run,
    in1k_probe_set, initial_method, mae_run, shared_result, tiny_data, trained_run,
)

N_CLASSES = len(object_attributes()["class"])  # the IN-1k analogue is class-balanced

def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _early_late(losses: list[float], n: int) -> tuple[float, float]:
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


# ---------------------------------------------------------------- Web-DINO


def test_dino_loss_falls(dino_run):
    """64 steps of the mini recipe: the mean of the last 8 logged losses is at least 5 % below
    the first 8 (measured 10.02 -> 8.96, about 8x the step-to-step s.d. of late losses).
    Most of the fall is KoLeo and iBOT; the DINO term is tested below."""
    losses = [row["loss"] for row in _log(dino_run["dir"])]
    assert len(losses) == 64
    assert all(math.isfinite(x) for x in losses)
    early, late = _early_late(losses, 8)
    assert late < 0.95 * early, (early, late)


def test_dino_head_does_not_collapse(dino_run):
    """A collapsed head (every image's output the same) makes the Sinkhorn-Knopp targets uniform
    and pins the DINO term at ln K. With the mini head init it ends clearly below: the last 8
    steps average at most ln(512) - 0.05 (measured ~6.13 vs 6.238 over two seeds; with
    DINOv2's 0.02 init at hidden 128 it was 6.21, collapsed)."""
    terms = [row["dino_loss"] for row in _log(dino_run["dir"])]
    late = sum(terms[-8:]) / 8
    assert late <= math.log(512) - 0.05, late


#: Tests of the Web-DINO probe run: one xdist group (``make test`` runs ``--dist loadgroup``).
PROBE_GROUP = pytest.mark.xdist_group("dino_probe")


@pytest.fixture(scope="session")
def knn_scores(dino_encoders, in1k_probe_set, tmp_path_factory) -> dict[str, float]:
    def compute():
        from webssl_repro.evaluate.imagesets import load_split

        trained, random_init, meta = dino_encoders
        records = {split: load_split(in1k_probe_set, split) for split in ("train", "val")}
        return attribute_knn({"trained": trained, "random": random_init}, records, int(meta["img_size"]))

    scores = shared_result(tmp_path_factory, "knn_scores", compute)
    print("k-NN top-1 %:", scores)
    return scores


@PROBE_GROUP
def test_knn_probe_separates_classes(knn_scores):
    """The probe itself works on this eval set: k-NN on raw pixels is well above chance
    (6.25 %), so a trained encoder has something to find (measured 25.4 %)."""
    assert knn_scores["class"]["pixels"] >= 2 * 100.0 / N_CLASSES, knn_scores


@PROBE_GROUP
def test_dino_features_learn_colour(knn_scores):
    """The objects' colour (12 values, drawn independently of the class): k-NN beats init by
    >= 8 points (measured 37.1 vs 19.7 %; seeds 1 and 2 of the same run in
    benchmarks/probe_learning.py: 40.8 vs 20.2, 42.1 vs 18.9)."""
    colour = knn_scores["colour"]
    assert colour["trained"] >= colour["random"] + 8.0, knn_scores


@PROBE_GROUP
def test_dino_knn_beats_random_init(knn_scores):
    """CLS k-NN (k=20) of the class, i.e. the object's shape, on the IN-1k analogue (640 train
    / 960 val images): trained beats its own init by >= 5 points. Near 10 % one standard error
    of the difference is ~1.5 points, so 5 is over 3 of them. Measured 15.7 vs 8.1 %; seeds 1
    and 2: 16.9 vs 8.9, 14.4 vs 7.2. It would fail at a quarter of the budget (+2.5), and at
    this budget before local crops got DINOv2's position-embedding resampling (+2.2)."""
    assert knn_scores["class"]["trained"] >= knn_scores["class"]["random"] + 5.0, knn_scores


# ---------------------------------------------------------------- Web-MAE and CLIP


def test_mae_loss_falls(mae_run):
    """32 steps of the mini MAE recipe: last 5 logged losses at least 10 % below the first 5
    (measured 1.35 -> 0.84; the late losses vary by s.d. 0.015)."""
    losses = [row["loss"] for row in _log(mae_run["dir"])]
    assert len(losses) == 32 and all(math.isfinite(x) for x in losses)
    early, late = _early_late(losses, 5)
    assert late < 0.9 * early, (early, late)


def _clip_retrieval(method, records, size: int) -> dict[str, float]:
    """Image->text retrieval over N pairs: top-1 and top-5 %, their chance % and the median rank
    (1 = best) of the first caption equal to the query's own (mini-web captions repeat; chance
    counts that: a query with m matches among N is in a random top 5 with 1 - C(N-m, 5) / C(N, 5))."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    from webssl_repro.methods.clip import OPENAI_MEAN, OPENAI_STD

    tf = v2.Compose([v2.ToImage(), v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(OPENAI_MEAN, OPENAI_STD)])
    captions = [str(r["caption"]) for r in records]
    model = method.bare_model().eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(r["image"].convert("RGB")) for r in records]))
        txt = model.encode_text(method.tokenize(captions))
    same = torch.tensor([[a == b for b in captions] for a in captions])
    order = (img @ txt.T).argsort(dim=1, descending=True)
    first = same.gather(1, order).float().argmax(dim=1) + 1  # rank of the first matching caption
    n, m = same.shape[0], same.sum(dim=1).double()
    miss5 = torch.stack([(n - m - i) / (n - i) for i in range(5)]).clamp(min=0).prod(dim=0)
    return {"top1": 100.0 * float((first == 1).float().mean()), "median_rank": float(first.float().median()),
            "chance": 100.0 * float(same.float().mean()), "top5": 100.0 * float((first <= 5).float().mean()),
            "chance5": 100.0 * float((1 - miss5).mean())}


#: Seeds of the CLIP retrieval checks: one run decides top-1 on a handful of hits of 256.
CLIP_SEEDS = (0, 1, 2)


def _clip_seed(tmp_path_factory, run: dict, captions: str) -> dict[str, float]:
    """Image->text retrieval of a ``trained_run`` of ``CLIP_RUN`` and of its init on the held-out
    ``captions`` test split; computed once per session."""
    from webssl_repro.evaluate.imagesets import load_split

    def compute() -> dict[str, float]:
        records = load_split(captions, "test")
        assert len(records) == TINY_EVALSETS["captions"]["test"] == 256
        method = initial_method(CLIP_RUN, run["cfg"], run["shards"])
        size = int(run["cfg"]["img_size"])
        init = _clip_retrieval(method, records, size)
        method.bare_model().load_state_dict(torch.load(run["dir"] / "state.pt", weights_only=True))
        return {**_clip_retrieval(method, records, size),
                **{f"init_{k}": v for k, v in init.items() if not k.startswith("chance")}}

    name = f"retrieval.{run['dir'].parent.name}"
    out = shared_result(tmp_path_factory, name, compute)
    print(f"CLIP image->text retrieval, {name} (N=256):", json.dumps(out), flush=True)
    return out


@pytest.fixture(scope="session")
def clip_retrieval(tiny_data, tmp_path_factory) -> dict[str, dict[str, float]]:
    """The mini grid's 32-step CLIP run under each of CLIP_SEEDS, trained and at init."""
    return {str(seed): _clip_seed(tmp_path_factory, trained_run(tmp_path_factory, CLIP_RUN, tiny_data["shards"], seed=seed),
                                  tiny_data["captions"]) for seed in CLIP_SEEDS}


def test_clip_learns_to_rank_held_out_captions(clip_retrieval):
    """The grid's own 32-step CLIP run moves held-out true captions up: the median rank,
    averaged over 3 seeds, is at most 0.85x the init's (a random ranking puts it near 128 of
    256; measured 84-108 trained, 117-130 at init, with open_clip's text-tower init)."""
    trained = sum(v["median_rank"] for v in clip_retrieval.values()) / len(clip_retrieval)
    init = sum(v["init_median_rank"] for v in clip_retrieval.values()) / len(clip_retrieval)
    assert trained <= 0.85 * init, (trained, init)


@pytest.mark.parametrize("seed", CLIP_SEEDS)  # one test per seed: xdist spreads the probe runs
def test_clip_retrieval_above_chance(seed, clip_probe_shards, tiny_data, tmp_path_factory):
    """Held-out captions eval set (test split, N=256, never in the corpus): image->text top-5
    of the CLIP probe (CLIP_PROBE_SAMPLES on CLIP_PROBE_CORPUS) is >= 3x chance and above the
    same model at init, and its median rank at most a third of the init's. Top-1 is a handful of
    hits of 256, too few to decide a seed: with open_clip's text-tower init (524382d) the probe
    measured 1, 8 and 7 hits (chance: 1) at seeds 0-2, where a zero-biased MLP had given 5-7.
    Measured: top-5 30, 32 and 29 hits (chance 5, init 3-10), median rank 28-29 against 125-138
    at init. The 32-step grid run is too short for either (9-12 top-5 hits)."""
    run = clip_probe_run(tmp_path_factory, clip_probe_shards, seed)
    r = _clip_seed(tmp_path_factory, run, tiny_data["captions"])
    assert r["top5"] >= 3 * r["chance5"] and r["top5"] > r["init_top5"], r
    assert r["median_rank"] <= r["init_median_rank"] / 3, r


# ---------------------------------------------------------------- classic, alignment, VQA

#: Probe budgets: a fifth of the mini ones, enough for the heads to converge on frozen features.
CLASSIC_TINY = {"batch_size": 64, "linear": {"epochs": 4, "epoch_length": 10, "lrs": [0.01, 0.1, 1.0]},
                "segmentation": {"iters": 60, "lr": 0.01, "warmup": 6, "img_size": 64},
                "depth": {"iters": 60, "lr": 0.03, "warmup": 6, "sig_warmup": 0, "img_size": 64}}


@pytest.fixture(scope="session")
def classic_scores(dino_encoders, tiny_data, in1k_probe_set, tmp_path_factory) -> dict[str, dict[str, float]]:
    from webssl_repro.evaluate.alignment_eval import run_alignment
    from webssl_repro.evaluate.classic import run_classic

    def compute():
        trained, random_init, meta = dino_encoders
        out = {}
        for name, enc in (("trained", trained), ("random", random_init)):
            torch.manual_seed(0)
            m = run_classic(enc, meta, {**tiny_data, "classification": in1k_probe_set}, CLASSIC_TINY)
            m.update(run_alignment(enc, meta, tiny_data["captions"], {"language_models": ["minilm"]}))
            out[name] = {k: v for k, v in m.items() if not k.startswith("_")}
        return out

    out = shared_result(tmp_path_factory, "classic_scores", compute)
    print("classic/alignment:", json.dumps(out, indent=1))
    return out


@PROBE_GROUP
def test_classic_and_alignment_metrics_are_sane(classic_scores, tiny_data):
    """Every number is in its unit's range, for both encoders; the trained encoder's dense
    probes beat the uniform answers of the eval sets (``no_image``): ADE lin. and +ms
    above labelling every pixel with val's most common class (4.30 mIoU: background, 75 % of
    the pixels; the position prior is background everywhere too), NYUd lin.1 and lin.4 below
    the best single depth (3.06 m at 3.54 m). They do not beat NYUd's position prior, each
    pixel's mean training depth at its place (1.95 m), so the tables mark them.
    Measured: 6.34 / 7.23 mIoU, 2.73 / 2.39 m (the init: 4.04 / 3.86, 4.97 / 4.91)."""
    from webssl_repro.evaluate.no_image import classic_reference

    for scores in classic_scores.values():
        assert 0.0 <= scores["in1k_linear"] <= 100.0 and 0.0 <= scores["ade20k_linear"] <= 100.0
        assert 0.0 < scores["nyud_lin1"] < 20.0  # metres; mini-web depths lie in [1.5, 20]
        assert 0.0 <= scores["alignment/minilm"] <= 1.0
    trained = classic_scores["trained"]
    reference = classic_reference(tiny_data, CLASSIC_TINY)
    uniform, prior = reference["_uniform"], reference["_position_prior"]
    assert uniform["ade20k"] == pytest.approx(4.30, abs=0.01) and prior["ade20k"] == uniform["ade20k"]
    assert min(trained["ade20k_linear"], trained["ade20k_ms"]) > reference["ade20k_linear"], (trained, reference)
    assert uniform["nyud"] == pytest.approx(3.06, abs=0.01) and prior["nyud"] == pytest.approx(1.95, abs=0.01)
    assert max(trained["nyud_lin1"], trained["nyud_lin4"]) < uniform["nyud"], (trained, reference)
    assert reference["nyud_lin1"] == prior["nyud"]


#: (metric, sign, margin): trained must beat init by more than noise. in1k: 5 points of top-1
#: on 960 images (~3 standard errors of the difference near 10 %); ADE: 0.5 mIoU points; NYUd:
#: RMSE 2 % lower; alignment: +0.01 mutual-k-NN (chance is k/N = 10/256 = 0.039).
#: Measured (probe run vs init), seed 0, with the dense probes' training augmentation: top-1
#: 19.6 vs 7.9 %, ADE 6.34 vs 4.04 mIoU, NYUd 4.72 vs 8.26 m (43 % lower), alignment 0.091 vs
#: 0.048 (without it: ADE 7.42 vs 4.73, NYUd 4.65 vs 8.22). At 2048 steps, without it: top-1
#: 13.1 vs 11.9 % (160 images), ADE 5.81, NYUd 6.58 m, alignment 0.071. These are older:
#: re-measured on 2026-12-01 (a CI session's probe run), top-1 20.8 %, ADE 6.34 vs 4.04 mIoU,
#: NYUd lin.1 2.73 vs 4.97 m.
@PROBE_GROUP
@pytest.mark.parametrize("metric,sign,margin", [
    ("in1k_linear", 1, 5.0),
    ("ade20k_linear", 1, 0.5),
    ("nyud_lin1", -1, 0.02),
    ("alignment/minilm", 1, 0.01),
])
def test_trained_dino_beats_random_init(classic_scores, metric, sign, margin):
    trained, rand = classic_scores["trained"][metric], classic_scores["random"][metric]
    if metric == "nyud_lin1":
        assert trained <= (1 - margin) * rand, (metric, trained, rand)
    else:
        assert sign * (trained - rand) >= margin, (metric, trained, rand)


@pytest.mark.parametrize("seed", CLIP_SEEDS)
def test_trained_clip_beats_random_init_on_in1k_linear(seed, clip_probe_shards, in1k_probe_set, tmp_path_factory):
    """IN-1k linear (the DINOv2 grid at CLASSIC_TINY budgets, 640 train / 960 val images): the
    CLIP probe's encoder beats the encoder it started from by >= 3 points of top-1 (about 2
    standard errors of the difference). Captions name each object's class, so CLIP's vision
    tower learns some shape in 512 steps, where Web-DINO needs its 8192-step probe run;
    measured 13.6 / 14.4 / 14.3 vs 9.6 / 8.8 / 8.3 % for seeds 0-2 (chance 6.25)."""
    from webssl_repro.evaluate.classic import classic_config, classification
    from webssl_repro.models.io import load_encoder

    run = clip_probe_run(tmp_path_factory, clip_probe_shards, seed)
    trained, meta = load_encoder(run["dir"] / "encoder.safetensors")
    random_init = initial_method(CLIP_RUN, run["cfg"], run["shards"]).encoder().eval()
    cfg = classic_config(CLASSIC_TINY)
    top1 = {name: classification(enc, meta, in1k_probe_set, cfg)["in1k_linear"]
            for name, enc in (("trained", trained), ("random", random_init))}
    print(f"in1k_linear, CLIP probe seed {seed}:", top1)
    assert top1["trained"] >= top1["random"] + 3.0, top1


#: Mini VQA settings (config/mini.yaml evaluate.vqa) on 256 stage-1 captions and the tiny eval
#: set: 16 benchmarks x 40 instruction samples, 16 x 20 test questions.
VQA_TINY = {"alignment_samples": 256}


@pytest.fixture(scope="session")
def vqa_scores(dino_encoders, tiny_data, tmp_path_factory) -> dict[str, dict[str, float]]:
    from webssl_repro.evaluate.vqa.stage import run_vqa

    def compute():
        trained, random_init, meta = dino_encoders
        cfg = {**mini_vqa_config(), **VQA_TINY}
        out = {}
        for name, enc in (("trained", trained), ("random", random_init)):
            m = run_vqa(enc, meta, {"vqa": tiny_data["vqa"], "shards": tiny_data["shards"]}, cfg,
                        workdir=tmp_path_factory.mktemp(f"vqa_{name}"))
            out[name] = {k: v for k, v in m.items() if not k.startswith("_")}
        return out

    out = shared_result(tmp_path_factory, "vqa_scores", compute)
    print("vqa:", json.dumps(out, indent=1))
    return out


def mini_vqa_config() -> dict:
    from helpers_mini import mini_config

    return dict(mini_config()["evaluate"]["vqa"])


@PROBE_GROUP
def test_vqa_scores_are_sane(vqa_scores):
    """Each benchmark is in its range (MME's perception score 0-2000) and the four categories
    and the Average are the paper's means of those same 16 scores (``category_scores``)."""
    from webssl_repro.evaluate.vqa.categories import category_scores
    from webssl_repro.metrics import CATEGORY_COLUMNS, VQA_BENCHMARKS

    for scores in vqa_scores.values():
        assert set(scores) == set(VQA_BENCHMARKS) | set(CATEGORY_COLUMNS), sorted(scores)
        per_benchmark = {b: scores[b] for b in VQA_BENCHMARKS}
        assert all(0.0 <= v <= (2000.0 if b == "mme" else 100.0) for b, v in per_benchmark.items()), per_benchmark
        expected = category_scores(per_benchmark)
        assert {c: scores[c] for c in CATEGORY_COLUMNS} == pytest.approx(expected, rel=1e-9), (scores, expected)


VQA_NOT_SEPARATING = (
    "the mini VQA probe does not separate the probe-run encoder from its init: its 2-layer LM, trained "
    "from scratch, answers a letter to nearly every question (gqa, mmvp, textvqa score 0) and every "
    "benchmark scores the same for both encoders (Average 22.48 vs 22.48 at a1ed570, seeds 0 and 1). With 2.5-5x "
    "more stage-2 steps the answers start to follow the question, but the trained-init gap stays within "
    "the noise of 20 questions per benchmark, in either direction (27.1 vs 22.4; 27.3 vs 28.6). The LM "
    "does not read the image yet: 160 stage-1 caption steps end at the same loss with the trained "
    "encoder's tokens, its init's, shuffled ones or zeros (1.91 / 1.94 / 1.93 / 1.92), and the mini "
    "probe scores raw-pixel tokens no higher than zeros (Average 24.5 vs 25.1; 24.0 vs 24.0 with 8x the "
    "instruction data; benchmarks/probe_vqa_controls.py). Not even a perfect encoder beats zeros: tokens "
    "holding each patch's true class, colour, texture, facing, sign word and depth score 27.0 vs 25.7, and "
    "after a 100-epoch stage 1 that reads them into captions (caption loss 0.021 vs 0.679) 25.1 vs 26.3 "
    "(benchmarks/probe_vqa_oracle.py). Nor can the LM use the facts when they are written in its own "
    "input: given each scene as text it scores 20.5 against 21.3 with the questions alone "
    "(benchmarks/probe_vqa_text.py). At 16x the instruction data the text adds +7.7, the oracle +3.9 and "
    "the 2048-step probe encoder +0.6 over its init (28.2 vs 27.6); the 8192-step one scores 22.48 vs "
    "22.48 at the test's budget. A probe that separates encoders at mini "
    "scale needs a pretrained LM, and none ships offline")


@PROBE_GROUP
@pytest.mark.xfail(strict=True, reason=VQA_NOT_SEPARATING)
def test_vqa_trained_dino_beats_random_init(vqa_scores):
    """Average over the 16 benchmarks (20 test questions each): trained >= init + 1 point."""
    assert vqa_scores["trained"]["Average"] >= vqa_scores["random"]["Average"] + 1.0, vqa_scores


# ---------------------------------------------------------------- the workflow


def _tiny_workflow_config() -> dict:
    """config/mini.yaml shrunk to seconds: 256 corpus images, 4 DINO steps (warm-up 2), 64 captions.
    A full file because ``--configfile`` replaces the default config rather than merging."""
    from helpers_mini import mini_config

    cfg = mini_config()
    cfg["data"]["corpus"].update(n_images=256, shard_size=128)
    cfg["data"]["evalsets"]["captions"] = {"test": 64}
    cfg["labels"]["samples"]["2b"] = 128
    # the DAG rejects a warm-up not shorter than the run (Plan.run_config), the temperature's
    # too once the recipe-change check below lifts teacher_temp off its flat 0.04
    cfg["pretrain"]["dino"].update(warmup_steps=2, warmup_teacher_temp_steps=2)
    return cfg


def test_snakemake_builds_one_eval(workflow_dir):
    """One alignment JSON through the real DAG (data -> pretrain -> evaluate), then nothing to redo."""
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(_tiny_workflow_config()))
    target = "results/mini/evals/dino1b-full2b-224/alignment.json"
    args = ("--cores", "2", target, "--configfile", "tiny.yaml")
    first = snakemake(workflow_dir, *args, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    result = json.loads((workflow_dir / target).read_text())
    assert result["run"] == "dino1b-full2b-224" and result["kind"] == "alignment"
    assert torch.load(workflow_dir / "results/mini/language_features/minilm.pt")["captions"] == 64  # its own job
    score = result["metrics"]["alignment/minilm"]
    # the DAG scored the run's own encoder on its captions with its config: computed here again
    from webssl_repro.evaluate.alignment_eval import run_alignment
    from webssl_repro.models.io import load_encoder

    encoder, meta = load_encoder(workflow_dir / "results/mini/runs/dino1b-full2b-224/encoder.safetensors")
    here = run_alignment(encoder, meta, workflow_dir / "results/mini/data/evalsets/captions.json",
                         _tiny_workflow_config()["evaluate"]["alignment"])
    assert here["alignment/minilm"] == pytest.approx(score, abs=1e-6) and 0.0 < score < 1.0
    provenance = json.loads((workflow_dir / "results/mini/runs/dino1b-full2b-224/provenance.json").read_text())
    assert provenance["steps"] == 4 and provenance["corpus_size"] == 256
    assert provenance["config"]["run"] == "dino1b-full2b-224"
    assert re.fullmatch("[0-9a-f]{12}", provenance["config_hash"])
    assert provenance["config_hash"] == config_hash(provenance["config"])  # names the config as written
    again = snakemake(workflow_dir, *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Nothing to be done" in again.stdout + again.stderr

    # Settings (how jobs run) are not params: changing them reruns nothing.
    cfg = _tiny_workflow_config()
    cfg["pretrain"]["train"] = {**cfg["pretrain"].get("train", {}), "log_every": 1, "checkpoint_every": 2}
    cfg["evaluate"]["alignment"].update(batch_size=16, lm_batch_size=8)
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    settled = snakemake(workflow_dir, "-n", *args)
    assert settled.returncode == 0 and "Nothing to be done" in settled.stdout + settled.stderr, settled.stdout[-3000:]
    # The score's k is the alignment job's: the language model's features are kept.
    cfg["evaluate"]["alignment"]["k"] = 5
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    scored = snakemake(workflow_dir, "-n", *args)
    assert re.findall(r"^(?:local)?rule (\w+):", scored.stdout, re.M) == ["alignment"], scored.stdout[-3000:]

    # A recipe change reruns the run: it trains afresh instead of resuming the finished
    # checkpoint of the old recipe, which is kept aside.
    run_dir = workflow_dir / "results/mini/runs/dino1b-full2b-224"
    old_log = (run_dir / "train_log.jsonl").read_text()
    cfg = _tiny_workflow_config()
    cfg["pretrain"]["dino"]["teacher_temp"] = 0.07
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    rerun = snakemake(workflow_dir, *args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    stale = list((workflow_dir / "results/mini/checkpoints").glob("dino1b-full2b-224.stale-*"))
    assert len(stale) == 1 and (stale[0] / "train_log.jsonl").read_text() == old_log
    new_log = (run_dir / "train_log.jsonl").read_text()
    assert [json.loads(line)["step"] for line in new_log.splitlines()] == [4] and new_log != old_log
    assert "set aside" in (workflow_dir / "logs/mini/pretrain/dino1b-full2b-224.log").read_text()


def test_a_changed_answer_limit_reruns_the_vqa_answers_not_the_probe(workflow_dir):
    """The VQA stage's two jobs through the real DAG, on the blind control (no pretraining needed):
    changing how the probe answers (``max_new_tokens``) reruns the answering job only; changing
    its recipe reruns both."""
    cfg = _tiny_workflow_config()
    vqa = cfg["evaluate"]["vqa"]
    vqa.update(alignment_samples=64, stage1={**vqa["stage1"], "max_steps": 2}, stage2={**vqa["stage2"], "max_steps": 4})
    cfg["data"]["evalsets"]["vqa"] = {"train": 8, "test": 4}
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/mini/controls/blind/vqa.json"
    args = (target, "--configfile", "tiny.yaml")
    first = snakemake(workflow_dir, "--cores", "2", *args, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    record = workflow_dir / "results/mini/controls/blind/vqa_probe/probe.json"
    trained, answered = record.stat().st_mtime_ns, json.loads((workflow_dir / target).read_text())
    assert [s["steps"] for s in answered["details"]["training"]] == [2, 4]
    state = workflow_dir / "results/mini/eval_state/controls/blind"
    assert not (state / "vqa_probe").exists() and not (state / "vqa").exists()  # removed once written

    vqa["max_new_tokens"] = 4
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    planned = snakemake(workflow_dir, "-n", *args)
    assert planned.returncode == 0 and re.search(r"vqa_control\s+1\n", planned.stdout), planned.stdout[-3000:]
    assert "vqa_control_probe" not in planned.stdout
    again = snakemake(workflow_dir, "--cores", "2", *args, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert record.stat().st_mtime_ns == trained
    assert json.loads((workflow_dir / target).read_text())["config_hash"] != answered["config_hash"]

    vqa["stage2"]["lr"] = 1e-3
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    retrain = snakemake(workflow_dir, "-n", *args)
    assert re.search(r"vqa_control_probe\s+1\n", retrain.stdout) and re.search(r"vqa_control\s+1\n", retrain.stdout)
