"""The paper's claims as predicates over results (``paper.predicates``): each verdict is computed
from numbers, with its evidence.

Thresholds are in VQA accuracy points (0–100), or relative for alignment scores and the classic
dense tasks, so one set serves every scale.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd

from webssl_repro.metrics import ALIGNMENT_PREFIX, LOWER_IS_BETTER, SE_PREFIX
from webssl_repro.paper import specs
from webssl_repro.paper.predicates import (ALIGNMENT_ANY, FAILS, HOLDS, NOT_MEASURABLE, VERDICTS, Z, Claim, Condition,
                                           Result, Series, Values, evaluate, fit, results_frame)
from webssl_repro.runs import Run

__all__ = ["CLAIMS", "CLAIM_IDS", "get_claim", "evaluate_all", "evaluate", "results_frame", "Claim", "Condition",
           "Result", "Series", "Values", "fit", "HOLDS", "FAILS", "NOT_MEASURABLE", "VERDICTS", "Z"]

MIN_SLOPE = 0.5  # VQA points per doubling (model size or samples seen) that count as "improves / scales"
MAX_FLAT_SLOPE = 0.5  # at most this many points per doubling is "does not scale"
MIN_SLOPE_GAP = 0.5  # one slope beats another by at least this many points per doubling
MIN_R2 = 0.8  # "log-linear": a straight line in log2(x) explains at least 80% of the variance
MIN_GAP = 0.5  # VQA points for "leads", "beats", "helps", each resolution step
MIN_OCR_GAIN = 1.0  # OCR & Chart points a text filter must add
MAX_MEAN_LOSS = 1.0  # mean points the three other categories may lose ("without much loss elsewhere")
MIN_REL_SLOPE = 0.002  # alignment: fraction of its mean score gained per doubling
MIN_REL_GAIN = 0.002  # alignment: fraction of the first encoder's score the second must add
MIN_REL_LOSS = 0.02  # a classic dense task "degrades": at least 2 % of its first value lost, in its direction


# ---- the claims --------------------------------------------------------------------------------
def _runs(item_id: str, **fields) -> tuple[str, ...]:
    """The runs of a paper item whose name fields match, in the item's order."""
    runs = specs.get_item(item_id).runs
    return tuple(r for r in runs if all(getattr(Run.parse(r), k) in v for k, v in fields.items()))


_DINO = _runs("table6")
_CLIP = _runs("table12")
_MAE = _runs("table11")
_IN1K = _runs("table10")
_DINO_4 = tuple(r for r in _DINO if Run.parse(r).size in {Run.parse(x).size for x in _IN1K})
_DINO_SAMPLES = _runs("table8")
_CLIP_SAMPLES = tuple(s for ser in specs.get_item("fig4").series if ser.label.startswith("CLIP") for s in ser.sources)
_FILTER_2B = _runs("table13", size={"2b"})
_ALIGN_SIZE = _runs("fig9", samples={"2b"})
_ALIGN_SAMPLES = _runs("fig9", size={"7b"})
# Fig. 9's first two bars: the off-the-shelf DINOv2 ViT-g (LVD-142M), then Web-DINO ViT-1B (MC-2B)
_ALIGN_DATA = tuple(row.source for row in specs.get_item("fig9").rows[:2])
_RES = _runs("table15")
_DENSE_SAMPLES = _runs("table9")
_HEAVY_2B = _runs("table2", data={"heavy"})
_CLIP_2B = _runs("table2", method={"clip"})


def _slope(v: Values, label: str, metric: str = "Average") -> float:
    return fit(v.x(label), v.y(label, metric))[0]


def _size_scaling(v: Values) -> dict[str, float]:
    slope, r2 = fit(v.x("Web-DINO"), v.y("Web-DINO", "Average"))
    return {"slope": slope, "r2": r2}


def _dino_vs_clip(v: Values) -> dict[str, float]:
    d, c = _slope(v, "Web-DINO"), _slope(v, "CLIP")
    return {"slope[Web-DINO]": d, "slope[CLIP]": c, "slope_gap": d - c}


def _vision_centric(v: Values) -> dict[str, float]:
    gap = v.y("Web-DINO", "Vision-Centric") - v.y("CLIP", "Vision-Centric")
    return {"gap_largest": float(gap[-1]), "gap_mean": float(gap.mean())}


def _overtakes(v: Values) -> dict[str, float]:
    gap = v.y("Web-DINO", "Average") - v.y("CLIP", "Average")
    return {"gap_smallest": float(gap[0]), "gap_largest": float(gap[-1])}


#: CLIP leads on OCR & Chart at the first point and its lead shrinks: a negative slope alone
#: would also hold for a lead of Web-DINO's that grows.
_OCR_GAP_CLOSES = (Condition("gap_first", ">", MIN_GAP), Condition("gap_slope", "<", -MIN_SLOPE))


