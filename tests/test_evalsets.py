"""Eval sets from held-out seeds and the 16 benchmark scorers."""
from __future__ import annotations

from collections import Counter
from string import ascii_uppercase

import numpy as np
import pytest

from webssl_repro.data.evalsets import (
    ALIGNMENT_PAIRS, EVAL_SEED_BASE, SPLITS, TASKS, check_train_seed, classic_items, eval_seed, load_evalset,
    vqa_items, write_evalset,
)
from webssl_repro.data.miniweb import OBJECT_CLASSES, sample_spec
from webssl_repro.evaluate.vqa.categories import category_scores
from webssl_repro.evaluate.vqa.scorers import anls, normalize_answer, option_letter, score, single_answer, vqa_accuracy
from webssl_repro.metrics import VQA_BENCHMARKS


def test_eval_seeds_are_held_out_and_distinct():
    seeds = [eval_seed(t, s) for t in TASKS for s in SPLITS]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= EVAL_SEED_BASE
    assert eval_seed("mme", "test", base=1) not in seeds
    assert check_train_seed(0) == 0
    with pytest.raises(ValueError):
        check_train_seed(EVAL_SEED_BASE)


def test_classic_sets():
    labels = [it["label"] for it in classic_items("classification", "val", 32)]
    assert np.bincount(labels, minlength=16).tolist() == [2] * len(OBJECT_CLASSES)
    seg = next(classic_items("segmentation", "test", 1))
    assert seg["seg"].shape == (64, 64) and seg["seg"].max() > 0
    depth = next(classic_items("depth", "test", 1, size=32))
    assert depth["depth"].shape == (32, 32) and depth["depth"].min() >= 1.0
    # each item's target is its own image's: the world's render of the same scene
    from webssl_repro.data.evalsets import SCENE_KINDS
    from webssl_repro.data.miniweb import MiniWebConfig, generate

    for task, target in (("segmentation", "seg"), ("depth", "depth")):
        items = list(classic_items(task, "val", 3, size=32))
        for index, item in enumerate(items):
            scene = generate(eval_seed(task, "val"), index, MiniWebConfig(size=32, kinds=SCENE_KINDS))
            assert np.array_equal(np.asarray(item["image"]), np.asarray(scene.image))
            assert np.array_equal(item[target], getattr(scene, target))
        assert not np.array_equal(items[0][target], items[1][target]) and np.unique(items[0][target]).size > 2
    # 1024 alignment captions (from specs: captions are metadata, no pixels needed)
    seed = eval_seed("alignment", "test")
    caps = [sample_spec(seed, i)["caption"] for i in range(ALIGNMENT_PAIRS)]
    assert len(set(caps)) > 0.9 * ALIGNMENT_PAIRS


@pytest.mark.parametrize("benchmark", VQA_BENCHMARKS)
def test_vqa_items_are_well_formed_and_deterministic(benchmark):
    items = vqa_items(benchmark, "test", 12)
    again = vqa_items(benchmark, "test", 12)
    assert [i["question"] for i in items] == [i["question"] for i in again]
    assert np.array_equal(np.asarray(items[0]["image"]), np.asarray(again[0]["image"]))
    train = vqa_items(benchmark, "train", 12)
    assert {i["image_id"] for i in train}.isdisjoint({i["image_id"] for i in items})
    for it in items:
        assert it["question"] and str(it["answer"]) and it["benchmark"] == benchmark
        if it["answer_type"] == "mc":
            assert it["answer"] in "ABCD"[: len(it["choices"])]
    refs = [{k: v for k, v in it.items() if k != "image"} for it in items]
    assert score(benchmark, [r["answer"] for r in refs], refs) == (2000.0 if benchmark == "mme" else 100.0)


@pytest.mark.parametrize("benchmark", ["mmbench", "seed", "mmmu", "ai2d", "mmvp", "cvbench3d", "realworldqa"])
def test_answers_are_not_positionally_biased(benchmark):
    """Each letter is the answer about as often as a uniform position among each question's
    own choices makes it (1/2 for a 2-choice question, 1/4 for a 4-choice one): within 0.15
    of that share, two-sided, on 60 questions (largest gap measured: 0.12, realworldqa's B)."""
    items = vqa_items(benchmark, "val", 60)
    letters = Counter(it["answer"] for it in items)
    expected = Counter()
    for it in items:
        for letter in ascii_uppercase[:len(it["choices"])]:
            expected[letter] += 1 / len(it["choices"])
    assert set(letters) <= set(expected) and len(expected) >= 2, (letters, expected)
    gaps = {letter: (letters[letter] - expected[letter]) / 60 for letter in expected}
    assert max(abs(g) for g in gaps.values()) < 0.15, (gaps, letters)


