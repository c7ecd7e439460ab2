"""The paper's claims as predicates over results: each verdict is computed from numbers, with its evidence.

A claim names the series of runs and metrics it rests on (taken from the paper items in ``specs``),
computes a few quantities from one seed's numbers (slopes fitted against log2 model size / samples
seen, gaps, steps), and **holds** when every quantity clears its threshold by more than ``Z``
standard errors over seeds (no margin with a single seed). It is **not measurable** when a run is not
requested at the scale or the source has no number for it (listed), and otherwise **does not hold**.
The frame is long (``source, metric, value`` and an optional ``seed``); rows without a seed are shared
by every seed. Thresholds are in VQA accuracy points (0–100), or relative for alignment scores,
so one set serves every scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd

from webssl_repro.metrics import ALIGNMENT_PREFIX, SE_PREFIX
from webssl_repro.paper import specs
from webssl_repro.paper.results import value_table
from webssl_repro.runs import Run

HOLDS, FAILS, NOT_MEASURABLE = "holds", "does not hold", "not measurable"
VERDICTS = (HOLDS, FAILS, NOT_MEASURABLE)

Z = 2.0  # a quantity must clear its threshold by Z standard errors over seeds
MIN_SLOPE = 0.5  # VQA points per doubling (model size or samples seen) that count as "improves / scales"
MAX_FLAT_SLOPE = 0.5  # at most this many points per doubling is "does not scale"
MIN_SLOPE_GAP = 0.5  # one slope beats another by at least this many points per doubling
MIN_R2 = 0.8  # "log-linear": a straight line in log2(x) explains at least 80% of the variance
MIN_GAP = 0.5  # VQA points for "leads", "beats", "helps", each resolution step
MIN_OCR_GAIN = 1.0  # OCR & Chart points a text filter must add
MAX_MEAN_LOSS = 1.0  # mean points the three other categories may lose ("without much loss elsewhere")
MIN_REL_SLOPE = 0.002  # alignment: fraction of its mean score gained per doubling
ALIGNMENT_ANY = ALIGNMENT_PREFIX + "*"  # every language model the results have alignment numbers for


@dataclass(frozen=True)
class Series:
    """Runs along one axis (size, samples, res or data) and the metrics a claim reads from them."""

    label: str
    runs: tuple[str, ...]
    metrics: tuple[str, ...]
    axis: str
    eval: str = "vqa"

    def x(self) -> np.ndarray:
        """log2 of the axis value (params or samples, in billions) — the paper's log x-axes."""
        runs = [Run.parse(r) for r in self.runs]
        if self.axis == "size":
            return np.log2([specs.PARAMS_B[r.size] for r in runs])
        if self.axis == "samples":
            return np.log2([specs.SAMPLES_B[r.samples] for r in runs])
        return np.arange(len(runs), dtype=float)

    def tick(self, run: str) -> str:
        r = Run.parse(run)
        return {"size": r.size.upper(), "samples": f"{(r.samples or '').upper()} seen", "res": f"{r.res}px",
                "data": r.data}[self.axis]


@dataclass(frozen=True)
class Condition:
    quantity: str  # applies to the quantity of that name and to every ``name[...]`` variant
    op: str  # ">" or "<"
    threshold: float

    def applies(self, name: str) -> bool:
        return name == self.quantity or name.startswith(self.quantity + "[")

    def passes(self, mean: float, se: float) -> bool:
        return mean - Z * se > self.threshold if self.op == ">" else mean + Z * se < self.threshold


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    items: tuple[str, ...]
    series: tuple[Series, ...]
    compute: Callable[["Values"], dict[str, float]]
    conditions: tuple[Condition, ...]


@dataclass
class Result:
    claim: Claim
    verdict: str
    evidence: str
    missing: list[str] = field(default_factory=list)
    quantities: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # name -> (mean, sd, n seeds)

    def row(self) -> dict:
        return {"claim": self.claim.id, "statement": self.claim.statement, "verdict": self.verdict,
                "evidence": self.evidence, "items": " ".join(self.claim.items), "missing": " ".join(self.missing)}


class Values:
    """One seed's numbers, read through the claim's series labels."""

    def __init__(self, wide: pd.DataFrame, series: Iterable[Series]):
        self.wide = wide
        self.series = {s.label: s for s in series}

    def y(self, label: str, metric: str) -> np.ndarray:
        s = self.series[label]
        return np.array([_cell(self.wide, r, metric) for r in s.runs], dtype=float)

    def x(self, label: str) -> np.ndarray:
        return self.series[label].x()

    def metrics(self, label: str) -> tuple[str, ...]:
        return self.series[label].metrics


def _cell(wide: pd.DataFrame, source: str, metric: str) -> float:
    if source in wide.index and metric in wide.columns:
        return float(wide.loc[source, metric])
    return math.nan


def fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y against x (log2 axis: points per doubling) and its R²."""
    if np.isnan(y).any() or len(y) < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    return float(slope), (1.0 - ss_res / ss_tot) if ss_tot > 0 else 0.0


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
_RES = _runs("table15")


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


def _ocr_gap(v: Values) -> dict[str, float]:
    gap = v.y("CLIP", "OCR & Chart") - v.y("Web-DINO", "OCR & Chart")
    return {"gap_first": float(gap[0]), "gap_last": float(gap[-1]), "gap_slope": fit(v.x("CLIP"), gap)[0]}


def _samples_help(v: Values) -> dict[str, float]:
    y = v.y("Web-DINO ViT-7B", "Average")
    return {"slope": _slope(v, "Web-DINO ViT-7B"), "gain_last_vs_first": float(y[-1] - y[0])}


def _mae_scales(v: Values) -> dict[str, float]:
    slope, r2 = fit(v.x("Web-MAE"), v.y("Web-MAE", "Average"))
    return {"slope": slope, "r2": r2}


def _mae_ocr(v: Values) -> dict[str, float]:
    gap = v.y("Web-MAE", "OCR & Chart") - v.y("Web-DINO", "OCR & Chart")
    return {"ocr_gap_mean": float(gap.mean()), "ocr_gap_min": float(gap.min())}


def _in1k_flat(v: Values) -> dict[str, float]:
    flat, mc = _slope(v, "Web-DINO (ImageNet-1k)"), _slope(v, "Web-DINO (MC-2B)")
    return {"slope[ImageNet-1k]": flat, "slope[MC-2B]": mc, "slope_gap": mc - flat}


def _filters(v: Values) -> dict[str, float]:
    out = {}
    others = ("General", "Knowledge", "Vision-Centric")
    for k, variant in ((1, "light"), (2, "heavy")):
        out[f"ocr_gain[{variant}]"] = float(np.diff(v.y("Web-DINO ViT-2B", "OCR & Chart")[[0, k]])[0])
        changes = [float(np.diff(v.y("Web-DINO ViT-2B", m)[[0, k]])[0]) for m in others]
        out[f"others_mean_change[{variant}]"] = float(np.mean(changes))
        out[f"others_worst_change[{variant}]"] = float(np.min(changes))
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
    Claim("ocr_gap_closes_with_size", "The OCR & Chart gap between CLIP and Web-DINO closes with model size",
          ("table6", "table12", "fig3"),
          (_s("Web-DINO", _DINO, ["OCR & Chart"], "size"), _s("CLIP", _CLIP, ["OCR & Chart"], "size")),
          _ocr_gap, (Condition("gap_slope", "<", -MIN_SLOPE),)),
    Claim("ocr_gap_closes_with_samples", "The OCR & Chart gap between CLIP ViT-7B and Web-DINO ViT-7B closes "
          "with samples seen", ("table8", "fig4"),
          (_s("Web-DINO", _DINO_SAMPLES, ["OCR & Chart"], "samples"),
           _s("CLIP", _CLIP_SAMPLES, ["OCR & Chart"], "samples")),
          _ocr_gap, (Condition("gap_slope", "<", -MIN_SLOPE),)),
    Claim("more_samples_help", "More samples seen improve Web-DINO ViT-7B's VQA Average (1B → 8B seen)",
          ("table8", "fig4"), (_s("Web-DINO ViT-7B", _DINO_SAMPLES, ["Average"], "samples"),), _samples_help,
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
          (Condition("slope[ImageNet-1k]", "<", MAX_FLAT_SLOPE), Condition("slope_gap", ">", MIN_SLOPE_GAP))),
    Claim("text_filter_raises_ocr", "Light and heavy text filtering raise Web-DINO ViT-2B's OCR & Chart without "
          "much loss on the other categories (Table 2)", ("table2", "table13"),
          (_s("Web-DINO ViT-2B", _FILTER_2B, ["OCR & Chart", "General", "Knowledge", "Vision-Centric"], "data"),),
          _filters,
          (Condition("ocr_gain", ">", MIN_OCR_GAIN), Condition("others_mean_change", ">", -MAX_MEAN_LOSS))),
    Claim("alignment_rises_with_size", "Alignment with the language model rises with Web-DINO model size",
          ("fig9",), (_s("Web-DINO", _ALIGN_SIZE, [ALIGNMENT_ANY], "size", "alignment"),),
          _alignment("Web-DINO"), (Condition("rel_slope", ">", MIN_REL_SLOPE), Condition("slope_z", ">", Z))),
    Claim("alignment_rises_with_samples", "Alignment with the language model rises with samples seen "
          "(Web-DINO ViT-7B, 2B → 8B)", ("fig9",),
          (_s("Web-DINO ViT-7B", _ALIGN_SAMPLES, [ALIGNMENT_ANY], "samples", "alignment"),),
          _alignment("Web-DINO ViT-7B"), (Condition("rel_slope", ">", MIN_REL_SLOPE), Condition("slope_z", ">", Z))),
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


# ---- evaluation --------------------------------------------------------------------------------
def _resolve(series: Series, frame: pd.DataFrame) -> Series:
    """Expand ``alignment/*`` to the language models every run of the series has numbers for."""
    if ALIGNMENT_ANY not in series.metrics:
        return series
    have = frame[frame["source"].isin(series.runs) & frame["metric"].str.startswith(ALIGNMENT_PREFIX)]
    lms = [m for m, g in have.dropna(subset=["value"]).groupby("metric") if set(series.runs) <= set(g["source"])]
    return Series(series.label, series.runs, tuple(sorted(lms)), series.axis, series.eval)


def _seed_frames(frame: pd.DataFrame) -> list[pd.DataFrame]:
    if "seed" not in frame.columns or frame["seed"].dropna().nunique() <= 1:
        return [frame]
    shared = frame[frame["seed"].isna()]
    return [pd.concat([frame[frame["seed"] == s], shared]) for s in sorted(frame["seed"].dropna().unique())]


def _fmt(mean: float, sd: float, n: int) -> str:
    text = f"{mean:+.3g}" if abs(mean) < 0.1 else f"{mean:+.2f}"
    return f"{text} ± {sd:.2g} (sd, {n} seeds)" if n > 1 else text


def _points(series: Series, frame: pd.DataFrame) -> str:
    parts = []
    for metric in series.metrics:
        rows = frame[frame["source"].isin(series.runs) & (frame["metric"] == metric)]
        stats = rows.groupby("source")["value"].agg(["mean", "std", "count"])
        cells = []
        for run in series.runs:
            m, sd, n = stats.loc[run, "mean"], stats.loc[run, "std"], int(stats.loc[run, "count"])
            cells.append(f"{series.tick(run)} {m:.4g}" + (f"±{sd:.2g}" if n > 1 else ""))
        parts.append(f"{series.label} {metric}: " + ", ".join(cells))
    return "; ".join(parts)


def evaluate(claim: Claim, frame: pd.DataFrame, requested: Optional[set[tuple[str, str]]] = None) -> Result:
    """Verdict and evidence of one claim; ``requested`` is the (run, eval) pairs the scale asks for
    (``None`` at the published scale, where only the numbers' presence matters)."""
    if requested is not None:
        absent = [f"{s.eval} of {r}" for s in claim.series for r in s.runs if (r, s.eval) not in requested]
        if absent:
            absent = list(dict.fromkeys(absent))
            return Result(claim, NOT_MEASURABLE, "not requested at this scale: " + ", ".join(absent), absent)
    series = tuple(_resolve(s, frame) for s in claim.series)
    have = frame.dropna(subset=["value"])
    present = set(zip(have["source"], have["metric"]))
    any_lm = (ALIGNMENT_PREFIX + "<any language model>",)
    absent = [f"{m} of {r}" for s in series for m in (s.metrics or any_lm) for r in s.runs if (r, m) not in present]
    if absent:
        absent = list(dict.fromkeys(absent))
        return Result(claim, NOT_MEASURABLE, "no number for: " + ", ".join(absent), absent)

    per_seed: dict[str, list[float]] = {}
    for sub in _seed_frames(frame):
        for name, value in claim.compute(Values(value_table(sub), series)).items():
            if not math.isnan(value):
                per_seed.setdefault(name, []).append(value)
    quantities = {}
    for name, values in per_seed.items():
        arr = np.asarray(values)
        sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        quantities[name] = (float(arr.mean()), sd, len(arr))
    untested = [c.quantity for c in claim.conditions if not any(c.applies(n) for n in quantities)]
    if untested:  # e.g. a fit over a constant x: never a vacuous "holds"
        return Result(claim, NOT_MEASURABLE, "no value for: " + ", ".join(untested), untested, quantities)
    checks, ok = [], True
    for name, (mean, sd, n) in quantities.items():
        conds = [c for c in claim.conditions if c.applies(name)]
        se = sd / math.sqrt(n) if n > 1 else 0.0
        passed = all(c.passes(mean, se) for c in conds)
        ok &= passed
        need = "".join(f" (needs {c.op} {c.threshold:+g}{f' beyond {Z:g} se' if n > 1 else ''}: "
                       f"{'ok' if c.passes(mean, se) else 'no'})" for c in conds)
        checks.append(f"{name} = {_fmt(mean, sd, n)}{need}")
    evidence = "; ".join(checks) + ". Points: " + " / ".join(_points(s, frame) for s in series)
    return Result(claim, HOLDS if ok else FAILS, evidence, [], quantities)


def evaluate_all(frame: pd.DataFrame, requested: Optional[set[tuple[str, str]]] = None,
                 claims: Iterable[Claim] = CLAIMS) -> list[Result]:
    return [evaluate(c, frame, requested) for c in claims]


def results_frame(results: Iterable[Result]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in results], columns=["claim", "statement", "verdict", "evidence", "items",
                                                             "missing"])
