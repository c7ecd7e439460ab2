"""``check``: the paper's claims evaluated at every scale, and reproduced vs published numbers per metric.

The claims read the same inputs as the items: the published TSVs at the published scale, the eval
JSONs of the runs the ``Plan`` requests at a run scale (one file per seed, ``evals/{run}.s{seed}/``).
The per-metric comparison is meaningful only where the config says the scale is comparable to the
paper (``check.comparable``: same data and model sizes); elsewhere it is reported as "not
comparable", and at the published scale as the paper itself — never as a pass.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from webssl_repro.paper import claims as claims_mod
from webssl_repro.paper import specs
from webssl_repro.paper.published import load_published, published_frame
from webssl_repro.paper.results import (COLUMNS, data_pct_rows, eval_rows, evaluable, is_filter_result,
                                        is_no_image_result, kept_percent, with_categories)
from webssl_repro.metrics import (ALIGNMENT_PREFIX, CATEGORY_COLUMNS, CLASSIC_METRICS, DATA_PCT, LOWER_IS_BETTER,
                                  PROTOCOL_DIFFERENCES, VQA_BENCHMARKS, VQA_CATEGORIES, VQA_CONTROLS, better, label)
from webssl_repro.runs import split_seed

WITHIN, OUTSIDE, NO_TOLERANCE, MISSING = "within", "outside", "no tolerance", "missing"
NOT_COMPARABLE, PAPER_ITSELF = "not comparable", "paper itself"
_EVAL = re.compile(r"(^|/)evals/(?P<run>[^/]+)/(?P<kind>vqa|classic|alignment)\.json$")
_CONTROL = re.compile(rf"(^|/)controls/(?P<control>{'|'.join(VQA_CONTROLS)})/vqa\.json$")
#: VQA Average points the raw-pixel control must score above the blind one for the probe to count
#: as reading images. On the blind mini probe the 30 runs' Averages spread with sd 1.15 (22.1 to
#: 26.7, clean clone of 1fabd46) and 1.33 (22.3 to 26.9, bcd5e72), so the difference of two has
#: sd ~1.6 to 1.9 and 5 points is ~2.7 sd or more.
MIN_PROBE_GAIN = 5.0
#: The same for one category, a mean over 4 of the 16 benchmarks where the Average is over all
#: 16: were the categories independent, its spread is sqrt(4) = 2 times the Average's.
MIN_CATEGORY_PROBE_GAIN = 2 * MIN_PROBE_GAIN
COMPARISON_COLUMNS = ["source", "metric", "items", "reproduced", "reproduced_sd", "n_seeds", "published",
                      "difference", "tolerance", "status"]


def requested_pairs(plan) -> set[tuple[str, str]]:
    """(run, eval kind) for every eval file some requested item reads at this scale."""
    pairs = set()
    for item in plan.items:
        for path in plan.item_inputs(item):
            m = _EVAL.search(path)
            if m:
                pairs.add((split_seed(m["run"], plan.seeds[0])[0], m["kind"]))
    return pairs


def published_runs_frame(directory: Optional[str | Path] = None) -> pd.DataFrame:
    """Every printed number of a run or an importable off-the-shelf baseline (``releases.OFF_THE_SHELF``),
    with the four VQA categories. A category printed only to one decimal (Tables 2 and 3) gives way
    to the one computed from the same source's 16 two-decimal benchmarks where the two agree to
    that decimal: a claim or comparison then reads 39.36, not 39.4."""
    long = load_published(directory)
    tables = sorted(set(long.loc[long["source"].map(evaluable), "table"]))
    frame = published_frame(tables, directory, sources=evaluable, decimals=True)
    frame["origin"] = "published"
    frame["seed"] = 0
    computed = with_categories(frame[frame["metric"].isin(VQA_BENCHMARKS)][COLUMNS].reset_index(drop=True))
    finer = computed.set_index(["source", "metric"])["value"]
    coarse = [i for i, r in frame.iterrows() if r["metric"] in CATEGORY_COLUMNS and (r["source"], r["metric"]) in finer
              and abs(finer[(r["source"], r["metric"])] - r["value"]) <= 0.5 * 10.0 ** -r["decimals"] + 1e-9
              and r["decimals"] < 2]
    return with_categories(frame.drop(index=coarse)[COLUMNS].reset_index(drop=True))


def runs_frame(paths: Iterable[str | Path], first_seed: int = 0) -> pd.DataFrame:
    """Eval JSONs (``evals/{run}[.s{seed}]/``) as a long frame with ``seed``, plus Table 2's share
    of data kept (``data/filter/{light,heavy}.json``; 100 for unfiltered runs): what the items
    read (``results.run_results``) for every run among ``paths``."""
    rows, kept = [], {}
    for path in map(Path, paths):
        if is_filter_result(path):
            kept[path.stem] = kept_percent(path)
        elif _EVAL.search(path.as_posix()):
            rows.extend(eval_rows(path, first_seed))
    rows.extend(data_pct_rows(dict.fromkeys(r["source"] for r in rows), kept, first_seed))
    return with_categories(pd.DataFrame(rows, columns=["source", "metric", "value", "origin", "seed"]))


def probe_controls(paths: Iterable[str | Path]) -> dict[str, dict[str, float]]:
    """The VQA Average and category scores of each probe control among ``paths``
    (``controls/{pixels,blind}/vqa.json``)."""
    out = {}
    for path in map(Path, paths):
        m = _CONTROL.search(path.as_posix())
        if m:
            try:
                metrics = json.loads(path.read_text())["metrics"]
                out[m["control"]] = {k: float(metrics[k]) for k in ("Average", *VQA_CATEGORIES)}
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: cannot read its metrics' Average and categories: {err!r}") from err
    if out and set(out) != set(VQA_CONTROLS):
        raise ValueError(f"the VQA probe controls come in a pair ({', '.join(VQA_CONTROLS)}); got only {sorted(out)}")
    return out


def _probe_gains(controls: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Each VQA metric's (pixels − blind gain, the gain it needs)."""
    return {m: (controls["pixels"][m] - controls["blind"][m],
                MIN_PROBE_GAIN if m == "Average" else MIN_CATEGORY_PROBE_GAIN) for m in controls["pixels"]}


