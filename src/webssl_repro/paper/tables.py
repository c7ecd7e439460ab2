"""Tables 2, 3, 6–15 as TSV (numbers), Markdown and LaTeX (for reading and for the paper).

A value the source does not have is a visible gap (``—`` / ``NA``), never an invented
number. Rows taken from the paper at a run scale are marked as published.
"""
from __future__ import annotations

import itertools
import math
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Sequence

import pandas as pd

from webssl_repro.metrics import (BENCHMARK_LABELS, BLIND, CATEGORY_COLUMNS, CLASSIC_METRICS, DATA_PCT,
                                  LOWER_IS_BETTER, NO_IMAGE, SE_PREFIX, VQA_CATEGORIES, better, label)
from webssl_repro.paper import specs
from webssl_repro.paper.published import load_table3_metadata
from webssl_repro.paper.results import lookup, value_table

GAP = "—"
NOT_BEYOND_NO_IMAGE = "‡"  # a run's number no better than an answer that ignores the image
NOISE_SE = 2.0  # a VQA number must beat zero image tokens by this many standard errors
# The paper prints Tables 2 and 3 with one decimal and the appendix tables with two.
ONE_DECIMAL_ITEMS = frozenset({"table2", "table3"})
DESCRIPTOR_LABELS = {"group": "Supervision", "pretrain_data": "Data", "samples_seen": "Seen", "res": "Res."}


def decimals(item_id: str, metric: str) -> int:
    if metric in LOWER_IS_BETTER:
        return 3
    return 1 if item_id in ONE_DECIMAL_ITEMS else 2


def table_frame(item: specs.Item, results: pd.DataFrame) -> pd.DataFrame:
    """Numeric table: one row per spec row, in the paper's order, with provenance columns."""
    wide = value_table(results)
    origin = dict(zip(results["source"], results["origin"])) if not results.empty else {}
    records = []
    for row in item.rows:
        record = {"row": row.label, "source": row.source, "origin": origin.get(row.source, "missing")}
        for metric in item.metrics:
            record[metric] = lookup(wide, row.source, metric)
        records.append(record)
    return pd.DataFrame.from_records(records, columns=["row", "source", "origin", *item.metrics])


def half_up(value: float, places: int, sign: str = "") -> str:
    """``value`` with ``places`` decimals, halves rounded away from zero as papers print them
    (30.25 -> 30.3, where ``f"{30.25:.1f}"`` gives 30.2); the shortest repr decides what a half is."""
    exact = Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return f"{exact:{sign}.{places}f}"


def _fmt(value: float, places: int) -> str:
    return GAP if value is None or math.isnan(value) else half_up(value, places)


def _percent(value: float) -> str:
    """Table 2's share of the data as the paper prints it: ``100%``, ``50.3%``."""
    return GAP if value is None or math.isnan(value) else half_up(value, 1).rstrip("0").rstrip(".") + "%"


def descriptor_frame(item: specs.Item, directory: str | Path | None = None) -> pd.DataFrame:
    """The published table's descriptive columns of ``item``'s rows, indexed by source."""
    if not item.descriptors:
        return pd.DataFrame()
    meta = load_table3_metadata(directory)
    return meta[meta["table"].isin(item.published)].set_index("source")[list(item.descriptors)]


