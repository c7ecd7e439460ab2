# webssl-repro: data -> pretraining -> evaluation -> every table and figure of
# "Scaling Language-Free Visual Representation Learning" (Fan, Tong et al., ICCV 2025).
#   snakemake --cores 2 all                                    # mini scale (default)
#   snakemake --cores 1 all --configfile config/published.yaml # the paper's own numbers
#   snakemake --profile slurm all --configfile config/paper.yaml
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.27")  # as pyproject.toml: profile.yaml profiles (slurm/), tested on 9.27+

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from webssl_repro.config import config_origin, stop_on_config_error, validate_config

# config/mini.yaml is the default; a --configfile replaces it rather than being merged
# into it, so no mini-scale key can leak into another scale.
if not workflow.overwrite_configfiles:

    configfile: "config/mini.yaml"


# One line per bad key, naming it and the known ones (snakemake's own message dumps the whole
# config); then snakemake's validate, which also fills the schema's defaults.
with stop_on_config_error():
    validate_config(config, config_origin(workflow.overwrite_configfiles, workflow.config_settings.config))
validate(config, "config/schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"


# The published scale renders the paper's own numbers: it has no data, runs or evaluations
# (and no rule that would write them into results/published/, which is checked in).
if not PLAN.published:

    include: "rules/data.smk"
    include: "rules/pretrain.smk"
    include: "rules/evaluate.smk"


include: "rules/paper.smk"


rule all:
    """Every table and figure this scale builds, the claim check and the report."""
    default_target: True
    input:
        PLAN.all_targets(),
        rules.check.output,
        rules.report.output,
    message:
        PLAN.target_message()
