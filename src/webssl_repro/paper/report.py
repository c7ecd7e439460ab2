"""``paper/{scale}/report.md``: every table and figure of a scale beside the paper's, the claims, provenance.

At a run scale each table is shown next to the same table rendered from the paper's numbers, and
each line figure also as an overlay (``{item}_vs_published.png``): our values on the left y-axis,
the paper's on a twin right y-axis, because the scales' magnitudes differ while the trends should
not. Paths here are the rules' declared outputs, so the report never reads an undeclared file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from webssl_repro.files import code_version
from webssl_repro.paper import specs

REPORT_NAME = "report.md"
CHECK_FILES = ("claims.tsv", "claims.md", "comparison.tsv")


# ---- paths (used by rules/paper.smk) ----------------------------------------------------------------
def check_outputs(paper_dir: str) -> list[str]:
    return [f"{paper_dir}/check/{name}" for name in CHECK_FILES]


def check_inputs(plan) -> list[str]:
    """What the claims read: every requested item's inputs (eval JSONs, or the published TSVs),
    the VQA probe's controls where the scale runs them, and the classic tasks' answers without the image."""
    items = dict.fromkeys(p for item in plan.items for p in plan.item_inputs(item))
    if plan.published:
        return list(items)
    controls = [plan.control_path(c) for c in plan.vqa_controls()] + plan.no_image_answers()
    return list(dict.fromkeys([*items, *controls]))


def published_tsvs() -> list[str]:
    """The published numbers the comparison reads at every scale."""
    from webssl_repro.paper.published import RESULT_FILES
    from webssl_repro.workflow import PUBLISHED_DIR

    return [f"{PUBLISHED_DIR}/{file}" for file in RESULT_FILES]


def reference_outputs(paper_dir: str, item_id: str) -> list[str]:
    """The item rendered from the paper's numbers inside a run scale's folder (``paper/{scale}/published/``)."""
    item = specs.get_item(item_id)
    if item.kind == "table":
        return [f"{paper_dir}/published/tables/{item_id}.{ext}" for ext in ("tsv", "md", "tex")]
    return [f"{paper_dir}/published/figures/{item_id}.{ext}" for ext in ("pdf", "png")]


def has_overlay(item_id: str) -> bool:
    """Only line figures share axes with the paper's; Fig. 9's alignment values are not printed."""
    return specs.get_item(item_id).kind == "lines"


def overlay_output(paper_dir: str, item_id: str) -> str:
    return f"{paper_dir}/figures/{item_id}_vs_published.png"


def published_inputs(item_id: str) -> list[str]:
    from webssl_repro.workflow import published_files

    return published_files(specs.get_item(item_id))


def report_output(plan) -> str:
    return f"{plan.paper_dir}/{REPORT_NAME}"


def report_inputs(plan) -> list[str]:
    paths = [p for item in plan.items for p in plan.item_outputs(item)] + plan.data_figures()
    paths += check_outputs(plan.paper_dir)
    if not plan.published:
        for item in plan.items:
            paths += reference_outputs(plan.paper_dir, item)
            if has_overlay(item):
                paths.append(overlay_output(plan.paper_dir, item))
    return paths


# ---- overlay figure ------------------------------------------------------------------------------
def render_overlay(item_id: str, scale: str, inputs: Iterable[str | Path], out: str | Path,
                   published_dir: Optional[str | Path] = None) -> None:
    """Each panel: our runs' series (solid, left axis) and the paper's (dashed, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from webssl_repro.metrics import LOWER_IS_BETTER, label
    from webssl_repro.paper.results import item_results, lookup, value_table

    item = specs.get_item(item_id)
    if not has_overlay(item_id):
        raise ValueError(f"{item_id}: only line figures have an overlay (kind {item.kind!r})")
    ours = value_table(item_results(item, "runs", [p for p in inputs if Path(p).suffix == ".json"]))
    paper = value_table(item_results(item, "published", [Path(published_dir) / "vqa.tsv"] if published_dir else []))
    run_series = [s for s in item.series if all(src not in specs.BASELINES for src in s.sources)]
    n = len(item.metrics)
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, 3.5), squeeze=False)
    for ax, metric in zip(axes[0], item.metrics):
        twin = ax.twinx()
        for series in run_series:
            x = np.asarray(series.x, dtype=float)
            for axis, wide, style, fill in ((ax, ours, "-", None), (twin, paper, "--", "none")):
                y = np.array([lookup(wide, s, metric) for s in series.sources], dtype=float)
                ok = ~np.isnan(y)
                if ok.any():
                    axis.plot(x[ok], y[ok], linestyle=style, marker=series.marker, color=series.color,
                              markerfacecolor=fill or series.color, linewidth=1.6, alpha=1.0 if fill is None else 0.7)
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
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"{item_id}: {item.title} — {scale} vs paper (twin y-axes)", fontsize=10, y=1.04)
    fig.subplots_adjust(bottom=0.3, wspace=0.75)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", dpi=130)
    plt.close(fig)