def gate_on_probe(results: list[claims_mod.Result], controls: Mapping[str, Mapping[str, float]]
                  ) -> tuple[list[claims_mod.Result], str]:
    """Claims resting on VQA numbers are not measurable where the probe does not read images:
    raw-pixel tokens scoring no better than zeros means every encoder's VQA numbers are the
    language model's answer priors. A claim is gated on the Average and on each category it
    reads, since a probe can read the images for some categories' questions and not for others
    (at 32 px, small chart text). The verdict the numbers alone would give stays in the evidence."""
    if not controls:
        return results, ""
    gains = _probe_gains(controls)
    unread = [m for m, (gain, needed) in gains.items() if gain < needed]
    avg = gains["Average"][0]
    note = (f"VQA probe controls: raw-pixel tokens {controls['pixels']['Average']:.2f}, zero tokens "
            f"{controls['blind']['Average']:.2f} Average (gain {avg:+.2f}; needs >= +{MIN_PROBE_GAIN:g}); "
            + ", ".join(f"{m} {gains[m][0]:+.2f}" for m in VQA_CATEGORIES)
            + f" (each needs >= +{MIN_CATEGORY_PROBE_GAIN:g})")
    if "Average" in unread:
        note += (": the probe does not read images at this scale, so its numbers are the language model's "
                 "answer priors.")
    elif unread:
        note += f": the probe reads images, but not for {', '.join(unread)}, whose claims are not measurable."
    else:
        return results, note + ": the probe reads images."
    gated = []
    for r in results:
        read = {"Average"} | {m for s in r.claim.series if s.eval == "vqa" for m in s.metrics}
        if r.verdict != claims_mod.NOT_MEASURABLE and any(s.eval == "vqa" for s in r.claim.series) and (
                read & set(unread)):
            r = claims_mod.Result(r.claim, claims_mod.NOT_MEASURABLE, f"{note} Without the control: {r.verdict}; "
                                  f"{r.evidence}", r.missing, r.quantities)
        gated.append(r)
    return gated, note