def test_vqa_and_classic_tars_round_trip(tmp_path):
    p = write_evalset(str(tmp_path / "chartqa-test.tar"), "chartqa", "test", 6)
    recs = load_evalset(p["path"])
    assert len(recs) == 6 and recs[0]["benchmark"] == "chartqa" and recs[0]["image"].size == (64, 64)
    assert recs[0]["answer"] == vqa_items("chartqa", "test", 1)[0]["answer"]
    s = write_evalset(str(tmp_path / "seg.tar"), "segmentation", "val", 3)
    recs = load_evalset(s["path"])
    assert recs[2]["seg"].shape == (64, 64) and recs[2]["seg"].dtype == np.uint8
    # one image that does not decode: the set is refused, not scored without it
    from helpers_tar import rewrite_tar

    images = []  # the first image's name, met first

    def spoil_first_image(name: str, payload: bytes) -> bytes:
        if name.endswith((".jpg", ".png")) and not images:
            images.append(name)
            return b"not an image"
        return payload

    bad = rewrite_tar(s["path"], tmp_path / "seg-bad.tar", spoil_first_image)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"seg-bad.tar: 1 sample\(s\) do not decode "
                                                                       r"and 0 shard\(s\) cannot be read"):
        load_evalset(bad)


# --- scorers: one hand-computed case per benchmark -----------------------------------------
def _mc(answer, choices=("red", "blue", "green", "yellow"), **kw):
    return dict(answer=answer, choices=list(choices), **kw)


def test_normalisation_and_cambrians_answer_reading():
    assert normalize_answer("The Two Apples.") == "2 apples" and normalize_answer("1,000 m") == "1000 m"
    # EvalAI's processor, as Cambrian's TextVQA evaluator applies it: % & # kept, periods dropped
    # unless before a digit, a glued mark spaced, a spaced one dropped, "none" a number, contractions
    assert [normalize_answer(a) for a in ("50%", "a&w", "#1", "U.S.A.", "3.5", "red-blue", "red - blue", "None",
                                          "dont", "couldnt've", "John's")] == \
        ["50%", "a&w", "#1", "usa", "3.5", "red blue", "red blue", "0", "don't", "couldn't've", "john 's"]
    assert single_answer("Answer: Left.") == "left" and single_answer("The answer is 12.") == "12"
    assert option_letter("(B) blue") == "b" and option_letter("The answer is C.") == "c"
    assert option_letter("I am not sure") == "i"  # Cambrian reads the first character, whatever it is
    assert option_letter("") == ""
    assert anls("ALICE", ["alice"]) == 1.0 and anls("alise", ["alice"]) == pytest.approx(0.8)
    assert anls("bob", ["alice"]) == 0.0


def test_mme_pairs_acc_plus():
    refs = [dict(answer="yes", pair_id="1", subtask="existence"), dict(answer="no", pair_id="1", subtask="existence"),
            dict(answer="yes", pair_id="2", subtask="existence"), dict(answer="no", pair_id="2", subtask="existence")]
    # 3/4 right (acc 75), 1/2 images both right (acc+ 50) -> 125 per subtask -> x10 = 1250
    assert score("mme", ["Yes.", "no", "yes", "yes"], refs) == pytest.approx(1250.0)
    per = {b: 50.0 for b in VQA_BENCHMARKS}
    per["mme"] = 1250.0
    assert category_scores(per)["General"] == pytest.approx((62.5 + 150) / 4)


@pytest.mark.parametrize("benchmark, expected", [("mmbench", 50), ("seed", 50), ("mmmu", 50), ("ai2d", 50),
                                                 ("sqa", 50), ("realworldqa", 25)])
