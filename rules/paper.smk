# Tables and figures of the paper, from declared inputs only: the eval results of
# the item's runs (or the published TSVs at the published scale); then `check` (the
# paper's claims + reproduced vs published numbers) and `report` (paper/{scale}/report.md).
# Every table, figure and check output is declared with report() for `snakemake --report`.
# Renders take seconds on a CPU: local rules, never a cluster job.
import json
import os

from webssl_repro.paper.specs import ITEMS

# Items the renderers know; fig8 (corpus samples) is drawn by the data stage, so a pattern
# like "fig[0-9]+" would make render_figure a second candidate producer of fig8.pdf.
RENDERED_TABLES = "|".join(i for i in ITEMS if i.startswith("table"))
RENDERED_FIGURES = "|".join(i for i in ITEMS if i.startswith("fig"))

# The whole validated config: the check and report derive their Plan from it, like this DAG.
CONFIG_JSON = json.dumps(config, sort_keys=True, default=str)


rule render_table:
    """A paper table (tsv, md, tex) from its runs' eval results or the published numbers."""
    input:
        lambda w: PLAN.item_inputs(w.item),
    output:
        tsv=report(
            f"{PAPER}/tables/{{item}}.tsv",
            caption="../report/table.rst",
            category="Tables",
            subcategory="{item}",
        ),
        md=f"{PAPER}/tables/{{item}}.md",
        tex=f"{PAPER}/tables/{{item}}.tex",
    log:
        f"logs/{SCALE}/paper/{{item}}.log",
    wildcard_constraints:
        item=RENDERED_TABLES,
    localrule: True
    conda:
        ENV
    params:
        source=config["source"],
        scale=lambda w: SCALE,
        legend=lambda w: PLAN.label_legend(),
    shell:
        "webssl-repro render {wildcards.item:q} --scale {params.scale:q} --source {params.source:q} "
        "--legend={params.legend:q} --outputs {output:q} --inputs {input:q} > {log:q} 2>&1"


rule render_figure:
    """A paper figure (pdf, png) from its runs' eval results or the published numbers."""
    input:
        lambda w: PLAN.item_inputs(w.item),
    output:
        pdf=f"{PAPER}/figures/{{item}}.pdf",
        png=report(
            f"{PAPER}/figures/{{item}}.png",
            caption="../report/figure.rst",
            category="Figures",
            subcategory="{item}",
        ),
    log:
        f"logs/{SCALE}/paper/{{item}}.log",
    wildcard_constraints:
        item=RENDERED_FIGURES,
    localrule: True
    conda:
        ENV
    params:
        source=config["source"],
        scale=lambda w: SCALE,
        lms=lambda w: PLAN.render_language_models(w.item),
        legend=lambda w: PLAN.label_legend(),
    shell:
        "webssl-repro render {wildcards.item:q} --scale {params.scale:q} --source {params.source:q} "
        "--language-models {params.lms:q} --legend={params.legend:q} --outputs {output:q} --inputs {input:q} "
        "> {log:q} 2>&1"


# At a run scale the report shows each item beside the paper's: the same renderers on the
# published numbers, into paper/{scale}/published/, and an overlay of each line figure.
if not PLAN.published:

    rule render_reference_table:
        """The paper's own version of a table, beside this scale's in the report."""
        input:
            lambda w: PLAN.published_inputs(w.item),
        output:
            tsv=report(
                f"{PAPER}/published/tables/{{item}}.tsv",
                caption="../report/reference.rst",
                category="Published (paper)",
                subcategory="{item}",
            ),
            md=f"{PAPER}/published/tables/{{item}}.md",
            tex=f"{PAPER}/published/tables/{{item}}.tex",
        log:
            f"logs/{SCALE}/paper/{{item}}_reference.log",
        wildcard_constraints:
            item=RENDERED_TABLES,
        localrule: True
        conda:
            ENV
        shell:
            "webssl-repro render {wildcards.item:q} --scale published --source published "
            "--outputs {output:q} --inputs {input:q} > {log:q} 2>&1"

    rule render_reference_figure:
        """The paper's own version of a figure, beside this scale's in the report."""
        input:
            lambda w: PLAN.published_inputs(w.item),
        output:
            pdf=f"{PAPER}/published/figures/{{item}}.pdf",
            png=report(
                f"{PAPER}/published/figures/{{item}}.png",
                caption="../report/reference.rst",
                category="Published (paper)",
                subcategory="{item}",
            ),
        log:
            f"logs/{SCALE}/paper/{{item}}_reference.log",
        wildcard_constraints:
            item=RENDERED_FIGURES,
        localrule: True
        conda:
            ENV
        params:
            lms=lambda w: PLAN.render_language_models(w.item),
        shell:
            "webssl-repro render {wildcards.item:q} --scale published --source published "
            "--language-models {params.lms:q} --outputs {output:q} --inputs {input:q} > {log:q} 2>&1"

    rule overlay_figure:
        """This scale's line figure over the paper's, on twin axes (the report)."""
        input:
            runs=lambda w: PLAN.item_inputs(w.item),
            published=lambda w: PLAN.published_inputs(w.item),
        output:
            report(
                f"{PAPER}/figures/{{item}}_vs_published.png",
                caption="../report/overlay.rst",
                category="Figures vs paper",
                subcategory="{item}",
            ),
        log:
            f"logs/{SCALE}/paper/{{item}}_overlay.log",
        wildcard_constraints:
            item=RENDERED_FIGURES,
        localrule: True
        conda:
            ENV
        params:
            scale=lambda w: SCALE,
            published=lambda w, input: os.path.dirname(input.published[0]),
        shell:
            "webssl-repro overlay {wildcards.item:q} --scale {params.scale:q} --published-dir {params.published:q} "
            "--inputs {input.runs:q} --out {output:q} > {log:q} 2>&1"


