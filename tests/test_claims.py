"""The paper's claims as predicates: the paper's own numbers, hand-made frames that make each claim
hold and fail, missing runs, seed spread, and the check on a synthetic run-scale results tree."""
import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from webssl_repro.metrics import VQA_CATEGORIES
from webssl_repro.paper import claims as C
from webssl_repro.paper.check import (comparison, published_runs_frame, requested_pairs, run_check,
                                      runs_frame)
from webssl_repro.paper import specs
from webssl_repro.config import load_config
from webssl_repro.runs import Run
from webssl_repro.workflow import Plan


def frame_of(claim: C.Claim, values: dict, seeds=None) -> pd.DataFrame:
    """A long frame from ``{(series label, metric): [one value per run]}``; with ``seeds``, each value
    list is per seed: ``{(label, metric): [[seed0 values], [seed1 values], ...]}``."""
    rows = []
    for series in claim.series:
        for (label, metric), ys in values.items():
            if label != series.label:
                continue
            per_seed = ys if seeds else [ys]
            for k, seed_ys in enumerate(per_seed):
                for run, y in zip(series.runs, seed_ys):
                    rows.append({"source": run, "metric": metric, "value": y, "origin": "run",
                                 "seed": seeds[k] if seeds else 0})
    return pd.DataFrame(rows)