def test_multiple_choice_scorers(benchmark, expected):
    """The letter is the answer's first character ('yellow' reads as 'y'); ScienceQA takes the
    text before a '.' ('(a) red' is not 'a') or the right option's text ('yellow'); RealWorldQA
    compares the first word ('(a)' is not 'a')."""
    refs = [_mc("B"), _mc("A"), _mc("D"), _mc("C")]
    assert score(benchmark, ["B", "(A) red", "yellow", "A"], refs) == pytest.approx(expected)


def test_mmbench_is_circular():
    refs = [_mc("A", circular_id="q1"), _mc("B", circular_id="q1"), _mc("C", circular_id="q2"), _mc("D", circular_id="q2")]
    assert score("mmbench", ["A", "B", "C", "A"], refs) == 50.0  # q2 has one shift wrong: 3/4 rows, 1/2 questions


def test_gqa_exact_and_textvqa_vqa_accuracy():
    assert score("gqa", ["Left", "the red", "blue."], ["left", "red", "blue"]) == pytest.approx(200 / 3)
    ten = ["bakery"] * 2 + ["cafe"] * 8
    # "bakery" matches 2 annotators: 1 of the others when one of them is left out, else 2 -> (2/3 + 8 x 2/3) / 10
    assert vqa_accuracy("Bakery.", ten) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("cafe", ten) == 1.0 and vqa_accuracy("taxi", ten) == 0.0
    assert score("textvqa", ["Bakery.", "cafe"], [{"answer": "bakery", "answers": ten}, {"answer": "taxi"}]) == 30.0


def test_mathvista_and_chartqa_numbers_within_5_percent():
    refs = ["7", "5", "5", "5", dict(answer="B", choices=["1", "2"])]
    assert score("mathvista", ["7", "There are 5", "6", "5.1", "b"], refs) == pytest.approx(60.0)
    # Cambrian's MathVista and MMMU scripts take the 5 % of the answer, not of the ground truth
    assert score("mathvista", ["105.2", "100"], ["100", "105.2"]) == 50.0
    assert score("mmmu", ["105.2", "100"], ["100", "105.2"]) == 50.0
    # ... so an infinite answer would be within 5 % of itself: only finite numbers count
    assert score("mathvista", ["inf", "-inf", "nan"], ["12", "0", "3"]) == 0.0
    assert score("mmmu", ["Infinity"], ["3.5"]) == 0.0 and score("chartqa", ["inf"], ["inf"]) == 0.0
    # ChartQA: 19 vs 20 within 5 %, 17 not; labels exactly; '45%' is not a number, so not 45
    assert score("chartqa", ["19", "17", "Mar", "45%"], ["20", "20", "Mar", "45"]) == pytest.approx(50.0)


def test_ocrbench_contains_and_docvqa_anls():
    assert score("ocrbench", ["the word is OPEN", "STOP"], ["OPEN", "EXIT"]) == 50.0
    formula = dict(answer="x ^ { 2 }", subtask="Handwritten Mathematical Expression Recognition")
    assert score("ocrbench", ["x^{2}", "X^{2}"], [formula, formula]) == 50.0  # spaces dropped, case kept
    assert score("docvqa", ["ALICE", "alise", "12"], ["ALICE", "ALICE", "45"]) == pytest.approx((100 + 80 + 0) / 3)


def test_mmvp_counts_pairs():
    refs = [_mc("A", ("left", "right"), pair_id="p"), _mc("B", ("left", "right"), pair_id="p"),
            _mc("A", ("left", "right"), pair_id="q"), _mc("B", ("left", "right"), pair_id="q")]
    assert score("mmvp", ["A", "B", "A", "A"], refs) == 50.0
    assert score("mmvp", ["left", "(b)", "A", "Right."], refs) == 100.0  # the option's text counts too
    # without choices there is no option text: an empty answer is wrong, not a match of ''
    assert score("mmvp", ["", ""], [dict(answer="A", pair_id="p"), dict(answer="B", pair_id="p")]) == 0.0
    assert score("sqa", [""], [dict(answer="A")]) == 0.0
    with pytest.raises(ValueError, match="answer 'E' is not the letter of one of 2 choices"):
        score("sqa", ["A"], [_mc("E", ("left", "right"))])


