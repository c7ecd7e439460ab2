# Run grid, paths and resources all come from webssl_repro.workflow.Plan, so the
# logic behind the DAG is plain Python under test (tests/test_workflow.py).
import shlex

from webssl_repro.config import stop_on_config_error
from webssl_repro.workflow import Plan, mark_invocation, put_cli_on_path
from webssl_repro.workflow_data import CLASSIC_SETS, EVAL_SETS
from webssl_repro.plan_checks import check_deployment, check_profile_environment
from webssl_repro.paper import specs
from webssl_repro.runs import Run

put_cli_on_path()  # rules call `webssl-repro`: this Snakemake's own, activated venv or not
# The submitting invocation checks slurm/'s $SLURM_ACCOUNT; a job's own parse (remote) does not:
# the jobstep plugin strips SLURM_* from its environment, and its resources are already granted.
if not workflow.remote_exec:
    with stop_on_config_error():
        check_profile_environment(getattr(workflow.resource_settings.default_resources, "args", None))
        check_deployment(workflow.deployment_settings.deployment_method)
mark_invocation(workflow.remote_exec)  # so that a retry knows this invocation's attempts

with stop_on_config_error():
    PLAN = Plan(config)
    PLAN.check_run_labels()
SCALE = PLAN.scale
RESULTS = PLAN.results
PAPER = PLAN.paper_dir
ENV = "../environment.yml"
# How each kind of job runs (log cadence, workers, local data paths): a string resource the
# shell passes as --settings-json, not a param, so that changing it reruns nothing
# (webssl_repro.settings). Executors ignore resources they do not know.
SETTINGS = {kind: PLAN.settings_json(kind) for kind in ("vqa", "classic", "alignment")}


wildcard_constraints:
    run=r"[a-z0-9]+-[a-z0-9]+-[0-9]+(\.s[0-9]+)?",
    item="(table|fig)[0-9]+",


# Input and resource functions of rules/pretrain.smk
def _pretrain_inputs(wildcards):
    return PLAN.pretrain_inputs(wildcards.run)


# Per attempt: a retry that its guard will refuse is submitted small (Plan.pretrain_job_resources).
def _res(key, default=None):
    return lambda wildcards, attempt: PLAN.pretrain_job_resources(wildcards.run, attempt).get(key, default)


# The same for the vqa / classic rules, whose ledger is in their output's state directory
# (Plan.eval_job_resources); `out(wildcards)` is the rule's output.
def _eval_res(kind, out):
    def one(key):
        return lambda wildcards, attempt: PLAN.eval_job_resources(kind, out(wildcards), attempt)[key]

    return {key: one(key) for key in [*PLAN.eval_resources(kind), "sized_for_refusal"]}


# The language_features rule's resources, per language model (Plan.language_features_resources).
def _lm_res():
    def one(key):
        return lambda wildcards: PLAN.language_features_resources(wildcards.lm)[key]

    return {key: one(key) for key in PLAN.language_features_resources("")}