def no_image_answers(paths: Iterable[str | Path]) -> dict[str, float]:
    """Each classic metric's best answer without the image (``controls/no_image/classic.json``
    among ``paths``); empty without it."""
    answers = [r for p in map(Path, paths) if is_no_image_result(p) for r in eval_rows(p)]
    return {r["metric"]: r["value"] for r in answers if r["metric"] in CLASSIC_METRICS}


def gate_on_no_image(results: list[claims_mod.Result], frame: pd.DataFrame, bars: Mapping[str, float]
                     ) -> list[claims_mod.Result]:
    """Claims resting on classic numbers are not measurable where a run's number (its mean over
    seeds) does not beat the best answer to its task that ignores the image: a trend among such
    numbers is a trend in how the probes fit positions, not in what the encoders saw. The
    verdict the numbers alone would give stays in the evidence."""
    gated = []
    for r in results:
        short = [f"{run}'s {label(m)} {v:.3g} (without the image {bars[m]:.3g})"
                 for s in r.claim.series if s.eval == "classic" for m in s.metrics if m in bars
                 for run in s.runs
                 for v in [frame.loc[(frame["source"] == run) & (frame["metric"] == m), "value"].mean()]
                 if not better(m, v, bars[m])]
        if short and r.verdict != claims_mod.NOT_MEASURABLE:
            r = claims_mod.Result(r.claim, claims_mod.NOT_MEASURABLE,
                                  "not beating the best answer without the image: " + ", ".join(short)
                                  + f". Without the control: {r.verdict}; {r.evidence}", r.missing, r.quantities)
        gated.append(r)
    return gated


def no_image_note(frame: pd.DataFrame, bars: Mapping[str, float]) -> str:
    """How many runs' classic numbers beat the best answer to their task that ignores the image
    (``bars``: ``no_image_answers``); empty without it."""
    counts = []
    for metric, bar in bars.items():
        values = frame.loc[frame["metric"] == metric, "value"].dropna()
        if len(values):
            cleared = sum(better(metric, v, bar) for v in values)
            counts.append(f"{label(metric)} {cleared} of {len(values)} (without the image {bar:.3g})")
    if not counts:
        return ""
    return ("Classic probes against the best answer that ignores the image (one class or depth for all, or each "
            "position's own over the training maps): numbers of runs that beat it: " + "; ".join(counts)
            + ". One that does not, does not show that the probe read the encoder.")


def compared_pairs(item_ids: Iterable[str], imported: Iterable[str] = ()) -> dict[tuple[str, str], list[str]]:
    """(run, metric) -> the items that print it, for the runs of the given items and the
    off-the-shelf baselines among ``imported`` (evaluated here, not only printed)."""
    imported = set(imported)
    out: dict[tuple[str, str], list[str]] = {}
    for item_id in item_ids:
        item = specs.get_item(item_id)
        for run in (*item.runs, *(s for s in item.baselines if s in imported)):
            for metric in item.metrics:
                out.setdefault((run, metric), []).append(item_id)
    return out


