import pytest

from webssl_repro.evaluate.vqa import category_scores
from webssl_repro.metrics import VQA_BENCHMARKS


def test_hand_computed_categories():
    scores = dict.fromkeys(VQA_BENCHMARKS, 50.0)
    scores["mme"] = 1600.0  # -> 80 in General
    scores["chartqa"] = 10.0
    out = category_scores(scores)
    assert out["General"] == pytest.approx((80 + 50 * 3) / 4)
    assert out["Knowledge"] == pytest.approx(50.0)
    assert out["OCR & Chart"] == pytest.approx((10 + 50 * 3) / 4)
    assert out["Vision-Centric"] == pytest.approx(50.0)
    assert out["Average"] == pytest.approx((57.5 + 50 + 40 + 50) / 4)


def test_missing_unknown_and_out_of_range_keys_are_named():
    scores = dict.fromkeys(VQA_BENCHMARKS, 50.0)
    scores["mme"] = 1500.0
    with pytest.raises(KeyError, match="docvqa"):
        category_scores({k: v for k, v in scores.items() if k != "docvqa"})
    with pytest.raises(KeyError, match="vqav2"):
        category_scores({**scores, "vqav2": 1.0})
    with pytest.raises(ValueError, match="mme"):
        category_scores({**scores, "mme": 75.0 * 40})


def test_a_partial_benchmark_set_reports_its_benchmarks_without_categories():
    """Fewer than the 16 benchmarks (an eval limited to some) has no categories to report."""
    from webssl_repro.evaluate.vqa.stage import _metrics

    metrics = _metrics({"benchmarks": {"gqa": 41.0}, "categories": None}, [{"stage": 1}], {})
    assert metrics == {"gqa": 41.0, "_training": [{"stage": 1}]}


def test_standard_errors_over_the_questions_by_hand():
    """Each benchmark at 50 % over 100 units: 5 points; a category of four, sqrt(4 x 25) / 4 = 2.5;
    the Average of four categories, 1.25. MME enters on its percent scale (1000 of 2000 = 50 %)."""
    from webssl_repro.evaluate.vqa.categories import category_standard_errors

    scores = {**dict.fromkeys(VQA_BENCHMARKS, 50.0), "mme": 1000.0}
    se = category_standard_errors(scores, dict.fromkeys(VQA_BENCHMARKS, 100))
    assert se["General"] == pytest.approx(2.5) and se["Average"] == pytest.approx(1.25)
    assert se["gqa"] == pytest.approx(5.0) and se["mme"] == pytest.approx(100.0)  # MME's on its 2000 scale
    se = category_standard_errors({**scores, "chartqa": 90.0}, {**dict.fromkeys(VQA_BENCHMARKS, 100), "docvqa": 25})
    assert se["OCR & Chart"] == pytest.approx((3.0 ** 2 + 10.0 ** 2 + 2 * 5.0 ** 2) ** 0.5 / 4)
    assert category_standard_errors({**scores, "gqa": 100.0}, dict.fromkeys(VQA_BENCHMARKS, 100))["General"] == \
        pytest.approx((3 * 25) ** 0.5 / 4)  # a perfect score varies by nothing


def test_scoring_units_are_the_groups_a_benchmark_scores_together():
    from webssl_repro.evaluate.vqa.scorers import scoring_units

    assert scoring_units("gqa", ["a", "b", "c"]) == 3
    assert scoring_units("mmvp", [{"answer": "A", "pair_id": p} for p in (0, 0, 1, 1)]) == 2
    assert scoring_units("mmbench", [{"answer": "A", "circular_id": c} for c in ("q", "q", "q", "r")]) == 2
    mme = [{"answer": "yes", "subtask": t, "pair_id": p} for t in ("color", "count") for p in (0, 0, 1, 1)]
    assert scoring_units("mme", mme) == 4  # two images in each of two subtasks
    # CV-Bench's mean of 3 and 1 rows' accuracies has the error of 4 / (1/3 + 1) = 3 units
    cv = [{"answer": "A", "subtask": s} for s in ("ade", "ade", "ade", "coco")]
    assert scoring_units("cvbench2d", cv) == pytest.approx(3.0)
