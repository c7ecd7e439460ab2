"""Figures 1, 3–7 and 9 with the paper's panels and axes (matplotlib, PDF + PNG).

Where the source has no number for a point, the point is drawn as a hollow marker in its
series' colour, in a grey strip under the panel's floor labelled "n/a" — the gap stays
visible and no value is invented. At a run scale a line figure is also drawn over the paper's
(``render_overlay``), on twin y-axes.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from webssl_repro.metrics import (ALIGNMENT_PREFIX, CLASSIC_METRICS, LOWER_IS_BETTER, NO_IMAGE,  # noqa: E402
                                  SE_PREFIX, label)
from webssl_repro.paper import specs  # noqa: E402
from webssl_repro.paper.results import lookup, value_table  # noqa: E402

GAP_STYLE = dict(marker="o", markerfacecolor="none", markeredgecolor="0.6", linestyle="none", markersize=7)


def _panel_title(metric: str) -> str:
    title = label(metric)
    return f"{title} ↓" if metric in LOWER_IS_BETTER else title


def _size_label(x: float) -> str:
    return f"{x:g}B"


def _x_labels(item: specs.Item, x: np.ndarray) -> list[str]:
    """Each x of a series as its tick reads (``8B seen``), else as a number."""
    ticks = dict(item.xticks)
    return [ticks.get(float(v), f"{v:g}") for v in x]


def _series_points(series: specs.Series, wide: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([lookup(wide, s, metric) for s in series.sources], dtype=float)
    return np.asarray(series.x, dtype=float), y


def no_image_label(metric: str) -> str:
    """What the control line of a panel is: the classic task's best answer that ignores the image,
    or the VQA probe trained and answering on zero image tokens."""
    return "best answer without the image" if metric in CLASSIC_METRICS else "VQA probe on zero image tokens"


def _draw_no_image(ax, wide: pd.DataFrame, metric: str) -> None:
    """At run scales: the number a run's must clear to show that its probe read the encoder."""
    bar = lookup(wide, NO_IMAGE, metric)
    if not math.isnan(bar):
        ax.axhline(bar, linestyle="-.", color="black", linewidth=1.0, label=no_image_label(metric))


def _draw_lines_panel(ax, item: specs.Item, wide: pd.DataFrame, metric: str,
                      left_out: frozenset[str] = frozenset()) -> bool:
    """Returns whether any point of the panel is a gap. Series and reference lines whose
    sources are all in ``left_out`` are not drawn."""
    gaps: list[tuple[float, str]] = []
    for series in item.series:
        if set(series.sources) <= left_out:
            continue
        x, y = _series_points(series, wide, metric)
        ok = ~np.isnan(y)
        if ok.any():
            ax.plot(x[ok], y[ok], marker=series.marker, color=series.color, label=series.label, linewidth=1.8)
            if item.gains and ok.sum() >= 2:
                first, last = np.flatnonzero(ok)[[0, -1]]
                gain, span = y[last] - y[first], f"{_size_label(x[first])}→{_size_label(x[last])}"
                ax.annotate(f"{gain:+.1f} ({span})", (x[last], y[last]), textcoords="offset points",
                            xytext=(6, 0), color=series.color, fontsize=8, va="center")
        gaps.extend((gx, series.color) for gx in x[~ok])
    for ref, style in zip(item.references, ("--", ":")):
        if ref.source in left_out:
            continue
        value = lookup(wide, ref.source, metric)
        if not math.isnan(value):
            ax.axhline(value, linestyle=style, color="0.35", linewidth=1.2, label=ref.label)
    _draw_no_image(ax, wide, metric)
    if gaps:
        # A strip below the data holds one hollow marker per missing point, in its series' colour.
        lo, hi = ax.get_ylim() if ax.has_data() else (0.0, 1.0)
        span = (hi - lo) or 1.0
        floor = lo - 0.08 * span
        ax.set_ylim(lo - 0.16 * span, hi)
        ax.axhspan(lo - 0.16 * span, lo - 0.01 * span, color="0.93", zorder=0)
        # no value ticks inside the strip: a hollow marker there must not read as that value
        ax.set_yticks([t for t in ax.get_yticks() if lo <= t <= hi])
        ax.set_ylim(lo - 0.16 * span, hi)
        for gx, color in gaps:
            ax.plot([gx], [floor], **{**GAP_STYLE, "markeredgecolor": color})
        ax.plot([], [], **GAP_STYLE, label="n/a: no number in the source")
    ax.set_xscale("log")
    if item.xticks:
        ax.set_xticks([t for t, _ in item.xticks], [lab for _, lab in item.xticks])
        ax.minorticks_off()
    ax.set_title(_panel_title(metric), fontsize=11)
    ax.set_xlabel(item.xlabel)
    ax.grid(alpha=0.3)
    return bool(gaps)