def _ocr_gap(v: Values) -> dict[str, float]:
    gap = v.y("CLIP", "OCR & Chart") - v.y("Web-DINO", "OCR & Chart")
    return {"gap_first": float(gap[0]), "gap_last": float(gap[-1]), "gap_slope": fit(v.x("CLIP"), gap)[0]}


def _samples_help(v: Values, metric: str = "Average") -> dict[str, float]:
    y = v.y("Web-DINO ViT-7B", metric)
    return {"slope": _slope(v, "Web-DINO ViT-7B", metric), "gain_last_vs_first": float(y[-1] - y[0])}


def _samples_help_ocr(v: Values) -> dict[str, float]:
    return _samples_help(v, "OCR & Chart")


def _mae_scales(v: Values) -> dict[str, float]:
    slope, r2 = fit(v.x("Web-MAE"), v.y("Web-MAE", "Average"))
    return {"slope": slope, "r2": r2}


def _mae_ocr(v: Values) -> dict[str, float]:
    gap = v.y("Web-MAE", "OCR & Chart") - v.y("Web-DINO", "OCR & Chart")
    return {"ocr_gap_mean": float(gap.mean()), "ocr_gap_min": float(gap.min())}


def _in1k_flat(v: Values) -> dict[str, float]:
    flat, mc = _slope(v, "Web-DINO (ImageNet-1k)"), _slope(v, "Web-DINO (MC-2B)")
    return {"slope[ImageNet-1k]": flat, "abs_slope[ImageNet-1k]": abs(flat), "slope[MC-2B]": mc, "slope_gap": mc - flat}


def _filters(v: Values) -> dict[str, float]:
    out = {}
    others = ("General", "Knowledge", "Vision-Centric")
    for k, variant in ((1, "light"), (2, "heavy")):
        out[f"ocr_gain[{variant}]"] = float(np.diff(v.y("Web-DINO ViT-2B", "OCR & Chart")[[0, k]])[0])
        changes = [float(np.diff(v.y("Web-DINO ViT-2B", m)[[0, k]])[0]) for m in others]
        out[f"others_mean_change[{variant}]"] = float(np.mean(changes))
        out[f"others_worst_change[{variant}]"] = float(np.min(changes))
    return out


def _heavy_vs_clip(v: Values) -> dict[str, float]:
    return {f"gap[{m}]": float(v.y("Web-DINO ViT-2B (Heavy)", m)[0] - v.y("CLIP ViT-2B", m)[0])
            for m in v.metrics("CLIP ViT-2B")}


def _dense_degrades(v: Values) -> dict[str, float]:
    """What each dense task loses from the first to the last samples seen, as a fraction of its
    first value, positive where it gets worse (mIoU falls, RMSE rises): mini-scale mIoU and depth
    units are not the paper's, so the loss is relative."""
    out = {}
    for metric in v.metrics("Web-DINO ViT-7B"):
        y = v.y("Web-DINO ViT-7B", metric)
        worse = y[-1] - y[0] if metric in LOWER_IS_BETTER else y[0] - y[-1]
        out[f"rel_loss[{metric}]"] = float(worse / abs(y[0]))
    return out


def _alignment(label: str) -> Callable[[Values], dict[str, float]]:
    """The slope per doubling relative to the mean score, and that slope over its standard error
    from each score's own (``se/alignment/<lm>``, over captions): one seed of scores 3 % apart
    is no trend when each score is known to 11 %. The points are taken as independent, which
    overstates the error of a slope over encoders scored on the same captions (conservative)."""
    def compute(v: Values) -> dict[str, float]:
        out = {}
        x = v.x(label)
        weights = (x - x.mean()) / float(((x - x.mean()) ** 2).sum())  # slope = weights @ y
        for metric in v.metrics(label):
            y, se = v.y(label, metric), v.y(label, SE_PREFIX + metric)
            lm = metric[len(ALIGNMENT_PREFIX):]
            slope = fit(x, y)[0]
            out[f"rel_slope[{lm}]"] = slope / float(np.mean(y))
            if not np.isnan(se).any():
                out[f"slope_z[{lm}]"] = slope / float(np.sqrt((weights ** 2 * se ** 2).sum()))
        return out
    return compute


def _alignment_gain(label: str) -> Callable[[Values], dict[str, float]]:
    """What the second source adds to the first's score, relative to it, and that gain over its
    standard error from the two scores' own (over captions; taken as independent, conservative)."""
    def compute(v: Values) -> dict[str, float]:
        out = {}
        for metric in v.metrics(label):
            y, se = v.y(label, metric), v.y(label, SE_PREFIX + metric)
            lm = metric[len(ALIGNMENT_PREFIX):]
            out[f"rel_gain[{lm}]"] = float((y[1] - y[0]) / y[0])
            if not np.isnan(se).any():
                out[f"gain_z[{lm}]"] = float((y[1] - y[0]) / np.sqrt(se[0] ** 2 + se[1] ** 2))
        return out
    return compute


