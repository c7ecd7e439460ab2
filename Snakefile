# webssl-repro: data -> pretraining -> evaluation -> every table and figure of
# "Scaling Language-Free Visual Representation Learning" (Fan, Tong et al., ICCV 2025).
#   snakemake --cores 2 all                                    # mini scale (default)
#   snakemake --cores 1 all --configfile config/published.yaml # the paper's own numbers
#   snakemake --profile slurm all --configfile config/paper.yaml
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))


# config/mini.yaml is the default; a --configfile replaces it rather than being merged
# into it, so no mini-scale key can leak into another scale.
if not workflow.overwrite_configfiles:

    configfile: "config/mini.yaml"



validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/evaluate.smk"
include: "rules/paper.smk"


rule all:
    default_target: True
    message:
        PLAN.target_message()
    input:
        PLAN.all_targets(),
        rules.check.output,
        rules.report.output,