def _no_number(scale: str) -> str:
    """Why a bar has no number: the paper prints none; at a run scale, every run of the item is
    an input, so it is an off-the-shelf encoder the config does not import (``pretrain.run_sources``)."""
    return "no number in the source" if scale == "published" else "not evaluated at this scale"


def _draw_bars(ax, item: specs.Item, wide: pd.DataFrame, language_models: Sequence[str],
               scale: str = "published") -> bool:
    """Bars from a floor just under the lowest score (the differences are small; the axis label
    says where it starts), with each score's standard error over captions where the evaluation
    measured one; a missing score is a hollow marker in a grey strip under that floor, as in the
    line figures, never a bar. With no score at all the axis has no values to show and says so."""
    width = 0.8 / max(1, len(language_models))
    positions = np.arange(len(item.rows))
    values, errors = (np.array([[lookup(wide, r.source, f"{prefix}{ALIGNMENT_PREFIX}{lm}") for r in item.rows]
                                for lm in language_models]) for prefix in ("", SE_PREFIX))
    errors = np.nan_to_num(errors)
    finite = ~np.isnan(values)
    floor = float((values - errors)[finite].min()) * 0.98 if finite.any() else 0.0
    top = float((values + errors)[finite].max()) * 1.01 if finite.any() else 1.0
    span = top - floor
    gaps = np.isnan(values)
    for k, lm in enumerate(language_models):
        xs = positions + (k - (len(language_models) - 1) / 2) * width
        ok = ~gaps[k]
        if ok.any():
            ax.bar(xs[ok], values[k][ok] - floor, width, bottom=floor, label=lm, color=f"C{k}",
                   yerr=errors[k][ok] if errors[k][ok].any() else None, capsize=3)
        if gaps[k].any():
            ax.plot(xs[gaps[k]], np.full(int(gaps[k].sum()), floor - 0.08 * span),
                    **{**GAP_STYLE, "markeredgecolor": f"C{k}"}, label=f"{lm}: n/a, {_no_number(scale)}")
    bottom = floor - 0.16 * span if gaps.any() else floor
    if gaps.any():
        ax.axhspan(bottom, floor - 0.01 * span, color="0.93", zorder=0)
    ax.set_xticks(positions, [r.label for r in item.rows], rotation=30, ha="right")
    ax.set_ylabel(f"alignment score (mutual k-NN; axis from {floor:.3g})" + ("\nerror bars: 1 se over captions"
                                                                            if errors.any() else "")
                  if finite.any() else "alignment score: no number in the source")
    ax.set_ylim(bottom, top)
    if not finite.any():
        ax.set_yticks([])
    return bool(gaps.any())


def render_figure(item: specs.Item, results: pd.DataFrame, outputs: Sequence[str | Path], scale: str,
                  language_models: Sequence[str] = ("minilm",), legend: str = "") -> plt.Figure:
    """``legend``: what the paper's labels stand for at ``scale`` (``runs.label_legend``), said
    under a figure with run numbers."""
    by_ext = {Path(p).suffix.lstrip("."): Path(p) for p in outputs}
    missing = {"pdf", "png"} - set(by_ext)
    if missing:
        raise ValueError(f"render_figure({item.id}): outputs lack {sorted(missing)} (got {list(map(str, outputs))})")
    wide = value_table(results)
    # At a run scale the paper's numbers for baselines not run here (tables mark them †) would
    # share an axis with this scale's results, ~2x apart at mini: left out, and named
    left_out = frozenset() if scale == "published" or "origin" not in results else \
        frozenset(results.loc[results["origin"] == "published", "source"])
    if item.kind == "bars":
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(item.rows)), 4.2))
        any_gap = _draw_bars(ax, item, wide, list(language_models), scale)
        ax.legend(fontsize=8)
    else:
        n = len(item.metrics)
        fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.4), squeeze=False)
        any_gap = False
        for ax, metric in zip(axes[0], item.metrics):
            any_gap |= _draw_lines_panel(ax, item, wide, metric, left_out)
        axes[0][0].set_ylabel("accuracy" if item.metrics[0] not in LOWER_IS_BETTER else "metric")
        handles = {}
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)),
                   fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
        fig.subplots_adjust(bottom=0.28, wspace=0.35)
    subtitle = f"{item.id} ({scale}): {item.title}"
    if item.note and (any_gap or item.gains):
        subtitle += "\n" + textwrap.fill(item.note, 110)
    has_runs = "origin" in results and (results["origin"] == "run").any()
    for note in item.scale_notes(scale, legend, has_runs):
        subtitle += "\n" + textwrap.fill(note, 110)
    omitted = [*(x.label for x in item.series if set(x.sources) <= left_out),
               *(r.label for r in item.references if r.source in left_out)]
    if item.kind != "bars" and omitted:
        subtitle += "\n" + textwrap.fill("Not run at this scale, so left out (the paper's numbers are in the "
                                          f"tables, marked †): {', '.join(omitted)}.", 110)
    fig.suptitle(subtitle, fontsize=10, y=1.0 if item.kind == "bars" else 1.05 + 0.04 * subtitle.count("\n"))
    for ext, path in by_ext.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=150 if ext == "png" else None,
                    metadata={"CreationDate": None} if ext == "pdf" else None)
    plt.close(fig)
    return fig


