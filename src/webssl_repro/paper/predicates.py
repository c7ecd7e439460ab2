"""How a claim of the paper is judged: its series of runs, its quantities and their conditions.

A claim names the series of runs and metrics it rests on, computes a few quantities from one
seed's numbers (slopes fitted against log2 model size / samples seen, gaps, steps), and **holds**
when every quantity clears its threshold by more than ``Z`` standard errors: over seeds, and for
VQA numbers that carry their own (``se/<metric>``, over the benchmarks' questions) over those too,
so that one seed is judged with a margin; the published numbers carry none. It is **not
measurable** when a run is not requested at the scale or the source has no number for it
(listed), and otherwise **does not hold**. The frame is long
(``source, metric, value`` and an optional ``seed``); rows without a seed are shared by every seed.
The paper's claims themselves are in ``paper.claims``.
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
ALIGNMENT_ANY = ALIGNMENT_PREFIX + "*"  # every language model the results have alignment numbers for


@dataclass(frozen=True)
class Series:
    """Runs along one axis (size, samples, res, data, or source: named) and the metrics a claim
    reads from them."""

    label: str
    runs: tuple[str, ...]
    metrics: tuple[str, ...]
    axis: str
    eval: str = "vqa"

    def x(self) -> np.ndarray:
        """log2 of the axis value (params or samples, in billions) — the paper's log x-axes; else
        the runs' order (``source``: any sources, off-the-shelf baselines included, by name)."""
        if self.axis == "size":
            return np.log2([specs.PARAMS_B[Run.parse(r).size] for r in self.runs])
        if self.axis == "samples":
            return np.log2([specs.SAMPLES_B[Run.parse(r).samples] for r in self.runs])
        return np.arange(len(self.runs), dtype=float)

    def tick(self, run: str) -> str:
        if self.axis == "source":
            return run
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


def _resolve(series: Series, frame: pd.DataFrame) -> Series:
    """Expand ``alignment/*`` to the language models every run of the series has numbers for."""
    if ALIGNMENT_ANY not in series.metrics:
        return series
    have = frame[frame["source"].isin(series.runs) & frame["metric"].str.startswith(ALIGNMENT_PREFIX)]
    lms = [m for m, g in have.dropna(subset=["value"]).groupby("metric") if set(series.runs) <= set(g["source"])]
    return Series(series.label, series.runs, tuple(sorted(lms)), series.axis, series.eval)


def _numbered(frame: pd.DataFrame) -> set[tuple[str, str]]:
    """The (source, metric) pairs of ``frame`` that have a number."""
    have = frame.dropna(subset=["value"])
    return set(zip(have["source"], have["metric"]))


def _seed_frames(frame: pd.DataFrame) -> list[pd.DataFrame]:
    if "seed" not in frame.columns or frame["seed"].dropna().nunique() <= 1:
        return [frame]
    shared = frame[frame["seed"].isna()]
    return [pd.concat([frame[frame["seed"] == s], shared]) for s in sorted(frame["seed"].dropna().unique())]


def _expected(condition: Condition, claim: Claim, quantities) -> list[str]:
    """The quantities ``condition`` must have a value for: one per variant ("[<lm>]", "[light]")
    the claim's bracketed conditions have, where it is one of them (or has no value at all
    beside them), else its own name. So a value that came out NaN (0/0), or one language model
    without its standard errors, leaves the claim untested instead of judged on the rest."""
    def suffixes(c: Condition) -> set[str]:
        return {n[len(c.quantity):] for n in quantities if c.applies(n)}

    variants = sorted(set().union(*(suffixes(c) for c in claim.conditions)) - {""})
    own = suffixes(condition)
    if variants and (own - {""} or not own):
        return [condition.quantity + v for v in variants]
    return [condition.quantity]


#: The step of the finite differences that carry the VQA scores' own errors to a claim's quantities.
_STEP = 1e-3