def comparison(reproduced: pd.DataFrame, published: pd.DataFrame, item_ids: Iterable[str],
               tolerances: Mapping[str, float], mode: str) -> pd.DataFrame:
    """One row per (run, metric) the paper prints for the requested items, and per (baseline,
    metric) for an off-the-shelf baseline evaluated here (in ``reproduced``).

    ``mode``: "published" (the source is the paper: identity, labelled as such), "comparable"
    (within / outside the metric's tolerance) or anything else ("not comparable", differences shown).
    """
    pub = published.groupby(["source", "metric"])["value"].first()
    if reproduced.empty:
        rep = pd.DataFrame(columns=["mean", "std", "count"])
    else:
        rep = reproduced.groupby(["source", "metric"])["value"].agg(["mean", "std", "count"])
    rows = []
    imported = () if mode == "published" else set(reproduced["source"])
    for (run, metric), items in compared_pairs(item_ids, imported).items():
        if (run, metric) not in pub.index:
            continue
        published_value = float(pub[(run, metric)])
        if mode == "published":
            value, sd, n = published_value, np.nan, 0
        elif (run, metric) in rep.index:
            value, sd, n = (float(rep.loc[(run, metric), "mean"]), float(rep.loc[(run, metric), "std"]),
                            int(rep.loc[(run, metric), "count"]))
        else:
            value, sd, n = np.nan, np.nan, 0
        tol = float(tolerances[metric]) if metric in tolerances else np.nan
        diff = value - published_value
        if mode == "published":
            status = PAPER_ITSELF
        elif np.isnan(value):
            status = MISSING
        elif mode != "comparable":
            status = NOT_COMPARABLE
        elif np.isnan(tol):
            status = NO_TOLERANCE
        else:
            status = WITHIN if abs(diff) <= tol else OUTSIDE
        rows.append({"source": run, "metric": metric, "items": " ".join(items), "reproduced": value,
                     "reproduced_sd": sd if n > 1 else np.nan, "n_seeds": n, "published": published_value,
                     "difference": diff, "tolerance": tol, "status": status})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def thresholds() -> list[tuple[str, float, str]]:
    c = claims_mod
    return [
        ("Z", c.Z, "standard errors a quantity must clear its threshold by: over seeds, and over the benchmarks' "
                   "questions where the VQA numbers carry theirs (se/<metric>; without, no margin with one seed); "
                   "an alignment slope or gain must also be Z of its standard errors from the scores' own "
                   "(slope_z, gain_z)"),
        ("MIN_SLOPE", c.MIN_SLOPE, "VQA points per doubling of model size / samples seen for 'improves, scales'"),
        ("MAX_FLAT_SLOPE", c.MAX_FLAT_SLOPE, "VQA points per doubling at most, for 'does not scale'"),
        ("MIN_SLOPE_GAP", c.MIN_SLOPE_GAP, "points per doubling one slope must beat another by"),
        ("MIN_R2", c.MIN_R2, "R² of the fit against log2(x) for 'log-linear'"),
        ("MIN_GAP", c.MIN_GAP, "VQA points for 'leads', 'beats', 'helps' and each resolution step"),
        ("MIN_OCR_GAIN", c.MIN_OCR_GAIN, "OCR & Chart points a text filter must add"),
        ("MAX_MEAN_LOSS", c.MAX_MEAN_LOSS, "mean points the other three categories may lose to a filter"),
        ("MIN_REL_SLOPE", c.MIN_REL_SLOPE, "alignment gain per doubling, as a fraction of the mean score"),
        ("MIN_REL_GAIN", c.MIN_REL_GAIN, "alignment one encoder must add to another's, as a fraction of it"),
        ("MIN_REL_LOSS", c.MIN_REL_LOSS, "fraction of its first value a classic dense probe must lose, in its "
                                         "direction, for 'degrades'"),
        ("MIN_PROBE_GAIN", MIN_PROBE_GAIN, "VQA Average points raw-pixel tokens must score above zeros for the "
                                           "VQA claims to be measurable (where evaluate.vqa.controls runs them)"),
    ]


def claims_markdown(results: list[claims_mod.Result], scale: str, summary: str, probe_note: str = "",
                    no_image: str = "") -> str:
    lines = [f"## Claims of the paper at the `{scale}` scale", ""]
    lines += [probe_note, ""] if probe_note else []
    lines += [no_image, ""] if no_image else []
    lines += ["| claim | verdict | evidence |", "|---|---|---|"]
    for r in results:
        evidence = r.evidence.replace("|", "/").replace(". Points: ", "<br>Points: ").replace(" / ", "<br>")
        lines.append(f"| **{r.claim.id}**: {r.claim.statement} | **{r.verdict}** | {evidence} |")
    counts = pd.Series([r.verdict for r in results]).value_counts()
    lines += ["", "Verdicts: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in claims_mod.VERDICTS) + ".", "",
              f"Per-metric comparison with the paper: {summary}", "",
              "Thresholds (webssl_repro.paper.claims; slopes are fitted against log2 of params or samples seen):", ""]
    lines += [f"- `{name}` = {value:g}: {what}" for name, value, what in thresholds()]
    return "\n".join(lines) + "\n"


def protocol_notes(metrics: Iterable[str]) -> list[str]:
    """What differs from the paper's protocol in the benchmarks behind ``metrics`` (a benchmark,
    its VQA category or the VQA Average), so that a difference there is not read as the encoder's."""
    metrics = set(metrics)
    notes = []
    for bench, note in PROTOCOL_DIFFERENCES.items():
        category = next((c for c, benches in VQA_CATEGORIES.items() if bench in benches), None)
        if metrics & ({bench} if category is None else {bench, category, "Average"}):
            notes.append(note)
    return notes