def _resolution(v: Values) -> dict[str, float]:
    y = v.y("Web-DINO ViT-7B 8B seen", "Average")
    return {f"step[{a}->{b}]": float(y[i + 1] - y[i]) for i, (a, b) in enumerate(zip((224, 378), (378, 518)))}


def _s(label, runs, metrics, axis, eval_="vqa") -> Series:
    return Series(label, runs, tuple(metrics), axis, eval_)


CLAIMS: tuple[Claim, ...] = (
    Claim("dino_scales_with_size", "Web-DINO VQA Average improves log-linearly with model size (MC-2B, 2B seen)",
          ("table6", "fig3"), (_s("Web-DINO", _DINO, ["Average"], "size"),), _size_scaling,
          (Condition("slope", ">", MIN_SLOPE), Condition("r2", ">", MIN_R2))),
    Claim("dino_scales_better_than_clip", "Under the same data (MC-2B), Web-DINO's VQA Average scales better "
          "with model size than CLIP's", ("table6", "table12", "fig3"),
          (_s("Web-DINO", _DINO, ["Average"], "size"), _s("CLIP", _CLIP, ["Average"], "size")), _dino_vs_clip,
          (Condition("slope_gap", ">", MIN_SLOPE_GAP),)),
    Claim("dino_leads_clip_vision_centric", "Web-DINO leads CLIP on Vision-Centric VQA at the largest size and "
          "on average over sizes", ("table6", "table12", "fig3"),
          (_s("Web-DINO", _DINO, ["Vision-Centric"], "size"), _s("CLIP", _CLIP, ["Vision-Centric"], "size")),
          _vision_centric, (Condition("gap_largest", ">", MIN_GAP), Condition("gap_mean", ">", MIN_GAP))),
    Claim("dino_overtakes_clip_with_size", "Web-DINO trails CLIP's VQA Average at the smallest size and leads "
          "it at the largest (MC-2B, 2B seen)", ("table6", "table12", "fig3"),
          (_s("Web-DINO", _DINO, ["Average"], "size"), _s("CLIP", _CLIP, ["Average"], "size")), _overtakes,
          (Condition("gap_smallest", "<", -MIN_GAP), Condition("gap_largest", ">", MIN_GAP))),
    Claim("ocr_gap_closes_with_size", "The OCR & Chart gap between CLIP and Web-DINO closes with model size",
          ("table6", "table12", "fig3"),
          (_s("Web-DINO", _DINO, ["OCR & Chart"], "size"), _s("CLIP", _CLIP, ["OCR & Chart"], "size")),
          _ocr_gap, _OCR_GAP_CLOSES),
    Claim("ocr_gap_closes_with_samples", "The OCR & Chart gap between CLIP ViT-7B and Web-DINO ViT-7B closes "
          "with samples seen", ("table8", "fig4"),
          (_s("Web-DINO", _DINO_SAMPLES, ["OCR & Chart"], "samples"),
           _s("CLIP", _CLIP_SAMPLES, ["OCR & Chart"], "samples")),
          _ocr_gap, _OCR_GAP_CLOSES),
    Claim("more_samples_help", "More samples seen improve Web-DINO ViT-7B's VQA Average (1B → 8B seen)",
          ("table8", "fig4"), (_s("Web-DINO ViT-7B", _DINO_SAMPLES, ["Average"], "samples"),), _samples_help,
          (Condition("slope", ">", MIN_SLOPE), Condition("gain_last_vs_first", ">", MIN_GAP))),
    Claim("more_samples_raise_ocr", "More samples seen raise Web-DINO ViT-7B's OCR & Chart (1B → 8B seen; "
          "the paper: +12.6)", ("table8", "fig4"),
          (_s("Web-DINO ViT-7B", _DINO_SAMPLES, ["OCR & Chart"], "samples"),), _samples_help_ocr,
          (Condition("slope", ">", MIN_SLOPE), Condition("gain_last_vs_first", ">", MIN_GAP))),
    Claim("mae_scales_with_size", "Web-MAE also scales with model size on web data (VQA Average)",
          ("table11", "fig5"), (_s("Web-MAE", _MAE, ["Average"], "size"),), _mae_scales,
          (Condition("slope", ">", MIN_SLOPE), Condition("r2", ">", MIN_R2))),
    Claim("mae_beats_dino_on_ocr", "Web-MAE beats Web-DINO on OCR & Chart (mean over sizes 1B–5B)",
          ("table6", "table11", "fig5"),
          (_s("Web-MAE", _MAE, ["OCR & Chart"], "size"), _s("Web-DINO", _DINO_4, ["OCR & Chart"], "size")),
          _mae_ocr, (Condition("ocr_gap_mean", ">", MIN_GAP),)),
    Claim("in1k_does_not_scale", "Trained on ImageNet-1k, Web-DINO does not scale with model size (flat VQA "
          "Average), unlike the same models trained on MC-2B", ("table6", "table10", "fig6"),
          (_s("Web-DINO (ImageNet-1k)", _IN1K, ["Average"], "size"),
           _s("Web-DINO (MC-2B)", _DINO_4, ["Average"], "size")),
          _in1k_flat,
          (Condition("abs_slope[ImageNet-1k]", "<", MAX_FLAT_SLOPE), Condition("slope_gap", ">", MIN_SLOPE_GAP))),
    Claim("text_filter_raises_ocr", "Light and heavy text filtering raise Web-DINO ViT-2B's OCR & Chart without "
          "much loss on the other categories (Table 2)", ("table2", "table13"),
          (_s("Web-DINO ViT-2B", _FILTER_2B, ["OCR & Chart", "General", "Knowledge", "Vision-Centric"], "data"),),
          _filters,
          (Condition("ocr_gain", ">", MIN_OCR_GAIN), Condition("others_mean_change", ">", -MAX_MEAN_LOSS))),
    Claim("heavy_filter_beats_clip", "Trained on the heavy-filtered data, Web-DINO ViT-2B beats CLIP ViT-2B "
          "(unfiltered) on OCR & Chart and on the VQA Average (Table 2)", ("table2", "table13"),
          (_s("Web-DINO ViT-2B (Heavy)", _HEAVY_2B, ["OCR & Chart", "Average"], "data"),
           _s("CLIP ViT-2B", _CLIP_2B, ["OCR & Chart", "Average"], "data")),
          _heavy_vs_clip, (Condition("gap", ">", MIN_GAP),)),
    Claim("dense_degrades_with_samples", "Web-DINO ViT-7B's linear dense probes get worse with more samples seen "
          "(ADE20K lin. mIoU falls, NYUd lin.1 RMSE rises; 2B → 8B seen)", ("table9",),
          (_s("Web-DINO ViT-7B", _DENSE_SAMPLES, ["ade20k_linear", "nyud_lin1"], "samples", "classic"),),
          _dense_degrades, (Condition("rel_loss", ">", MIN_REL_LOSS),)),
    Claim("alignment_rises_with_size", "Alignment with the language model rises with Web-DINO model size",
          ("fig9",), (_s("Web-DINO", _ALIGN_SIZE, [ALIGNMENT_ANY], "size", "alignment"),),
          _alignment("Web-DINO"), (Condition("rel_slope", ">", MIN_REL_SLOPE), Condition("slope_z", ">", Z))),
    Claim("alignment_rises_with_samples", "Alignment with the language model rises with samples seen "
          "(Web-DINO ViT-7B, 2B → 8B)", ("fig9",),
          (_s("Web-DINO ViT-7B", _ALIGN_SAMPLES, [ALIGNMENT_ANY], "samples", "alignment"),),
          _alignment("Web-DINO ViT-7B"), (Condition("rel_slope", ">", MIN_REL_SLOPE), Condition("slope_z", ">", Z))),
    Claim("web_data_raises_alignment", "Web-DINO ViT-1B, trained on MC-2B, aligns better with the language model "
          "than the off-the-shelf DINOv2 ViT-g of the same architecture", ("fig9",),
          (_s("DINOv2 → Web-DINO ViT-1B", _ALIGN_DATA, [ALIGNMENT_ANY], "source", "alignment"),),
          _alignment_gain("DINOv2 → Web-DINO ViT-1B"),
          (Condition("rel_gain", ">", MIN_REL_GAIN), Condition("gain_z", ">", Z))),
    Claim("higher_resolution_helps", "Higher resolution improves Web-DINO ViT-7B's VQA Average (224 → 378 → 518 px)",
          ("table15",), (_s("Web-DINO ViT-7B 8B seen", _RES, ["Average"], "res"),), _resolution,
          (Condition("step", ">", MIN_GAP),)),
)
CLAIM_IDS = tuple(c.id for c in CLAIMS)


def get_claim(claim_id: str) -> Claim:
    for claim in CLAIMS:
        if claim.id == claim_id:
            return claim
    raise KeyError(f"unknown claim {claim_id!r}; known: {', '.join(CLAIM_IDS)}")


def evaluate_all(frame: pd.DataFrame, requested: Optional[set[tuple[str, str]]] = None,
                 claims: Iterable[Claim] = CLAIMS) -> list[Result]:
    return [evaluate(c, frame, requested) for c in claims]