rule check:
    """The paper's claims judged on this scale's numbers, and reproduced vs published per metric."""
    input:
        results=PLAN.check_inputs(),
        published=PLAN.published_tsvs(),
    output:
        claims=report(
            f"{PAPER}/check/claims.tsv",
            caption="../report/claims.rst",
            category="Check",
        ),
        md=f"{PAPER}/check/claims.md",
        comparison=report(
            f"{PAPER}/check/comparison.tsv",
            caption="../report/comparison.rst",
            category="Check",
        ),
    log:
        f"logs/{SCALE}/paper/check.log",
    localrule: True
    conda:
        ENV
    params:
        config=lambda w: CONFIG_JSON,  # a function: the config holds braces (shard patterns)
        published=lambda w, input: os.path.dirname(input.published[0]),
        outdir=lambda w, output: os.path.dirname(output.claims),
    shell:
        "webssl-repro check --config-json {params.config:q} --published-dir {params.published:q} "
        "--outdir {params.outdir:q} --inputs {input.results:q} > {log:q} 2>&1"


rule report:
    """paper/{scale}/report.md: every table and figure beside the paper's, and the claims' verdicts."""
    input:
        PLAN.report_inputs(),
    output:
        report(
            PLAN.report_output(),
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        f"logs/{SCALE}/paper/report.log",
    localrule: True
    conda:
        ENV
    params:
        config=lambda w: CONFIG_JSON,  # a function: the config holds braces (shard patterns)
    shell:
        "webssl-repro report --config-json {params.config:q} --out {output:q} > {log:q} 2>&1"


# One target per paper item (`snakemake table6`, `snakemake fig3`), for the items
# this scale can build.
for _item in PLAN.items:

    rule:
        name:
            _item
        input:
            PLAN.item_outputs(_item),
        localrule: True
        message:
            PLAN.target_message(_item)

    workflow.get_rule(_item).docstring = f"Target: {ITEMS[_item].title}"


# Figure 8 shows samples of a scale's own filtered corpus, drawn by the data stage (fig8_samples).
# The published scale has no data stage: asked for by its path, fig8 says why it is not built.
if PLAN.published:

    rule fig8_not_built:
        """Refuses fig8 by its path at the published scale, with the reason."""
        input:
            lambda w: PLAN.not_built("fig8"),
        output:
            f"{PAPER}/figures/fig8.pdf",
        log:
            f"logs/{SCALE}/paper/fig8.log",
        localrule: True
        conda:
            ENV
        shell:
            "exit 1"


# A path of another scale's tree (`paper/published/…` without its config): which config
# builds it, not "No rule to produce". results/published holds the transcribed numbers
# every scale reads, never a target.
for _tree, _also in (("paper", ()), ("results", ("published",))):

    rule:
        name:
            f"other_scale_{_tree}"
        input:
            lambda w, tree=_tree: PLAN.other_scale(f"{tree}/{w.scale}/{w.path}"),
        output:
            f"{_tree}/{{scale}}/{{path}}",
        log:
            f"logs/{SCALE}/other_scale/{_tree}/{{scale}}/{{path}}.log",
        wildcard_constraints:
            scale=PLAN.other_scale_pattern(*_also),
            path=".+",
        localrule: True
        conda:
            ENV
        shell:
            "exit 1"

    workflow.get_rule(f"other_scale_{_tree}").docstring = (
        f"Refuses a target under another scale's {_tree}/ tree, naming its config."
    )


rule fig8:
    """Target: Figure 8 (samples of this scale's filtered corpus)."""
    input:
        lambda w: PLAN.data_figures() or PLAN.not_built("fig8"),
    localrule: True


# The other items (e.g. Table 14's off-the-shelf models at a run scale) are targets too,
# which stop the dry run with the reason instead of "No rule to produce".
for _item in sorted(set(ITEMS) - set(PLAN.items) - {"fig8"}):

    rule:
        name:
            _item
        input:
            lambda w, item=_item: PLAN.not_built(item),
        localrule: True

    workflow.get_rule(_item).docstring = f"Not built at this scale: {ITEMS[_item].title}"