# ---- report.md -----------------------------------------------------------------------------------
def _body(path: Path) -> list[str]:
    """A rendered table's Markdown without its own heading (the report gives each item one)."""
    lines = path.read_text().splitlines()
    return lines[1:] if lines and lines[0].startswith("#") else lines


def git_commit() -> str:
    return code_version() or "unknown (git or the checkout not available)"


def build_report(plan, config_hash: str, commit: str) -> str:
    paper = Path(plan.paper_dir)
    scale = plan.scale
    lines = [f"# Scaling Language-Free Visual Representation Learning — `{scale}` scale", ""]
    if plan.published:
        lines += ["Every table and figure rendered from the paper's own numbers (arXiv 2504.01017v1, "
                  "`results/published/`); the claims below are evaluated on those numbers.", ""]
    else:
        lines += [f"Every table and figure of the `{scale}` scale, each beside the paper's. The numbers differ in "
                  "magnitude by design (other data and model sizes). Compare trends only where the claims below "
                  "find them measurable: a VQA probe that scores raw-pixel tokens no higher than zero tokens "
                  "measures its language model's answer priors, not the encoders, an alignment trend must "
                  "clear the scores' own standard error over captions, and a classic number does not show that the "
                  "probe read its encoder unless it beats the best answer to its task that ignores the image (‡ in the tables).", ""]
    lines += ["## Claims of the paper", ""] + _body(paper / "check" / "claims.md") + [""]
    lines += ["Per-metric numbers: [check/comparison.tsv](check/comparison.tsv), verdicts: "
              "[check/claims.tsv](check/claims.tsv).", ""]
    tables = [i for i in plan.items if specs.get_item(i).kind == "table"]
    figures = [i for i in plan.items if specs.get_item(i).kind != "table"]
    if tables:
        lines += ["## Tables", ""]
    for item_id in tables:
        item = specs.get_item(item_id)
        lines += [f"### {item_id}: {item.title}", ""]
        if not plan.published:
            lines += [f"**{scale}** ([tsv](tables/{item_id}.tsv), [tex](tables/{item_id}.tex))", ""]
        lines += _body(paper / "tables" / f"{item_id}.md") + [""]
        if not plan.published:
            lines += ["**paper**", ""] + _body(paper / "published" / "tables" / f"{item_id}.md") + [""]
    if figures:
        lines += ["## Figures", ""]
    for item_id in figures:
        item = specs.get_item(item_id)
        lines += [f"### {item_id}: {item.title}", ""]
        if plan.published:
            lines += [f"![{item_id}](figures/{item_id}.png)", f"([pdf](figures/{item_id}.pdf))", ""]
            continue
        lines += [f"| {scale} | paper |", "|---|---|",
                  f"| ![{item_id} ({scale})](figures/{item_id}.png) | "
                  f"![{item_id} (paper)](published/figures/{item_id}.png) |", ""]
        if has_overlay(item_id):
            lines += [f"Overlay, {scale} on the left axis and the paper on the right: ", "",
                      f"![{item_id}: {scale} vs paper](figures/{item_id}_vs_published.png)", ""]
        else:
            lines += [f"No overlay: {item.note or 'the paper prints no values for this figure.'}", ""]
    if plan.data_figures():
        lines += ["### fig8: samples of the corpus, raw / light filter / heavy filter", "",
                  "![fig8](figures/fig8.png) ([pdf](figures/fig8.pdf)); kept fractions and precision/recall "
                  "against the generator's ground truth are in `results/{}/data/filter/`.".format(scale), ""]
    lines += ["## How this was made", "",
              f"- scale `{scale}`, numbers from `{plan.config['source']}`, config hash `{config_hash}` "
              "(`webssl_repro.config.config_hash` of the whole validated config; a run's provenance hashes "
              "its own slice of it), "
              f"seeds {list(plan.config.get('seeds', [0]))}",
              f"- git commit `{commit}`",
              f"- `snakemake --cores 2 all --configfile config/{scale}.yaml` (the config file of this scale); "
              "`snakemake --report report.html` builds the HTML report of the same outputs",
              "- claims and thresholds: `webssl_repro.paper.claims`; comparison tolerances: `check:` of the config",
              ""]
    return "\n".join(lines)


def write_report(config: Mapping[str, Any], out: str | Path) -> str:
    from webssl_repro.config import config_hash
    from webssl_repro.workflow import Plan

    plan = Plan(config)
    text = build_report(plan, config_hash(config), git_commit())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text


