# Data: the pretraining corpus as webdataset shards (mini-web generated here, or the
# user's MC-2B-style shards at paper scale), light/heavy text filters, in1k analogue,
# and the held-out evaluation sets.


rule shards:
    """The pretraining corpus as webdataset shards: the mini-web generated, or the user's shards listed."""
    output:
        PLAN.data_manifest("shards"),
    log:
        f"logs/{SCALE}/data/shards.log",
    benchmark:
        f"logs/{SCALE}/benchmark/data/shards.tsv"
    localrule: PLAN.lists_only("shards")
    conda:
        ENV
    threads: 2
    params:
        data=lambda w: PLAN.data_config_json("corpus"),
    shell:
        "webssl-repro data shards --data-json {params.data:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule in1k_data:
    """The ImageNet-1k corpus of the in1k runs (mini: a curated class-balanced analogue)."""
    output:
        PLAN.data_manifest("in1k"),
    log:
        f"logs/{SCALE}/data/in1k.log",
    benchmark:
        f"logs/{SCALE}/benchmark/data/in1k.tsv"
    localrule: PLAN.lists_only("in1k")
    conda:
        ENV
    params:
        data=lambda w: PLAN.data_config_json("in1k"),
    shell:
        "webssl-repro data in1k --data-json {params.data:q} --out {output:q} > {log:q} 2>&1"


# One job over the corpus, or with data.filter.parts > 1 (MC-2B's 2B images), one job per
# part (every parts-th shard) and a merge.
rule text_filter:
    """A light / heavy text filter over the corpus, or the merge of its parts; kept samples as shards."""
    input:
        unpack(lambda w: PLAN.filter_inputs(w.variant)),
    output:
        PLAN.filter_stats("{variant}"),
    log:
        f"logs/{SCALE}/data/filter_{{variant}}.log",
    benchmark:
        f"logs/{SCALE}/benchmark/data/filter_{{variant}}.tsv"
    wildcard_constraints:
        variant="light|heavy",
    localrule: PLAN.lists_only("text_filter")
    conda:
        ENV
    resources:
        **PLAN.filter_resources(whole=True),
        settings=PLAN.filter_settings(whole=True),
    params:
        command=lambda w: PLAN.filter_command(w.variant),
    shell:
        "{params.command} {resources.settings} --out {output:q} > {log:q} 2>&1"


rule text_filter_part:
    """One part (every N-th shard) of a text filter, a GPU job at paper scale."""
    input:
        shards=PLAN.data_manifest("shards"),
        after=lambda w: PLAN.filter_prerequisites(w.variant, int(w.part)),
    output:
        PLAN.filter_part("{variant}", "{part}"),
    log:
        f"logs/{SCALE}/data/filter_{{variant}}.{{part}}.log",
    benchmark:
        f"logs/{SCALE}/benchmark/data/filter_{{variant}}.{{part}}.tsv"
    wildcard_constraints:
        variant="light|heavy",
        part=r"\d+",
    conda:
        ENV
    resources:
        **PLAN.filter_resources(),
        settings=PLAN.filter_settings(),
    params:
        command=lambda w: PLAN.filter_command(w.variant, int(w.part)),
    shell:
        "{params.command} {resources.settings} --out {output:q} > {log:q} 2>&1"


rule evalset:
    """A held-out evaluation set: generated (mini) or the real one's manifest (ImageNet, ADE20K, NYUd, WIT)."""
    output:
        PLAN.evalset("{task}"),
    log:
        f"logs/{SCALE}/data/evalset_{{task}}.log",
    benchmark:
        f"logs/{SCALE}/benchmark/data/evalset_{{task}}.tsv"
    wildcard_constraints:
        task="|".join(EVAL_SETS),
    localrule: PLAN.lists_only("evalset")
    conda:
        ENV
    params:
        data=lambda w: PLAN.data_config_json("evalsets", w.task),
    shell:
        "webssl-repro data evalset {wildcards.task:q} --data-json {params.data:q} --out {output:q} > {log:q} 2>&1"


rule data:
    """Target: the whole data stage."""
    input:
        PLAN.data_targets(),
    localrule: True


# Figure 8: raw / light / heavy samples of the filtered corpus (from the data stage).
rule fig8_samples:
    """Figure 8: raw, light and heavy samples of this scale's filtered corpus."""
    input:
        unpack(lambda w: PLAN.fig8_inputs()),
    output:
        pdf=f"{PAPER}/figures/fig8.pdf",
        png=f"{PAPER}/figures/fig8.png",
    log:
        f"logs/{SCALE}/data/fig8.log",
    benchmark:
        f"logs/{SCALE}/benchmark/data/fig8.tsv"
    localrule: True  # a few dozen images drawn and plotted
    conda:
        ENV
    params:
        prefix=lambda w, output: output.pdf[: -len(".pdf")],
    shell:
        "webssl-repro data fig8 --shards {input.shards:q} --light {input.light:q} --heavy {input.heavy:q} "
        "--out {params.prefix:q} > {log:q} 2>&1"
