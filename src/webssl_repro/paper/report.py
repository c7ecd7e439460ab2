"""``paper/{scale}/report.md``: every table and figure of a scale beside the paper's, the claims, provenance.

At a run scale each table is shown next to the same table rendered from the paper's numbers, and
each line figure also as an overlay (``figures.render_overlay``): our values on the left y-axis,
the paper's on a twin right y-axis, because the scales' magnitudes differ while the trends should
not. It reads only the rules' declared outputs (``workflow_paper.PaperJobs.report_inputs``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from webssl_repro.files import code_version
from webssl_repro.paper import specs


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
        if item.overlay:
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