# ---- overlay: a run scale's line figure over the paper's -----------------------------------------
def render_overlay(item_id: str, scale: str, inputs: Iterable[str | Path], out: str | Path,
                   published_dir: Optional[str | Path] = None) -> plt.Figure:
    """Each panel: our runs' series (solid, left axis) and the paper's (dashed, right axis)."""
    from webssl_repro.paper.results import item_results

    item = specs.get_item(item_id)
    if not item.overlay:
        raise ValueError(f"{item_id}: only line figures have an overlay (kind {item.kind!r})")
    ours = value_table(item_results(item, "runs", [p for p in inputs if Path(p).suffix == ".json"]))
    paper = value_table(item_results(item, "published", [Path(published_dir) / "vqa.tsv"] if published_dir else []))
    run_series = [s for s in item.series if all(src not in specs.BASELINES for src in s.sources)]
    n = len(item.metrics)
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, 3.5), squeeze=False)
    missing: dict[str, list[str]] = {scale: [], "paper": []}
    for ax, metric in zip(axes[0], item.metrics):
        twin = ax.twinx()
        for series in run_series:
            x = np.asarray(series.x, dtype=float)
            for axis, wide, style, fill, name in ((ax, ours, "-", None, scale), (twin, paper, "--", "none", "paper")):
                y = np.array([lookup(wide, s, metric) for s in series.sources], dtype=float)
                ok = ~np.isnan(y)
                missing[name] += [f"{series.label} {lab}" for lab, gap in zip(_x_labels(item, x), ~ok) if gap]
                if ok.any():
                    axis.plot(x[ok], y[ok], linestyle=style, marker=series.marker, color=series.color,
                              markerfacecolor=fill or series.color, linewidth=1.6, alpha=1.0 if fill is None else 0.7)
        _draw_no_image(ax, ours, metric)
        ax.set_xscale("log")
        if item.xticks:
            ax.set_xticks([t for t, _ in item.xticks], [lab for _, lab in item.xticks])
            ax.minorticks_off()
        ax.set_title(label(metric) + (" ↓" if metric in LOWER_IS_BETTER else ""), fontsize=10)
        ax.set_xlabel(item.xlabel, fontsize=8)
        ax.set_ylabel(f"{scale} (solid)", fontsize=8)
        twin.set_ylabel("paper (dashed)", fontsize=8, color="0.35")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=s.color, marker=s.marker, label=s.label) for s in run_series]
    handles += [plt.Line2D([], [], color="0.3", linestyle="-", label=f"{scale} (left axis)"),
                plt.Line2D([], [], color="0.3", linestyle="--", label="paper (right axis)")]
    controls = dict.fromkeys(no_image_label(m) for m in item.metrics if not math.isnan(lookup(ours, NO_IMAGE, m)))
    handles += [plt.Line2D([], [], color="black", linestyle="-.", label=f"{c} ({scale})") for c in controls]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    title = f"{item_id}: {item.title} — {scale} vs paper (twin y-axes)"
    for name, points in missing.items():  # no gap strip on twin axes: the points are named instead
        if points:
            title += "\n" + textwrap.fill(f"No number from {name}: {', '.join(dict.fromkeys(points))}.", 120)
    fig.suptitle(title, fontsize=10, y=1.04 + 0.04 * title.count("\n"))
    fig.subplots_adjust(bottom=0.3, wspace=0.75)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", dpi=130)
    plt.close(fig)
    return fig