def no_image_bars(item: specs.Item, wide: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Each of ``item``'s metrics' answer without the image and its standard error (NaN where not
    measured), where ``wide`` (``value_table``) has it: the classic tasks' best
    (``evaluate.no_image``), and the VQA probe's on zero image tokens."""
    bars = {m: (lookup(wide, NO_IMAGE, m), lookup(wide, NO_IMAGE, SE_PREFIX + m)) for m in item.metrics}
    return {m: bar for m, bar in bars.items() if not math.isnan(bar[0])}


def beyond_no_image(metric: str, value: float, bar: float, se: float = math.nan, bar_se: float = math.nan) -> bool:
    """Whether a number is better than the answer without the image; by more than ``NOISE_SE``
    standard errors where both carry one (the VQA scores, over their questions)."""
    margin = NOISE_SE * math.hypot(se, bar_se) if not (math.isnan(se) or math.isnan(bar_se)) else 0.0
    return better(metric, value, bar + (-margin if metric in LOWER_IS_BETTER else margin))


def _not_beyond(frame: pd.DataFrame, metric: str, bar: tuple[float, float], wide: pd.DataFrame) -> list[bool]:
    """Per row: whether it is a run's number that the answer without the image matches."""
    flags = []
    for source, value, origin in zip(frame["source"], frame[metric], frame["origin"]):
        se = lookup(wide, source, SE_PREFIX + metric)
        matched = not beyond_no_image(metric, value, bar[0], se, bar[1])
        flags.append(origin == "run" and not math.isnan(value) and matched)
    return flags


def _cells(item: specs.Item, frame: pd.DataFrame, metric: str, bar: tuple[float, float],
           wide: pd.DataFrame) -> list[str]:
    if metric == DATA_PCT:
        return [_percent(v) for v in frame[metric]]
    places = decimals(item.id, metric)
    cells = [_fmt(v, places) for v in frame[metric]]
    if not math.isnan(bar[0]):  # a run's number that an answer without the image matches shows no use of it
        for i, flag in enumerate(_not_beyond(frame, metric, bar, wide)):
            cells[i] += NOT_BEYOND_NO_IMAGE if flag else ""
    if item.delta_from:  # the rows after the reference row print their difference to it
        ref = frame.index[frame["source"] == item.delta_from][0]
        base = frame.at[ref, metric]
        for i in frame.index[frame.index > ref]:
            value = frame.at[i, metric]
            if not (math.isnan(value) or math.isnan(base)):
                delta = Decimal(half_up(value, places)) - Decimal(half_up(base, places))  # of the printed numbers
                cells[i] += f" ({delta:+.{places}f})"
    return cells


def _display(item: specs.Item, frame: pd.DataFrame, scale: str, descriptors: pd.DataFrame,
             bars: dict[str, tuple[float, float]], wide: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"Model": frame["row"]})
    published_rows = (frame["origin"] == "published") & (scale != "published")
    out.loc[published_rows, "Model"] = out.loc[published_rows, "Model"] + " †"
    for column in item.descriptors:
        out[DESCRIPTOR_LABELS[column]] = [str(descriptors.at[s, column]) if s in descriptors.index else GAP
                                          for s in frame["source"]]
    for metric in item.metrics:
        out[BENCHMARK_LABELS.get(metric, label(metric))] = _cells(item, frame, metric,
                                                                  bars.get(metric, (math.nan, math.nan)), wide)
    return out


def no_image_footnote(bars: dict[str, tuple[float, float]], frame: pd.DataFrame, wide: pd.DataFrame) -> str:
    """What ``NOT_BEYOND_NO_IMAGE`` marks, with the answers' own scores."""
    runs = frame["origin"] == "run"
    numbers = sum(int(frame.loc[runs, m].notna().sum()) for m in bars)
    marked = sum(sum(_not_beyond(frame, m, bar, wide)) for m, bar in bars.items())
    parts = []
    classic = {m: bar for m, bar in bars.items() if m in CLASSIC_METRICS}
    if classic:
        parts.append("for the classic tasks, the better of one class or depth for all, and each position's own over "
                     f"the training maps (results/*/controls/{NO_IMAGE}/classic.json): "
                     + ", ".join(f"{label(m)} {v:.3g}" for m, (v, _) in classic.items()))
    vqa = {m: bar for m, bar in bars.items() if m not in CLASSIC_METRICS}
    if vqa:
        parts.append(f"for VQA, the probe trained and answering on zero image tokens (results/*/controls/{BLIND}/"
                     f"vqa.json), beaten only by more than {NOISE_SE:g} standard errors over the questions (the run's "
                     "and its own, where measured): "
                     + ", ".join(f"{BENCHMARK_LABELS.get(m, label(m))} {v:.2f}" for m, (v, _) in vqa.items()))
    return (f"{NOT_BEYOND_NO_IMAGE} no better than an answer that ignores the image; " + "; ".join(parts)
            + f". Such a number does not show that the probe read the encoder; {marked} of this table's {numbers} "
            "numbers of runs are marked.")


def _footnotes(item: specs.Item, frame: pd.DataFrame, scale: str, bars: dict[str, tuple[float, float]],
               wide: pd.DataFrame, legend: str = "") -> list[str]:
    notes = []
    if scale == "published":
        notes.append(f"Source: arXiv 2504.01017v1, {', '.join(t.replace('table', 'Table ') for t in item.published)} "
                     "(results/published/*.tsv).")
    elif (frame["origin"] == "published").any():
        notes.append("† published numbers (off-the-shelf encoder, not run at this scale).")
    if item.descriptors and scale != "published":
        notes.append("Model, data, samples seen and resolution name each run's place in the paper's grid.")
        ran = frame.loc[frame["origin"] == "run", "source"]
        measured = sorted({specs.BASELINES[s] for s in ran if s in specs.BASELINES})
        if measured:  # imported (pretrain.run_sources): the released model itself, at every scale
            notes.append(f"{', '.join(measured)}: the released off-the-shelf model, evaluated here.")
    if item.delta_from:
        ref = next(r.label for r in item.rows if r.source == item.delta_from)
        notes.append(f"(±x): difference to {ref}.")
    if (frame[list(item.metrics)].isna()).any().any():
        notes.append(f"{GAP} not available: the source has no number for this cell.")
    if any(m in LOWER_IS_BETTER for m in item.metrics):
        notes.append("NYUd: RMSE, lower is better.")
    if item.note:
        notes.append(item.note)
    notes += item.scale_notes(scale, legend, has_runs=(frame["origin"] == "run").any())
    if bars:
        notes.append(no_image_footnote(bars, frame, wide))
    return notes