def test_cvbench_averages_subtasks():
    refs = [_mc("A", subtask="count"), _mc("B", subtask="count"), _mc("A", subtask="relation"),
            _mc("A", subtask="relation"), _mc("A", subtask="relation"), _mc("A", subtask="relation")]
    # count 1/2 = 50, relation 4/4 = 100 -> 75 (plain accuracy would be 83.3)
    assert score("cvbench2d", ["A", "A", "A", "A", "A", "A"], refs) == pytest.approx(75.0)
    assert score("cvbench3d", ["B", "B", "A", "B", "B", "B"], refs) == pytest.approx((50 + 25) / 2)


def test_score_rejects_bad_input():
    with pytest.raises(KeyError):
        score("vqav2", ["a"], ["a"])
    with pytest.raises(ValueError):
        score("gqa", ["a", "b"], ["a"])


def test_evalset_stage_writes_all_benchmarks(tmp_path):
    from webssl_repro.data.stages import build_evalset

    m = build_evalset("vqa", {"vqa": {"test": 2}}, str(tmp_path / "evalsets" / "vqa.json"))
    assert set(m["splits"]) == {"test"} and set(m["splits"]["test"]) == set(VQA_BENCHMARKS)
    recs = load_evalset(str(tmp_path / "evalsets" / m["splits"]["test"]["mmvp"]))
    assert len(recs) == 2 and recs[0]["pair_id"] == recs[1]["pair_id"] and recs[0]["answer"] != recs[1]["answer"]
    c = build_evalset("captions", {}, str(tmp_path / "evalsets" / "captions.json"))
    assert c["counts"] == {"test": ALIGNMENT_PAIRS}


def test_the_workflow_builds_every_eval_set_the_data_stage_knows():
    """rules/data.smk and the classic rule take their eval sets from workflow_data, which the
    Snakefile can import without torch; they must be the data stage's own."""
    from webssl_repro.data.stages import EVAL_DEFAULTS
    from webssl_repro.workflow_data import CLASSIC_SETS, EVAL_SETS

    assert EVAL_SETS == tuple(EVAL_DEFAULTS)
    assert CLASSIC_SETS == ("classification", "segmentation", "depth")


def test_mmvp_twins_differ_in_pixels():
    """An MMVP pair asks one question of two images with opposite answers: the images must differ
    (a car's drawing is mirror-symmetric, so its left and right twins would be one image)."""
    items = vqa_items("mmvp", "test", 80)
    pairs: dict[str, list[np.ndarray]] = {}
    for it in items:
        pairs.setdefault(it["pair_id"], []).append(np.asarray(it["image"], dtype=np.int16))
    assert len(pairs) == 40 and all(len(p) == 2 for p in pairs.values())
    for pair_id, (a, b) in pairs.items():
        assert np.abs(a - b).max() > 0, pair_id
    assert {it["question"].split()[4] for it in items} == {"arrow", "fish"}  # "Which direction does the X ..."


def test_knowledge_and_attribute_questions_need_the_image():
    """SQA's and MathVista's facts of a class name the object by its colour, not its class (the
    class would give the answer away); GQA's "the object in front of X" has one answer."""
    from webssl_repro.data.evalsets import BENCHMARK_KINDS, eval_seed, vqa_draw
    from webssl_repro.data.miniweb import MiniWebConfig
    from webssl_repro.data.vqa_questions import _named

    cfg = MiniWebConfig(size=64)
    asked = Counter()
    for benchmark in ("sqa", "mathvista", "gqa"):
        seed = eval_seed(benchmark, "test")
        for index in range(300):
            for q, spec in vqa_draw(benchmark, seed, index, cfg):
                asked[benchmark, q["subtask"]] += 1
                if q["subtask"] in ("alive", "floats", "geometry"):
                    assert not set(q["question"].rstrip("?").split()) & set(OBJECT_CLASSES), q["question"]
                if q["subtask"] == "attribute":
                    other = q["question"].split(" in front of the ")[1].split("?")[0]
                    behind = next(o for n, o in _named(spec) if n == other)
                    nearer = [o for o in spec["objects"] if o["depth"] < behind["depth"]]
                    assert [o["colour"] for o in nearer] == [q["answer"]], (q["question"], spec["id"])
    assert min(asked[k] for k in [("sqa", "alive"), ("sqa", "floats"), ("mathvista", "geometry"),
                                  ("gqa", "attribute")]) >= 20, asked