def _measurement_se(claim: Claim, wide: pd.DataFrame, series: tuple[Series, ...],
                    base: dict[str, float]) -> dict[str, float]:
    """Each quantity's standard error from the VQA numbers' own (``se/<metric>``, over the
    benchmarks' questions), carried through the quantity to first order and taken as
    independent across runs; empty unless every VQA number the claim reads has one (the
    published numbers have none). A slope or gap of one seed must clear its threshold by Z of these."""
    cells = {(run, m) for s in series if s.eval == "vqa" for m in s.metrics for run in s.runs}
    errors = {cell: _cell(wide, cell[0], SE_PREFIX + cell[1]) for cell in cells}
    if not cells or any(math.isnan(e) for e in errors.values()):
        return {}
    variance = dict.fromkeys(base, 0.0)
    for (run, metric), se in errors.items():
        bumped = wide.copy()
        bumped.loc[run, metric] += _STEP
        for name, value in claim.compute(Values(bumped, series)).items():
            if name in variance:
                variance[name] += ((value - base[name]) / _STEP * se) ** 2
    return {name: math.sqrt(v) for name, v in variance.items() if not math.isnan(v)}


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
    present = _numbered(frame)
    any_lm = (ALIGNMENT_PREFIX + "<any language model>",)
    absent = [f"{m} of {r}" for s in series for m in (s.metrics or any_lm) for r in s.runs if (r, m) not in present]
    seeds = _seed_frames(frame)
    if not absent and len(seeds) > 1:  # one seed short would be judged on the others, without a word
        for sub in seeds:
            got = _numbered(sub)
            seed = sub["seed"].dropna().iloc[0]
            absent += [f"{m} of {r} (seed {seed:g})" for s in series for m in s.metrics for r in s.runs
                       if (r, m) not in got]
    if absent:
        absent = list(dict.fromkeys(absent))
        return Result(claim, NOT_MEASURABLE, "no number for: " + ", ".join(absent), absent)

    per_seed: dict[str, list[float]] = {}
    measured: dict[str, list[float]] = {}  # each seed's standard error over the questions, squared
    undefined: list[str] = []  # a value that came out NaN (0/0, a fit over a constant x)
    for sub in seeds:
        wide = value_table(sub)
        computed = claim.compute(Values(wide, series))
        for name, value in computed.items():
            if math.isnan(value):
                undefined += [name] if any(c.applies(name) for c in claim.conditions) else []
            else:
                per_seed.setdefault(name, []).append(value)
        for name, se in _measurement_se(claim, wide, series, computed).items():
            measured.setdefault(name, []).append(se ** 2)
    quantities = {}
    for name, values in per_seed.items():
        arr = np.asarray(values)
        sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        quantities[name] = (float(arr.mean()), sd, len(arr))
    untested = list(dict.fromkeys([*undefined, *(n for c in claim.conditions for n in _expected(c, claim, quantities)
                                                 if n not in quantities)]))
    if untested:  # e.g. a fit over a constant x: never a vacuous "holds"
        return Result(claim, NOT_MEASURABLE, "no value for: " + ", ".join(untested), untested, quantities)
    checks, ok = [], True
    for name, (mean, sd, n) in quantities.items():
        conds = [c for c in claim.conditions if c.applies(name)]
        # over seeds, and over the benchmarks' questions, which every seed answers alike
        over_questions = math.sqrt(float(np.mean(measured[name]))) if name in measured else 0.0
        se = math.sqrt((sd / math.sqrt(n) if n > 1 else 0.0) ** 2 + over_questions ** 2)
        passed = all(c.passes(mean, se) for c in conds)
        ok &= passed
        need = "".join(f" (needs {c.op} {c.threshold:+g}{f' beyond {Z:g} se' if se > 0 else ''}: "
                       f"{'ok' if c.passes(mean, se) else 'no'})" for c in conds)
        over = f", se {over_questions:.2g} over questions" if over_questions > 0 and conds else ""
        checks.append(f"{name} = {_fmt(mean, sd, n)}{over}{need}")
    evidence = "; ".join(checks) + ". Points: " + " / ".join(_points(s, frame) for s in series)
    return Result(claim, HOLDS if ok else FAILS, evidence, [], quantities)



def results_frame(results: Iterable[Result]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in results], columns=["claim", "statement", "verdict", "evidence", "items",
                                                             "missing"])