UP5, FLAT5 = [40, 41, 42, 43, 44], [44, 43.5, 44, 43.8, 44.1]
CASES = {  # claim -> (values that make it hold, values that make it fail)
    "dino_scales_with_size": ({("Web-DINO", "Average"): UP5}, {("Web-DINO", "Average"): FLAT5}),
    "dino_scales_better_than_clip": (
        {("Web-DINO", "Average"): UP5, ("CLIP", "Average"): [45, 45.2, 45.1, 45.3, 45.2]},
        {("Web-DINO", "Average"): UP5, ("CLIP", "Average"): [40, 41.2, 42.1, 43.3, 44.2]}),
    "dino_leads_clip_vision_centric": (
        {("Web-DINO", "Vision-Centric"): [50, 51, 52, 53, 54], ("CLIP", "Vision-Centric"): [49] * 5},
        {("Web-DINO", "Vision-Centric"): [50, 51, 52, 53, 54], ("CLIP", "Vision-Centric"): [50, 51, 52, 53, 55]}),
    "dino_overtakes_clip_with_size": (
        {("Web-DINO", "Average"): [45, 46, 47, 48, 49], ("CLIP", "Average"): [47, 47.2, 47.4, 47.6, 47.8]},
        {("Web-DINO", "Average"): [45, 46, 47, 48, 48.1], ("CLIP", "Average"): [47, 47.2, 47.4, 47.6, 47.8]}),
    "ocr_gap_closes_with_size": (
        {("Web-DINO", "OCR & Chart"): [20, 23, 26, 29, 32], ("CLIP", "OCR & Chart"): [35] * 5},
        {("Web-DINO", "OCR & Chart"): [20] * 5, ("CLIP", "OCR & Chart"): [35, 35.5, 36, 36.5, 37]}),
    "ocr_gap_closes_with_samples": (
        {("Web-DINO", "OCR & Chart"): [20, 24, 28, 32], ("CLIP", "OCR & Chart"): [35] * 4},
        {("Web-DINO", "OCR & Chart"): [20, 24, 28, 32], ("CLIP", "OCR & Chart"): [35, 39, 43, 47]}),
    "more_samples_help": ({("Web-DINO ViT-7B", "Average"): [40, 42, 44, 46]},
                          {("Web-DINO ViT-7B", "Average"): [46, 45, 44, 43]}),
    "more_samples_raise_ocr": ({("Web-DINO ViT-7B", "OCR & Chart"): [26, 30, 35, 39]},
                               {("Web-DINO ViT-7B", "OCR & Chart"): [30, 30.2, 30.1, 30.3]}),
    "mae_scales_with_size": ({("Web-MAE", "Average"): [40, 41, 42, 43]}, {("Web-MAE", "Average"): [43] * 4}),
    "mae_beats_dino_on_ocr": ({("Web-MAE", "OCR & Chart"): [30] * 4, ("Web-DINO", "OCR & Chart"): [25] * 4},
                              {("Web-MAE", "OCR & Chart"): [25] * 4, ("Web-DINO", "OCR & Chart"): [30] * 4}),
    "in1k_does_not_scale": (
        {("Web-DINO (ImageNet-1k)", "Average"): [45] * 4, ("Web-DINO (MC-2B)", "Average"): [40, 42, 44, 46]},
        {("Web-DINO (ImageNet-1k)", "Average"): [40, 42, 44, 46], ("Web-DINO (MC-2B)", "Average"): [40, 42, 44, 46]}),
    "text_filter_raises_ocr": (
        {("Web-DINO ViT-2B", "OCR & Chart"): [20, 25, 30], **{("Web-DINO ViT-2B", m): [50] * 3
                                                              for m in ("General", "Knowledge", "Vision-Centric")}},
        {("Web-DINO ViT-2B", "OCR & Chart"): [20, 25, 30], ("Web-DINO ViT-2B", "General"): [50, 45, 44],
         ("Web-DINO ViT-2B", "Knowledge"): [50] * 3, ("Web-DINO ViT-2B", "Vision-Centric"): [50] * 3}),
    "heavy_filter_beats_clip": (
        {("Web-DINO ViT-2B (Heavy)", "OCR & Chart"): [40], ("Web-DINO ViT-2B (Heavy)", "Average"): [54],
         ("CLIP ViT-2B", "OCR & Chart"): [36], ("CLIP ViT-2B", "Average"): [53]},
        {("Web-DINO ViT-2B (Heavy)", "OCR & Chart"): [40], ("Web-DINO ViT-2B (Heavy)", "Average"): [53.2],
         ("CLIP ViT-2B", "OCR & Chart"): [36], ("CLIP ViT-2B", "Average"): [53]}),
    # relative: 5 -> 4.8 mIoU is a 4 % loss; an RMSE that rises 1 % is not "worse" enough
    "dense_degrades_with_samples": (
        {("Web-DINO ViT-7B", "ade20k_linear"): [5.0, 4.9, 4.8], ("Web-DINO ViT-7B", "nyud_lin1"): [4.0, 4.2, 4.5]},
        {("Web-DINO ViT-7B", "ade20k_linear"): [5.0, 4.9, 4.8], ("Web-DINO ViT-7B", "nyud_lin1"): [4.0, 4.1, 4.04]}),
    "alignment_rises_with_size": ({("Web-DINO", "alignment/minilm"): [0.10, 0.11, 0.12, 0.13, 0.14],
                                   ("Web-DINO", "se/alignment/minilm"): [0.002] * 5},
                                  {("Web-DINO", "alignment/minilm"): [0.14, 0.13, 0.12, 0.11, 0.10],
                                   ("Web-DINO", "se/alignment/minilm"): [0.002] * 5}),
    "alignment_rises_with_samples": ({("Web-DINO ViT-7B", "alignment/minilm"): [0.10, 0.12, 0.14],
                                      ("Web-DINO ViT-7B", "se/alignment/minilm"): [0.002] * 3},
                                     {("Web-DINO ViT-7B", "alignment/minilm"): [0.10, 0.10, 0.10],
                                      ("Web-DINO ViT-7B", "se/alignment/minilm"): [0.002] * 3}),
    # 0.170 -> 0.172 is a 1.2 % gain, 1.4 standard errors of 0.001 each: not enough
    "web_data_raises_alignment": ({("DINOv2 → Web-DINO ViT-1B", "alignment/minilm"): [0.160, 0.170],
                                   ("DINOv2 → Web-DINO ViT-1B", "se/alignment/minilm"): [0.002] * 2},
                                  {("DINOv2 → Web-DINO ViT-1B", "alignment/minilm"): [0.170, 0.172],
                                   ("DINOv2 → Web-DINO ViT-1B", "se/alignment/minilm"): [0.001] * 2}),
    "higher_resolution_helps": ({("Web-DINO ViT-7B 8B seen", "Average"): [40, 42, 44]},
                                {("Web-DINO ViT-7B 8B seen", "Average"): [40, 42, 41]}),
}


def test_every_claim_has_a_case():
    assert set(CASES) == set(C.CLAIM_IDS)