# ---- CLI (kept here because this module imports nothing heavy at load time) ----------------------
def _check_cmd(args: argparse.Namespace) -> int:
    from webssl_repro.paper.check import run_check

    results, table = run_check(json.loads(args.config_json), args.inputs, args.outdir, args.published_dir)
    for r in results:
        print(f"{r.claim.id}: {r.verdict}")
    print(f"comparison: {len(table)} metrics")
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    write_report(json.loads(args.config_json), args.out)
    print(f"report: wrote {args.out}")
    return 0


def compare_inputs(evals: list[Path], configfile: list[Path] | None) -> tuple[list[Path], list[Path]]:
    """The eval files and the configs of ``compare``. ``--configfile`` takes several values, as
    Snakemake's does, so eval files after it land there: those under an ``evals/`` folder are
    evals. Without a config, the one of the scale that the files' ``results/{scale}/`` names."""
    configs = [p for p in configfile or [] if not (p.suffix == ".json" and p.parent.parent.name == "evals")]
    evals = [*evals, *(p for p in configfile or [] if p not in configs)]
    if not evals:
        raise ValueError("compare: name at least one eval file (results/{scale}/evals/<run>/<kind>.json)")
    if configs:
        return evals, configs
    scales = {p.parts[i + 1] for p in evals for i in range(len(p.parts) - 3)
              if p.parts[i] == "results" and p.parts[i + 2] == "evals"}
    if len(scales) > 1:
        raise ValueError(f"compare: the eval files are of scales {sorted(scales)}, judged by different tolerances: "
                         "compare them apart, or name one config with --configfile")
    config = Path("config") / f"{scales.pop() if scales else 'paper'}.yaml"
    if not config.exists():
        raise ValueError(f"compare: no {config} (run from the checkout's root), or name the config whose "
                         "check.tolerances judge the differences with --configfile")
    return evals, [config]


def _compare_cmd(args: argparse.Namespace) -> int:
    from webssl_repro.config import load_configs
    from webssl_repro.paper.check import compare_evals, protocol_notes

    evals, configs = compare_inputs(args.evals, args.configfile)
    check = load_configs(configs).get("check", {})
    table = compare_evals(evals, check.get("tolerances", {}), check.get("comparable", False), args.published_dir)
    if table.empty:
        print("compare: the paper prints none of these runs' metrics")
        return 0
    shown = table.drop(columns=["reproduced_sd"] if table["n_seeds"].max() < 2 else [])
    print(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    print(", ".join(f"{status}: {n}" for status, n in table["status"].value_counts().items()))
    if check.get("comparable", False):
        for note in protocol_notes(table["metric"]):
            print(f"note: {note}")
    if args.out is not None:
        table.to_csv(args.out, sep="\t", index=False, na_rep="NA", float_format="%.6g")
    return 0


def _overlay_cmd(args: argparse.Namespace) -> int:
    render_overlay(args.item, args.scale, args.inputs, args.out, args.published_dir)
    print(f"{args.item}: wrote {args.out}")
    return 0


def add_parsers(sub) -> None:
    """``webssl-repro check | report | compare | overlay`` (registered by cli.build_parser)."""
    check = sub.add_parser("check", help="evaluate the paper's claims and compare numbers with the paper")
    check.add_argument("--config-json", required=True, help="the config (scale, source, items, stages, seeds, check)")
    check.add_argument("--inputs", nargs="*", default=[], type=Path)
    check.add_argument("--outdir", required=True, type=Path)
    check.add_argument("--published-dir", default=None, type=Path)
    check.set_defaults(func=_check_cmd)

    report = sub.add_parser("report", help="write paper/{scale}/report.md from the rendered items and the check")
    report.add_argument("--config-json", required=True)
    report.add_argument("--out", required=True, type=Path)
    report.set_defaults(func=_report_cmd)

    compare = sub.add_parser("compare", help="eval JSONs of any runs against the numbers the paper prints for them")
    compare.add_argument("evals", nargs="*", type=Path, help="results/{scale}/evals/<run>/<kind>.json files")
    compare.add_argument("--configfile", nargs="+", default=None, type=Path,
                         help="the config whose check.tolerances judge the differences (default: config/{scale}.yaml "
                              "of the files' results/{scale}/, else config/paper.yaml)")
    compare.add_argument("--published-dir", default=None, type=Path)
    compare.add_argument("--out", default=None, type=Path, help="also write the table as TSV")
    compare.set_defaults(func=_compare_cmd)

    overlay = sub.add_parser("overlay", help="a figure's reproduced values over the paper's, twin y-axes")
    overlay.add_argument("item")
    overlay.add_argument("--scale", required=True)
    overlay.add_argument("--inputs", nargs="*", default=[], type=Path)
    overlay.add_argument("--published-dir", default=None, type=Path)
    overlay.add_argument("--out", required=True, type=Path)
    overlay.set_defaults(func=_overlay_cmd)
