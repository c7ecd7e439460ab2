# Run grid, paths and resources all come from webssl_repro.workflow.Plan, so the
# logic behind the DAG is plain Python under test (tests/test_workflow.py).
from webssl_repro.workflow import Plan
from webssl_repro.paper import specs
from webssl_repro.runs import Run

PLAN = Plan(config)
SCALE = PLAN.scale
RESULTS = PLAN.results
PAPER = PLAN.paper_dir
ENV = "../environment.yml"


wildcard_constraints:
    run="[a-z0-9]+-[a-z0-9]+-[0-9]+",
    item="(table|fig)[0-9]+",


# Input and resource functions of rules/pretrain.smk
def _pretrain_inputs(wildcards):
    run = Run.parse(wildcards.run)
    inputs = {"data": PLAN.pretrain_data(run)}
    if run.parent is not None:  # hi-res fine-tune starts from the 224 px run (paper App. C)
        inputs["parent"] = f"{PLAN.run_dir(str(run.parent))}/state.pt"
    return inputs


def _res(key, default=None):
    return lambda wildcards: PLAN.pretrain_resources(wildcards.run).snakemake().get(key, default)