def test_the_report_lists_every_threshold_a_claim_is_judged_against():
    from webssl_repro.paper.check import thresholds

    listed = {name: value for name, value, _ in thresholds()}
    used = {abs(c.threshold) for claim in C.CLAIMS for c in claim.conditions}
    assert used <= set(listed.values()), sorted(used - set(listed.values()))
    # by name too: a new cutoff equal in value to a listed one is still listed, with its own words
    constants = {name: value for name, value in vars(C).items()
                 if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert constants and {n: listed.get(n) for n in constants} == constants


@pytest.mark.parametrize("claim_id", sorted(CASES))
def test_claim_holds_and_fails_on_hand_made_numbers(claim_id):
    claim = C.get_claim(claim_id)
    good, bad = CASES[claim_id]
    held = C.evaluate(claim, frame_of(claim, good))
    failed = C.evaluate(claim, frame_of(claim, bad))
    assert held.verdict == C.HOLDS, held.evidence
    assert failed.verdict == C.FAILS, failed.evidence
    assert "Points:" in held.evidence


@pytest.mark.parametrize("claim_id", sorted(CASES))
def test_claim_not_measurable_when_a_run_is_missing(claim_id):
    claim = C.get_claim(claim_id)
    frame = frame_of(claim, CASES[claim_id][0])
    dropped = claim.series[-1].runs[-1]
    result = C.evaluate(claim, frame[frame["source"] != dropped])
    assert result.verdict == C.NOT_MEASURABLE and any(dropped in m for m in result.missing)
    # a run that the scale does not request: named, with its eval kind
    unrequested = C.evaluate(claim, frame, requested=set())
    assert unrequested.verdict == C.NOT_MEASURABLE
    assert f"{claim.series[0].eval} of {claim.series[0].runs[0]}" in unrequested.missing


def test_an_alignment_trend_must_clear_the_scores_own_error():
    """One seed of scores measured to +-0.0015 (the mini scale's 1,024 captions give 0.0028 to 0.0030):
    a 3 % rise over the sizes is no trend, the same rise measured to +-0.0001 is; without the error,
    no verdict."""
    claim = C.get_claim("alignment_rises_with_size")
    mini = [0.02588, 0.02598, 0.02607, 0.02617, 0.02676]  # make reproduce at bcd5e72

    def frame(se):
        values = {("Web-DINO", "alignment/minilm"): mini}
        return frame_of(claim, values if se is None else {**values, ("Web-DINO", "se/alignment/minilm"): [se] * 5})

    noisy, precise = C.evaluate(claim, frame(0.0015)), C.evaluate(claim, frame(0.0001))
    x = np.log2([1, 2, 3, 5, 7])
    slope = np.polyfit(x, mini, 1)[0]
    assert noisy.quantities["rel_slope[minilm]"][0] == pytest.approx(slope / np.mean(mini))  # +0.0101 > 0.002
    z = slope / (0.0015 * np.sqrt(1 / ((x - x.mean()) ** 2).sum()))
    assert noisy.quantities["slope_z[minilm]"][0] == pytest.approx(z) and 0.3 < z < 0.5
    assert noisy.verdict == C.FAILS and precise.verdict == C.HOLDS
    unknown = C.evaluate(claim, frame(None))
    assert unknown.verdict == C.NOT_MEASURABLE and "slope_z" in unknown.evidence


def test_quantities_are_real_fits():
    claim = C.get_claim("dino_scales_with_size")
    result = C.evaluate(claim, frame_of(claim, {("Web-DINO", "Average"): UP5}))
    x = np.log2([1, 2, 3, 5, 7])
    slope = np.polyfit(x, UP5, 1)[0]
    assert result.quantities["slope"][0] == pytest.approx(slope)
    assert 0.9 < result.quantities["r2"][0] < 1.0


def test_seed_spread_decides_a_marginal_slope():
    claim = C.get_claim("dino_scales_with_size")
    x = np.log2([1, 2, 3, 5, 7])

    def seeds_with(slopes):
        return frame_of(claim, {("Web-DINO", "Average"): [list(40 + s * x) for s in slopes]},
                        seeds=list(range(len(slopes))))

    noisy = C.evaluate(claim, seeds_with([1.0, 0.1, 0.9]))  # mean 0.67 > 0.5, but 2 se below it
    tight = C.evaluate(claim, seeds_with([0.66, 0.67, 0.68]))
    assert noisy.quantities["slope"][0] == pytest.approx(2 / 3)
    assert noisy.quantities["slope"][2] == 3 and noisy.quantities["slope"][1] > 0.4
    assert noisy.verdict == C.FAILS and "3 seeds" in noisy.evidence
    assert tight.verdict == C.HOLDS
    # one seed with the same mean and no spread holds: the margin comes only from seeds
    assert C.evaluate(claim, seeds_with([2 / 3])).verdict == C.HOLDS
    # a seed short of one run is named, not judged on the other seeds alone
    frame = seeds_with([1.0, 0.1, 0.9])
    frame = frame[~((frame["seed"] == 1) & (frame["source"] == claim.series[0].runs[2]))]
    short = C.evaluate(claim, frame)
    assert short.verdict == C.NOT_MEASURABLE
    assert short.missing == [f"Average of {claim.series[0].runs[2]} (seed 1)"]


EXPECTED_PUBLISHED = {
    "dino_scales_with_size": C.HOLDS, "dino_scales_better_than_clip": C.HOLDS,
    "dino_leads_clip_vision_centric": C.HOLDS, "dino_overtakes_clip_with_size": C.HOLDS,
    "ocr_gap_closes_with_size": C.HOLDS,
    "ocr_gap_closes_with_samples": C.NOT_MEASURABLE,  # CLIP-7B at 1B/4B/8B seen is not printed
    "more_samples_help": C.HOLDS, "more_samples_raise_ocr": C.HOLDS, "mae_scales_with_size": C.HOLDS,
    "mae_beats_dino_on_ocr": C.HOLDS,
    "in1k_does_not_scale": C.HOLDS, "text_filter_raises_ocr": C.HOLDS, "heavy_filter_beats_clip": C.HOLDS,
    "dense_degrades_with_samples": C.HOLDS,
    "alignment_rises_with_size": C.NOT_MEASURABLE, "alignment_rises_with_samples": C.NOT_MEASURABLE,
    "higher_resolution_helps": C.HOLDS,
    "web_data_raises_alignment": C.NOT_MEASURABLE,  # Fig. 9's bars have no printed values
}


def test_verdicts_on_the_papers_own_numbers():
    results = {r.claim.id: r for r in C.evaluate_all(published_runs_frame())}
    assert {k: r.verdict for k, r in results.items()} == EXPECTED_PUBLISHED
    q = {k: r.quantities for k, r in results.items()}
    # Tables 6 / 12: Web-DINO gains ~1.7 points per doubling of size, CLIP ~0.1
    assert q["dino_scales_better_than_clip"]["slope[Web-DINO]"][0] == pytest.approx(1.70, abs=0.01)
    assert q["dino_scales_better_than_clip"]["slope[CLIP]"][0] == pytest.approx(0.14, abs=0.01)
    assert q["dino_leads_clip_vision_centric"]["gap_largest"][0] == pytest.approx(61.47 - 55.42)
    assert q["higher_resolution_helps"]["step[224->378]"][0] == pytest.approx(57.43 - 55.24)
    # categories from the 16 two-decimal benchmarks, not Tables 2 and 3's one decimal
    assert q["text_filter_raises_ocr"]["ocr_gain[heavy]"][0] == pytest.approx(40.42 - 26.78, abs=0.01)
    # Table 8: +12.6 (8B seen: Table 3's printed 39.4 is kept over the 39.36 its sub-scores give)
    assert q["more_samples_raise_ocr"]["gain_last_vs_first"][0] == pytest.approx(39.36 - 26.71, abs=0.005)
    assert "clip7b-full1b-224" in " ".join(results["ocr_gap_closes_with_samples"].missing)
    # Tables 6 / 12: CLIP leads by 3.29 at 1B, Web-DINO by 0.90 at 7B; Table 2 (13): heavy vs CLIP-2B
    assert q["dino_overtakes_clip_with_size"]["gap_smallest"][0] == pytest.approx(49.01 - 52.30, abs=0.005)
    assert q["dino_overtakes_clip_with_size"]["gap_largest"][0] == pytest.approx(53.87 - 52.97, abs=0.005)
    assert q["heavy_filter_beats_clip"]["gap[OCR & Chart]"][0] == pytest.approx(40.42 - 36.06, abs=0.005)
    # Table 9: ADE20K lin. 49.08 -> 42.14 mIoU, NYUd lin.1 0.380 -> 0.491 m
    assert q["dense_degrades_with_samples"]["rel_loss[ade20k_linear]"][0] == pytest.approx(1 - 42.14 / 49.08)
    assert q["dense_degrades_with_samples"]["rel_loss[nyud_lin1]"][0] == pytest.approx(0.491 / 0.380 - 1)


# ---- the check on a synthetic run-scale results tree -------------------------------------------
def _category_values(run: str) -> dict[str, float]:
    """Trends chosen so every claim holds except "higher resolution helps" (resolution hurts here)."""
    r = Run.parse(run)
    s = math.log2(specs.PARAMS_B[r.size])
    n = math.log2(specs.SAMPLES_B[r.samples]) - 1 if r.samples else 0.0
    steps = {224: 0, 378: 1, 518: 2}[int(r.res)]
    if r.method == "clip":
        return {"General": 60 + 0.2 * s, "Knowledge": 45.0, "OCR & Chart": 35.0, "Vision-Centric": 48 + 0.1 * s}
    if r.data == "in1k":
        return {"General": 55.0, "Knowledge": 40.0, "OCR & Chart": 15.0, "Vision-Centric": 45.0}
    ocr = 20 + 3 * s + 2 * n + {"full": 0, "light": 5, "heavy": 16}[r.data] + (3 if r.method == "mae" else 0)
    gain = 1.0 if r.method == "mae" else 2.0
    return {"General": 55 + gain * s + n - steps, "Knowledge": 42 + gain * s + n - steps, "OCR & Chart": ocr - steps,
            "Vision-Centric": 50 + 2 * s + n - steps}


def write_tree(root, plan: Plan, blind_average: float = 20.0, blind_categories=None) -> list[str]:
    """Eval JSONs for every requested (run, seed, kind), with a small per-seed jitter, the VQA
    probe's controls (raw-pixel tokens at 40 Average and in each category, zeros at ``blind_average``
    or ``blind_categories``' own) and the classic tasks' answers without the image (under every
    run's numbers but ADE20K lin.'s 20 mIoU)."""
    paths = plan.check_inputs()
    for path in paths:
        if "/controls/" in path:
            pixels = path.endswith("pixels/vqa.json")
            scores = {"Average": 40.0 if pixels else blind_average,
                      **{c: 40.0 if pixels else (blind_categories or {}).get(c, blind_average) for c in VQA_CATEGORIES}}
            metrics = ({"in1k_linear": 6.25, "ade20k_linear": 21.0, "ade20k_ms": 21.0, "nyud_lin1": 3.0,
                        "nyud_lin4": 3.0} if path.endswith("classic.json") else scores)
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(json.dumps({"metrics": metrics}))
        if "/data/filter/" in path:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(json.dumps({"kept_fraction": 0.5 if "light" in path else 0.02}))
        if "/evals/" not in path:
            continue
        run_id, kind = path.split("/")[-2], path.split("/")[-1][:-5]
        run = run_id.split(".s")[0]
        jitter = 0.05 * ((sum(map(ord, run_id)) % 3) - 1)
        if kind == "vqa":
            cats = _category_values(run)
            metrics = {b: cats[c] + jitter for c, bs in VQA_CATEGORIES.items() for b in bs}
            metrics["mme"] *= 20
        elif kind == "alignment":
            r = Run.parse(run)
            metrics = {"alignment/minilm": 0.2 + 0.01 * math.log2(specs.PARAMS_B[r.size])
                       + 0.01 * math.log2(specs.SAMPLES_B[r.samples or "2b"]) + jitter / 100}
        else:
            n = math.log2(specs.SAMPLES_B[Run.parse(run).samples or "2b"]) - 1  # dense tasks worsen with it
            metrics = {"in1k_linear": 50.0 + jitter, "ade20k_linear": 20.0 - n, "ade20k_ms": 22.0,
                       "nyud_lin1": 0.8 + 0.05 * n, "nyud_lin4": 0.7}
        details = {"alignment/minilm/se": 0.001} if kind == "alignment" else {}
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps({"metrics": metrics, "details": details}))
    return paths


