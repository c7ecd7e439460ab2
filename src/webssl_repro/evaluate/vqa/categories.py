"""The paper's averaging rule for the 16 VQA benchmarks (paper §2.3; Table 16).

Each category is the plain mean of its four benchmarks, except that MME's perception
score (0-2000) enters General as ``MME/20``; ``Average`` is the mean of the four
category means. This reproduces every printed average within 0.01 (one paper row,
I-JEPA ViT-H in Table 14, is internally inconsistent; see tests).
"""
from __future__ import annotations

import math
from typing import Mapping

from webssl_repro.metrics import VQA_BENCHMARKS, VQA_CATEGORIES

MME_MAX = 2000.0


def category_scores(per_benchmark: Mapping[str, float]) -> dict[str, float]:
    missing = [b for b in VQA_BENCHMARKS if b not in per_benchmark]
    if missing:
        raise KeyError(f"category_scores: missing benchmark(s) {missing}; expected all of {list(VQA_BENCHMARKS)}")
    unknown = sorted(set(per_benchmark) - set(VQA_BENCHMARKS))
    if unknown:
        raise KeyError(f"category_scores: unknown benchmark key(s) {unknown}")
    mme = float(per_benchmark["mme"])
    if not 0.0 <= mme <= MME_MAX:
        raise ValueError(f"category_scores: 'mme' is the perception score in [0, {MME_MAX:g}], got {mme}")

    def as_percent(name: str) -> float:
        value = float(per_benchmark[name])
        return value * 100.0 / MME_MAX if name == "mme" else value

    out = {cat: sum(as_percent(b) for b in group) / len(group) for cat, group in VQA_CATEGORIES.items()}
    out["Average"] = sum(out[c] for c in VQA_CATEGORIES) / len(VQA_CATEGORIES)
    return out


def category_standard_errors(per_benchmark: Mapping[str, float], units: Mapping[str, float]) -> dict[str, float]:
    """Standard errors of each benchmark, the four categories and the Average over the benchmarks'
    questions: a score p (%) that is a mean over n units scored in [0, 1] (``scorers.scoring_units``)
    varies by at most the binomial sqrt(p (100 - p) / n); MME on its percent scale (``MME/20``) too,
    and its own error back on its score's scale. The benchmarks are taken as independent. What a
    claim's gap or slope must clear at one seed, and a table's number beat zero image tokens by.
    Empty where a benchmark has no units (nothing is known of its error)."""
    if any(float(units[b]) <= 0 for b in VQA_BENCHMARKS):
        return {}
    se = {}
    for b in VQA_BENCHMARKS:
        p = float(per_benchmark[b]) * (100.0 / MME_MAX if b == "mme" else 1.0)
        se[b] = math.sqrt(max(p * (100.0 - p), 0.0) / float(units[b]))
    out = {cat: math.sqrt(sum(se[b] ** 2 for b in group)) / len(group) for cat, group in VQA_CATEGORIES.items()}
    out["Average"] = math.sqrt(sum(out[c] ** 2 for c in VQA_CATEGORIES)) / len(VQA_CATEGORIES)
    return {**{b: e * (MME_MAX / 100.0 if b == "mme" else 1.0) for b, e in se.items()}, **out}