def comparison_summary(table: pd.DataFrame, mode: str) -> str:
    counts = table["status"].value_counts()
    text = ", ".join(f"{status}: {n} metric{'s' * (n != 1)}" for status, n in counts.items()) or "no metric in common"
    if mode == "published":
        return f"{text} — at the published scale the numbers are the paper's own, so this is not a pass."
    if mode != "comparable":
        return f"{text} — this scale differs from the paper in data and model sizes (check.comparable: false)."
    notes = "".join(f" {note}." for note in protocol_notes(table.loc[table["status"] != MISSING, "metric"]))
    return f"{text} (tolerances from check.tolerances).{notes}"


def compare_evals(paths: Iterable[str | Path], tolerances: Mapping[str, float], comparable: bool = True,
                  published_dir: Optional[str | Path] = None) -> pd.DataFrame:
    """Eval JSONs of any runs (``evals/<run>[.s<seed>]/<kind>.json``) against every number the
    paper prints for those runs, in any table: one row per (run, metric) the two share."""
    from webssl_repro.plan_checks import check_tolerances

    check_tolerances(tolerances)  # a misspelt metric would leave its numbers with "no tolerance"
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists() and set("*?[") & set(path.as_posix()):  # the shell passes on a glob that matched nothing
            raise FileNotFoundError(f"{path}: the pattern matches no file")
        if not _EVAL.search(path.as_posix()):
            raise ValueError(f"{path}: not an eval result (results/{{scale}}/evals/<run>[.s<seed>]/"
                             "{vqa,classic,alignment}.json)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    frame = runs_frame(paths)
    frame = frame[frame["metric"] != DATA_PCT]  # eval files alone: 100 % for an unfiltered run, not measured
    runs = set(frame["source"])
    table = comparison(frame, published_runs_frame(published_dir), specs.ITEMS, tolerances,
                       "comparable" if comparable else "not comparable")
    return table[table["source"].isin(runs) & table["n_seeds"].gt(0)].reset_index(drop=True)


def fraction_suspects(table: pd.DataFrame) -> list[str]:
    """Rows of a ``compare`` table whose reproduced percentage looks like a fraction (at most 1
    where the paper prints 10 or more): eval files hold percentages, 0 to 100."""
    percent = ~table["metric"].isin([*LOWER_IS_BETTER, "mme"]) & ~table["metric"].str.startswith(ALIGNMENT_PREFIX)
    rows = table[percent & table["reproduced"].le(1.0) & table["published"].ge(10.0)]
    return [f"{r.source}'s {r.metric} is {r.reproduced:.4g} where the paper prints {r.published:.4g}: eval files "
            "hold percentages (0 to 100), not fractions" for r in rows.itertuples()]


def run_check(config: Mapping[str, Any], inputs: Iterable[str | Path], outdir: str | Path,
              published_dir: Optional[str | Path] = None) -> tuple[list[claims_mod.Result], pd.DataFrame]:
    from webssl_repro.workflow import Plan

    plan = Plan(config)
    published = published_runs_frame(published_dir)
    check_cfg = config.get("check", {})
    inputs = list(inputs)
    if plan.published:
        mode, frame, requested = "published", published, None
    else:
        mode = "comparable" if check_cfg.get("comparable", False) else "not comparable"
        frame, requested = runs_frame(inputs, plan.seeds[0]), requested_pairs(plan)
    results, probe_note = gate_on_probe(claims_mod.evaluate_all(frame, requested), probe_controls(inputs))
    bars = no_image_answers(inputs)  # read once: the gate and the note
    results = gate_on_no_image(results, frame, bars)
    table = comparison(frame, published, plan.items, check_cfg.get("tolerances", {}), mode)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    claims_mod.results_frame(results).to_csv(outdir / "claims.tsv", sep="\t", index=False)
    table.to_csv(outdir / "comparison.tsv", sep="\t", index=False, na_rep="NA", float_format="%.6g")
    no_image = "" if plan.published else no_image_note(frame, bars)
    (outdir / "claims.md").write_text(claims_markdown(results, plan.scale, comparison_summary(table, mode),
                                                      probe_note, no_image))
    return results, table