def synthetic_config(stages=("data", "pretrain", "vqa", "classic", "alignment"), seeds=(0, 1)) -> dict:
    config = copy.deepcopy(yaml.safe_load((REPO / "config/mini.yaml").read_text()))
    config.update(scale="synth", stages=list(stages), seeds=list(seeds))
    return config


def test_check_on_a_synthetic_mini_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = synthetic_config()
    plan = Plan(config)
    paths = write_tree(tmp_path, plan)
    assert any(".s1/" in p for p in paths)  # the second seed has its own eval files
    frame = runs_frame(paths, first_seed=0)
    assert set(frame["seed"]) == {0, 1}
    results, table = run_check(config, paths, tmp_path / "paper/synth/check", REPO / "results/published")
    verdicts = {r.claim.id: r.verdict for r in results}
    assert verdicts.pop("higher_resolution_helps") == C.FAILS
    # the off-the-shelf DINOv2 is evaluated only where it is imported (pretrain.run_sources)
    assert verdicts.pop("web_data_raises_alignment") == C.NOT_MEASURABLE
    assert {r.claim.id: r for r in results}["web_data_raises_alignment"].missing == ["alignment of dinov2-g-224"]
    # ADE20K lin. 20 / 19 / 18 mIoU against 21 without the image: the dense trend is not measurable
    assert verdicts.pop("dense_degrades_with_samples") == C.NOT_MEASURABLE
    dense = {r.claim.id: r for r in results}["dense_degrades_with_samples"]
    assert dense.evidence.startswith("not beating the best answer without the image: dino7b-full2b-224's ADE20K "
                                     "lin. (mIoU) 20 (without the image 21), dino7b-full4b-224's")
    assert "Without the control: holds; rel_loss[ade20k_linear] = +0.10" in dense.evidence
    from webssl_repro.paper.check import gate_on_no_image
    beaten = {"ade20k_linear": 5.0, "nyud_lin1": 3.0}  # every run's number beats these: the verdict stands
    held = C.evaluate(C.get_claim("dense_degrades_with_samples"), frame)
    assert gate_on_no_image([held], frame, beaten)[0].verdict == C.HOLDS == held.verdict
    assert set(verdicts.values()) == {C.HOLDS}, verdicts
    slope = {r.claim.id: r for r in results}["dino_scales_with_size"].quantities["slope"]
    assert slope[2] == 2 and slope[0] == pytest.approx((2 + 2 + 3 + 2) / 4, abs=0.05)  # mean of category slopes
    written = pd.read_csv(tmp_path / "paper/synth/check/claims.tsv", sep="\t")
    assert list(written["verdict"]) == [r.verdict for r in results]
    assert set(table["status"]) == {"not comparable"}
    pct = table.set_index(["source", "metric"])["reproduced"]
    assert pct[("dino2b-heavy2b-224", "data_pct")] == pytest.approx(2.0)
    assert pct[("clip2b-full2b-224", "data_pct")] == 100
    claims_md = (tmp_path / "paper/synth/check/claims.md").read_text()
    assert "does not hold" in claims_md
    n = sum(r.endswith("/classic.json") and "/evals/" in r for r in paths)  # every classic run, both seeds
    assert n > 10 and f"IN-1k lin. (top-1) {n} of {n} (without the image 6.25)" in claims_md
    assert f"ADE20K lin. (mIoU) 0 of {n} (without the image 21)" in claims_md and f"NYUd lin.4 (RMSE) {n} of {n}" in claims_md


