# Tables and figures of the paper, from declared inputs only: the eval results of
# the item's runs (or the published TSVs at the published scale).


rule render_table:
    wildcard_constraints:
        item="table[0-9]+",
    input:
        lambda w: PLAN.item_inputs(w.item),
    output:
        tsv=f"{PAPER}/tables/{{item}}.tsv",
        md=f"{PAPER}/tables/{{item}}.md",
        tex=f"{PAPER}/tables/{{item}}.tex",
    params:
        source=config["source"],
        scale=lambda w: SCALE,
    log:
        f"logs/{SCALE}/paper/{{item}}.log",
    conda:
        ENV
    shell:
        "webssl-repro render {wildcards.item} --scale {params.scale} --source {params.source} "
        "--outputs {output} --inputs {input} > {log} 2>&1"


rule render_figure:
    wildcard_constraints:
        item="fig[0-9]+",
    input:
        lambda w: PLAN.item_inputs(w.item),
    output:
        pdf=f"{PAPER}/figures/{{item}}.pdf",
        png=f"{PAPER}/figures/{{item}}.png",
    params:
        source=config["source"],
        scale=lambda w: SCALE,
        lms=PLAN.language_models(),
    log:
        f"logs/{SCALE}/paper/{{item}}.log",
    conda:
        ENV
    shell:
        "webssl-repro render {wildcards.item} --scale {params.scale} --source {params.source} "
        "--language-models {params.lms} --outputs {output} --inputs {input} > {log} 2>&1"


# One target per paper item (`snakemake table6`, `snakemake fig3`), for the items
# this scale can build.
for _item in PLAN.items:

    rule:
        name:
            _item
        localrule: True
        input:
            PLAN.item_outputs(_item),
