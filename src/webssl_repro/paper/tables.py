"""Tables 2, 3, 6–15 as TSV (numbers), Markdown and LaTeX (for reading and for the paper).

A value the source does not have is a visible gap (``—`` / ``NA``), never an invented
number. Rows taken from the paper at a run scale are marked as published.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from webssl_repro.metrics import (BENCHMARK_LABELS, CATEGORY_COLUMNS, CLASSIC_METRICS, DATA_PCT, LOWER_IS_BETTER,
                                  NO_IMAGE, VQA_CATEGORIES, better, label)
from webssl_repro.paper import specs
from webssl_repro.paper.published import load_table3_metadata
from webssl_repro.paper.results import lookup, value_table

GAP = "—"
NOT_BEYOND_NO_IMAGE = "‡"  # a run's classic number no better than an answer that ignores the image
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


def _fmt(value: float, places: int) -> str:
    return GAP if value is None or math.isnan(value) else f"{value:.{places}f}"


def _percent(value: float) -> str:
    """Table 2's share of the data as the paper prints it: ``100%``, ``50.3%``."""
    return GAP if value is None or math.isnan(value) else f"{value:.1f}".rstrip("0").rstrip(".") + "%"


def descriptor_frame(item: specs.Item, directory: str | Path | None = None) -> pd.DataFrame:
    """The published table's descriptive columns of ``item``'s rows, indexed by source."""
    if not item.descriptors:
        return pd.DataFrame()
    meta = load_table3_metadata(directory)
    return meta[meta["table"].isin(item.published)].set_index("source")[list(item.descriptors)]


def no_image_bars(item: specs.Item, results: pd.DataFrame) -> dict[str, float]:
    """The best answer without the image (``evaluate.no_image``) of each of ``item``'s classic
    metrics, where ``results`` has it."""
    wide = value_table(results)
    values = {m: lookup(wide, NO_IMAGE, m) for m in item.metrics if m in CLASSIC_METRICS}
    return {m: v for m, v in values.items() if not math.isnan(v)}


def _cells(item: specs.Item, frame: pd.DataFrame, metric: str, bar: float = math.nan) -> list[str]:
    if metric == DATA_PCT:
        return [_percent(v) for v in frame[metric]]
    places = decimals(item.id, metric)
    cells = [_fmt(v, places) for v in frame[metric]]
    if not math.isnan(bar):  # a run's number that an answer without the image matches shows no use of it
        for i, (value, origin) in enumerate(zip(frame[metric], frame["origin"])):
            if origin == "run" and not math.isnan(value) and not better(metric, value, bar):
                cells[i] += NOT_BEYOND_NO_IMAGE
    if item.delta_from:  # the rows after the reference row print their difference to it
        ref = frame.index[frame["source"] == item.delta_from][0]
        base = frame.at[ref, metric]
        for i in frame.index[frame.index > ref]:
            value = frame.at[i, metric]
            if not (math.isnan(value) or math.isnan(base)):
                cells[i] += f" ({value - base:+.{places}f})"
    return cells


def _display(item: specs.Item, frame: pd.DataFrame, scale: str, descriptors: pd.DataFrame,
             bars: dict[str, float]) -> pd.DataFrame:
    out = pd.DataFrame({"Model": frame["row"]})
    published_rows = (frame["origin"] == "published") & (scale != "published")
    out.loc[published_rows, "Model"] = out.loc[published_rows, "Model"] + " †"
    for column in item.descriptors:
        out[DESCRIPTOR_LABELS[column]] = [str(descriptors.at[s, column]) if s in descriptors.index else GAP
                                          for s in frame["source"]]
    for metric in item.metrics:
        out[BENCHMARK_LABELS.get(metric, label(metric))] = _cells(item, frame, metric, bars.get(metric, math.nan))
    return out


def no_image_footnote(bars: dict[str, float], frame: pd.DataFrame) -> str:
    """What ``NOT_BEYOND_NO_IMAGE`` marks, with the answers' own scores."""
    runs = frame[frame["origin"] == "run"]
    numbers = [(m, v, c) for m, c in bars.items() for v in runs[m].dropna()]
    marked = sum(not better(m, v, c) for m, v, c in numbers)
    scores = ", ".join(f"{label(m)} {c:.3g}" for m, c in bars.items())
    return (f"{NOT_BEYOND_NO_IMAGE} no better than an answer that ignores the image (the better of one class or "
            f"depth for all, and each position's own over the training maps; results/*/controls/{NO_IMAGE}/"
            f"classic.json): {scores}. Such a number does not show that the probe read the encoder; {marked} of "
            f"this table's {len(numbers)} classic numbers of runs are marked.")


def _footnotes(item: specs.Item, frame: pd.DataFrame, scale: str, bars: dict[str, float]) -> list[str]:
    notes = []
    if scale == "published":
        notes.append(f"Source: arXiv 2504.01017v1, {', '.join(t.replace('table', 'Table ') for t in item.published)} "
                     "(results/published/*.tsv).")
    elif (frame["origin"] == "published").any():
        notes.append("† published numbers (off-the-shelf encoder, not run at this scale).")
    if item.descriptors and scale != "published":
        notes.append(f"Model, data, samples seen and resolution name each run's place in the paper's grid; "
                     f"its actual size at this scale is in config/{scale}.yaml (labels).")
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
    if item.run_note and scale != "published":
        notes.append(item.run_note)
    if bars:
        notes.append(no_image_footnote(bars, frame))
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
                 published_dir: str | Path | None = None) -> pd.DataFrame:
    """Write ``.tsv``, ``.md`` and ``.tex`` for ``item``; returns the numeric frame.
    ``published_dir``: where the published TSVs are (Table 3's descriptive columns)."""
    by_ext = {Path(p).suffix.lstrip("."): Path(p) for p in outputs}
    missing = {"tsv", "md", "tex"} - set(by_ext)
    if missing:
        raise ValueError(f"render_table({item.id}): outputs lack {sorted(missing)} (got {list(map(str, outputs))})")
    frame = table_frame(item, results)
    bars = no_image_bars(item, results)
    display = _display(item, frame, scale, descriptor_frame(item, published_dir), bars)
    notes = _footnotes(item, frame, scale, bars)
    for path in by_ext.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(by_ext["tsv"], sep="\t", index=False, na_rep="NA", float_format="%.6g")
    md = [f"## {item.id}: {item.title} ({scale})", "", display.to_markdown(index=False, disable_numparse=True), ""]
    md += [f"- {n}" for n in notes]
    by_ext["md"].write_text("\n".join(md) + "\n")
    by_ext["tex"].write_text(to_latex(item, display, notes))
    return frame