def test_malformed_results_are_named_by_file(tmp_path):
    """render / check / report read hand-edited or cut-short result files: each is named."""
    evals = tmp_path / "results/synth/evals/dino1b-full2b-224"
    evals.mkdir(parents=True)
    bad = {"vqa.json": ("{\"metrics\": [1, 2]}", r"vqa.json: 'metrics' is a list, not a mapping"),
           "classic.json": ('{"metrics": {"in1k_linear": "n/a"}}', r"classic.json: metric 'in1k_linear' has "
                                                                    r"non-numeric value 'n/a'"),
           "alignment.json": ('{"metrics": {', r"alignment.json: not valid JSON at line 1")}
    for name, (text, message) in bad.items():
        (evals / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            runs_frame([evals / name])
    # values a renderer would show as "no number", silently: each is refused by file and key
    for name, text, message in (
            ("vqa.json", '{"metrics": {"gqa": NaN}}', r"vqa.json: metric 'gqa' is nan, not a finite number in \[0, 100\]"),
            ("vqa.json", '{"metrics": {"gqa": true}}', r"metric 'gqa' has non-numeric value True"),
            ("vqa.json", '{"metrics": {"gqa": "55.1"}}', r"metric 'gqa' has non-numeric value '55.1'"),
            ("vqa.json", '{"metrics": {"mme": 5000}}', r"vqa.json: metric 'mme' is 5000, not a finite number in \[0, 2000\]"),
            ("vqa.json", '{"metrics": {"GQA": 55.1}}', r"vqa.json: unknown vqa metric 'GQA'; expected one of mme, "),
            ("classic.json", '{"metrics": {"nyud_lin1": Infinity}}', r"metric 'nyud_lin1' is inf, not a finite number in \[0, inf\]"),
            ("classic.json", '{"metrics": {"in1k_linear": 0.5, "in1k": 50}}', r"unknown classic metric 'in1k'"),
            ("alignment.json", '{"metrics": {"minilm": 0.02}}', r"expected alignment/<language model>"),
            ("alignment.json", '{"metrics": {"alignment/minilm": 0.02}, "details": [1, 2]}',
             r"alignment.json: 'details' is a list, not a mapping")):
        (evals / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            runs_frame([evals / name])
    (evals / "vqa.json").write_text('{"metrics": {"gqa": 55, "mme": 1500.5, "Average": 50.0}}')
    frame = runs_frame([evals / "vqa.json"])
    assert dict(zip(frame["metric"], frame["value"])) == {"gqa": 55.0, "mme": 1500.5, "Average": 50.0, "data_pct": 100.0}
    filtered = tmp_path / "results/synth/data/filter"
    filtered.mkdir(parents=True)
    (filtered / "heavy.json").write_text('{"variant": "heavy"}')
    with pytest.raises(ValueError, match=r"heavy.json: cannot read its kept_fraction: KeyError"):
        runs_frame([filtered / "heavy.json"])


def test_vqa_claims_not_measurable_where_the_probe_does_not_read_images(tmp_path, monkeypatch):
    """The mini VQA probe scores raw-pixel tokens like zeros (benchmarks/README.md): its claims are
    then not measurable, whatever the runs' numbers say, and the evidence keeps that verdict;
    claims on alignment numbers are unaffected. A gain of MIN_PROBE_GAIN is enough."""
    from webssl_repro.paper.check import MIN_CATEGORY_PROBE_GAIN, MIN_PROBE_GAIN, gate_on_probe, probe_controls

    monkeypatch.chdir(tmp_path)
    config = synthetic_config(seeds=(0,))
    plan = Plan(config)
    assert plan.vqa_controls() == ["pixels", "blind"]
    paths = write_tree(tmp_path, plan, blind_average=39.0)
    assert sum("/controls/" in p and p.endswith("/vqa.json") for p in paths) == 2
    results = {r.claim.id: r for r in run_check(config, paths, tmp_path / "out", None)[0]}
    vqa = [c for c in C.CLAIMS if any(s.eval == "vqa" for s in c.series)]
    assert len(vqa) == 14
    for claim in vqa:
        assert results[claim.id].verdict == C.NOT_MEASURABLE, results[claim.id]
        assert "does not read images" in results[claim.id].evidence
    assert "Without the control: holds" in results["dino_scales_with_size"].evidence
    assert results["alignment_rises_with_size"].verdict == C.HOLDS
    claims_md = (tmp_path / "out" / "claims.md").read_text()
    assert "raw-pixel tokens 40.00, zero tokens 39.00 Average (gain +1.00; needs >= +5)" in claims_md
    holding = [r for r in results.values() if "Without the control: holds" in r.evidence]
    ungated = C.evaluate_all(C.pd.DataFrame(columns=["source", "metric", "value"]))
    assert len(holding) == 14 and all(r.verdict == C.NOT_MEASURABLE for r in ungated)
    edge = {"pixels": {m: 25.0 + (MIN_PROBE_GAIN if m == "Average" else MIN_CATEGORY_PROBE_GAIN)
                       for m in ("Average", *VQA_CATEGORIES)},
            "blind": dict.fromkeys(("Average", *VQA_CATEGORIES), 25.0)}
    assert gate_on_probe(holding, edge)[0] == holding  # a gain of exactly the threshold is enough
    edge["pixels"]["Average"] -= 0.01
    assert all(r.verdict == C.NOT_MEASURABLE for r in gate_on_probe(holding, edge)[0])
    with pytest.raises(ValueError, match="pair"):
        probe_controls([p for p in paths if not p.endswith("blind/vqa.json")])


def test_a_category_the_probe_does_not_read_gates_only_its_claims(tmp_path, monkeypatch):
    """Raw pixels +20 over zeros on the Average, all of it outside OCR & Chart (small chart text a
    probe cannot read): the claims on OCR & Chart are not measurable, those on the Average stand."""
    monkeypatch.chdir(tmp_path)
    config = synthetic_config(seeds=(0,))
    paths = write_tree(tmp_path, Plan(config), blind_average=20.0, blind_categories={"OCR & Chart": 40.0})
    results = {r.claim.id: r for r in run_check(config, paths, tmp_path / "out", None)[0]}
    ocr = [c.id for c in C.CLAIMS if any(s.eval == "vqa" and "OCR & Chart" in s.metrics for s in c.series)]
    assert sorted(ocr) == ["heavy_filter_beats_clip", "mae_beats_dino_on_ocr", "more_samples_raise_ocr",
                           "ocr_gap_closes_with_samples", "ocr_gap_closes_with_size", "text_filter_raises_ocr"]
    for claim in ocr:
        assert results[claim].verdict == C.NOT_MEASURABLE and "but not for OCR & Chart" in results[claim].evidence
    assert results["dino_scales_with_size"].verdict == C.HOLDS
    assert results["more_samples_help"].verdict == C.HOLDS
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "Average (gain +20.00; needs >= +5); General +20.00, Knowledge +20.00, OCR & Chart +0.00, " in md
    assert "(each needs >= +10): the probe reads images, but not for OCR & Chart, whose claims" in md


def test_an_imported_dinov2_is_compared_with_web_dino_1b_by_name():
    """Where DINOv2 ViT-g is imported, Fig. 9's first two bars are requested at the scale and the
    claim reads them by name (no run-name fields): the evidence names both sources."""
    cfg = load_config(REPO / "config/paper.yaml")
    cfg["pretrain"]["run_sources"] = {"dinov2-g-224": {"checkpoint": "facebook/dinov2-giant"}}
    requested = requested_pairs(Plan(cfg))
    assert {("dinov2-g-224", "alignment"), ("dino1b-full2b-224", "alignment")} <= requested
    claim = C.get_claim("web_data_raises_alignment")
    frame = frame_of(claim, CASES["web_data_raises_alignment"][0])
    result = C.evaluate(claim, frame, requested)
    assert result.verdict == C.HOLDS and result.quantities["rel_gain[minilm]"][0] == pytest.approx(0.0625)
    assert result.quantities["gain_z[minilm]"][0] == pytest.approx(0.01 / math.sqrt(2 * 0.002 ** 2))
    assert "dinov2-g-224 0.16, dino1b-full2b-224 0.17" in result.evidence


def test_unrequested_stage_makes_claims_not_measurable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = synthetic_config(stages=("data", "pretrain", "classic", "alignment"), seeds=(0,))
    plan = Plan(config)
    assert ("dino1b-full2b-224", "vqa") not in requested_pairs(plan)
    paths = write_tree(tmp_path, plan)
    results = {r.claim.id: r for r in run_check(config, paths, tmp_path / "out", None)[0]}
    assert results["dino_scales_with_size"].verdict == C.NOT_MEASURABLE
    assert "vqa of dino1b-full2b-224" in results["dino_scales_with_size"].evidence
    assert results["alignment_rises_with_size"].verdict == C.HOLDS


def test_comparison_modes():
    published = published_runs_frame()
    ours = published[published["source"] == "dino7b-full2b-224"].copy()
    ours.loc[ours["metric"] == "Average", "value"] += 2.0  # outside a 1.0 tolerance
    ours.loc[ours["metric"] == "General", "value"] += 0.5  # within
    tol = {"Average": 1.0, "General": 1.0}
    table = comparison(ours, published, ["table6"], tol, "comparable").set_index(["source", "metric"])
    assert table.loc[("dino7b-full2b-224", "Average"), "status"] == "outside"
    assert table.loc[("dino7b-full2b-224", "Average"), "difference"] == pytest.approx(2.0)
    assert table.loc[("dino7b-full2b-224", "mmbench"), "status"] == "no tolerance"
    assert table.loc[("dino1b-full2b-224", "Average"), "status"] == "missing"
    other = comparison(ours, published, ["table6"], tol, "not comparable")
    assert set(other.dropna(subset=["reproduced"])["status"]) == {"not comparable"}
    paper = comparison(published, published, ["table6", "table7"], tol, "published")
    assert set(paper["status"]) == {"paper itself"} and len(paper) == 5 * 17 + 5 * 5


def test_paper_scale_check_judges_numbers_against_tolerances(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "config/paper.yaml")
    assert config["check"]["comparable"] is True
    paths = write_tree(tmp_path, Plan(config))
    table = run_check(config, paths, tmp_path / "out", None)[1].set_index(["source", "metric"])
    # synthetic Web-DINO-1B Average is (55 + 42 + 20 + 50) / 4 = 41.75 vs the paper's 49.01: outside 1.0
    row = table.loc[("dino1b-full2b-224", "Average")]
    assert row["reproduced"] == pytest.approx(41.75, abs=0.06) and row["status"] == "outside"
    assert row["tolerance"] == 1.0 and row["published"] == 49.01
    assert table.loc[("dino1b-full2b-224", "mmbench"), "status"] == "no tolerance"