def _latex_escape(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}")
    text = re.sub(r"\^(\w+)", r"\\textsuperscript{\1}", text)  # MME^P, CV-Bench^2D
    for a, b in (("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("^", r"\^{}"),
                 ("†", r"$^\dagger$"), (NOT_BEYOND_NO_IMAGE, r"$^\ddagger$"), ("…", r"\ldots{}"), ("±", r"$\pm$"), (GAP, "--")):
        text = text.replace(a, b)
    return text


def column_group(item: specs.Item, metric: str) -> str:
    """The header a metric's column sits under in the paper: a benchmark's VQA category,
    or VQA / classic vision where a table has both."""
    if metric in BENCHMARK_LABELS:
        return next(c for c, group in VQA_CATEGORIES.items() if metric in group)
    has_classic = any(m in CLASSIC_METRICS for m in item.metrics)
    if metric in CATEGORY_COLUMNS and (has_classic or any(m in VQA_CATEGORIES for m in item.metrics)):
        return "VQA"
    if metric in CLASSIC_METRICS and any(m in CATEGORY_COLUMNS for m in item.metrics):
        return "Classic vision"
    return ""


def _group_header(item: specs.Item, first: int) -> list[str]:
    """A ``\\multicolumn`` row over the metric columns (``first``: how many columns precede them)."""
    groups = [column_group(item, m) for m in item.metrics]
    if not any(groups):
        return []
    cells, rules, col = [""] * first, [], first + 1
    for name, run in itertools.groupby(groups):
        span = len(list(run))
        cells.append(rf"\multicolumn{{{span}}}{{c}}{{{_latex_escape(name)}}}" if name else "")
        if name:
            rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
        cells.extend([""] * (0 if name else span - 1))
        col += span
    return [" & ".join(cells) + r" \\ " + " ".join(rules)]


def to_latex(item: specs.Item, display: pd.DataFrame, notes: Sequence[str]) -> str:
    """Needs booktabs, and graphicx for the wide tables' ``\\resizebox``."""
    cols = "l" * (1 + len(item.descriptors)) + "r" * len(item.metrics)
    wide = display.shape[1] > 10
    lines = [
        "% generated by webssl-repro; do not edit. Needs \\usepackage{booktabs} (and graphicx: \\resizebox)",
        r"\begin{table}[t]", r"\centering", r"\small",
        rf"\caption{{{_latex_escape(item.title)}}}", rf"\label{{tab:{item.id}}}",
        *([r"\resizebox{\linewidth}{!}{%"] if wide else []),
        rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
        *_group_header(item, 1 + len(item.descriptors)),
        " & ".join(_latex_escape(c) for c in display.columns) + r" \\", r"\midrule",
    ]
    group = DESCRIPTOR_LABELS["group"]
    for i, (_, row) in enumerate(display.iterrows()):
        if i and group in display.columns and row[group] != display[group].iloc[i - 1]:
            lines.append(r"\midrule")  # language-supervised, then SSL (Table 3)
        lines.append(" & ".join(_latex_escape(str(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}" + ("}" if wide else "")]
    lines += [rf"\par\footnotesize {_latex_escape(n)}" for n in notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render_table(item: specs.Item, results: pd.DataFrame, outputs: Sequence[str | Path], scale: str,
                 published_dir: str | Path | None = None, legend: str = "") -> pd.DataFrame:
    """Write ``.tsv``, ``.md`` and ``.tex`` for ``item``; returns the numeric frame.
    ``published_dir``: where the published TSVs are (Table 3's descriptive columns); ``legend``:
    what the paper's labels stand for at ``scale`` (``runs.label_legend``), said under run numbers."""
    by_ext = {Path(p).suffix.lstrip("."): Path(p) for p in outputs}
    missing = {"tsv", "md", "tex"} - set(by_ext)
    if missing:
        raise ValueError(f"render_table({item.id}): outputs lack {sorted(missing)} (got {list(map(str, outputs))})")
    frame = table_frame(item, results)
    wide = value_table(results)
    bars = no_image_bars(item, wide)
    display = _display(item, frame, scale, descriptor_frame(item, published_dir), bars, wide)
    notes = _footnotes(item, frame, scale, bars, wide, legend)
    for path in by_ext.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(by_ext["tsv"], sep="\t", index=False, na_rep="NA", float_format="%.6g")
    md = [f"## {item.id}: {item.title} ({scale})", "", display.to_markdown(index=False, disable_numparse=True), ""]
    md += [f"- {n}" for n in notes]
    by_ext["md"].write_text("\n".join(md) + "\n")
    by_ext["tex"].write_text(to_latex(item, display, notes))
    return frame
