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
