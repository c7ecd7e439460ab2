# One job per run: checkpoint + training log + provenance under results/{scale}/runs/{run}/.
# Single-node runs take `gpu=N` and torchrun --standalone; multi-node runs go through
# srun, one torchrun per node (design.md §7). Resources grow with the model (config).


_PRETRAIN_OUTPUT = {
    "encoder": f"{RESULTS}/runs/{{run}}/encoder.safetensors",
    "log": f"{RESULTS}/runs/{{run}}/train_log.jsonl",
    "provenance": f"{RESULTS}/runs/{{run}}/provenance.json",
    "state": f"{RESULTS}/runs/{{run}}/state.pt",
}
# The checkpoints outlive the job (a retry resumes them): set aside first any that another
# config or other inputs made, so that a rerun retrains (train/fingerprint.py), and refuse a
# retry after attempts that failed without progress (train/attempts.py); such a retry is
# submitted with a few minutes of one core (`_res`), not the run's nodes. The launcher (srun /
# torchrun with the run's node and GPU counts) is a resource, not a param: a run resized in the
# config is not out of date (it resumes on any number of GPUs; a streamed corpus, on its
# own number, train/run.py). Snakemake deletes
# a job's log before each attempt; the attempts' history stays in the checkpoints'
# attempts.jsonl. The trainer is `exec`ed: SLURM's preemption SIGTERM reaches every process of
# the job step, which in a one-node job holds this shell; waiting on the trainer, it would die of
# it at once and end the job (and the trainer's checkpoint); Snakemake in the job waits for its job.
_PRETRAIN_SHELL = (
    "webssl-repro guard-checkpoints --config-json {params.config:q} --checkpoints {params.checkpoints:q} "
    "--data {input.data:q} {params.parent} --attempt {resources.attempt} > {log:q} 2>&1 && "
    "exec {resources.launcher} pretrain --run-name {wildcards.run:q} --config-json {params.config:q} "
    "--settings-json {resources.settings:q} --out {params.out:q} --checkpoints {params.checkpoints:q} "
    "--data {input.data:q} {params.parent} >> {log:q} 2>&1"
)


rule pretrain_single:
    """Pretrain one run (Web-DINO, Web-MAE or CLIP) on one node, resuming its checkpoint."""
    input:
        unpack(_pretrain_inputs),
    output:
        **_PRETRAIN_OUTPUT,
    log:
        f"logs/{SCALE}/pretrain/{{run}}.log",
    benchmark:
        f"logs/{SCALE}/benchmark/pretrain/{{run}}.tsv"
    wildcard_constraints:
        run=PLAN.run_pattern(multinode=False),
    retries: PLAN.pretrain_retries(remote=workflow.remote_exec)
    conda:
        ENV
    threads: lambda w: PLAN.pretrain_resources(w.run).cpus_per_task
    resources:
        runtime=_res("runtime"),
        mem_mb=_res("mem_mb"),
        cpus_per_task=_res("cpus_per_task"),
        gpu=_res("gpu", 0),
        nodes=_res("nodes", 1),
        gpu_hours=lambda w: round(PLAN.pretrain_resources(w.run).gpu_hours),
        settings=lambda w: PLAN.pretrain_settings_json(w.run),
        launcher=lambda w: PLAN.launcher(w.run),
        attempt=lambda w, attempt: attempt,
        sized_for_refusal=_res("sized_for_refusal"),
    params:
        config=lambda w: PLAN.run_config_json(w.run),
        checkpoints=lambda w: PLAN.checkpoint_dir(w.run),
        out=lambda w: PLAN.run_dir(w.run),
        parent=lambda w, input: f"--parent {shlex.quote(input.parent)}" if "parent" in input.keys() else "",
    shell:
        _PRETRAIN_SHELL


# The same job spanning nodes: srun's layout (nodes, one task per node, gres) instead of `gpu`.
use rule pretrain_single as pretrain_multinode with:
    wildcard_constraints:
        run=PLAN.run_pattern(multinode=True),
    resources:
        runtime=_res("runtime"),
        mem_mb=_res("mem_mb"),
        cpus_per_task=_res("cpus_per_task"),
        nodes=_res("nodes"),
        tasks=_res("tasks"),
        tasks_per_gpu=_res("tasks_per_gpu"),
        gres=_res("gres"),
        mpi=_res("mpi"),
        slurm_extra=_res("slurm_extra"),
        gpu_hours=lambda w: round(PLAN.pretrain_resources(w.run).gpu_hours),
        settings=lambda w: PLAN.pretrain_settings_json(w.run),
        launcher=lambda w: PLAN.launcher(w.run),
        attempt=lambda w, attempt: attempt,
        sized_for_refusal=_res("sized_for_refusal"),


workflow.get_rule("pretrain_multinode").docstring = (
    "Pretrain one run (Web-DINO, Web-MAE or CLIP) across nodes (srun, one torchrun per "
    "node), resuming its checkpoint."
)


# A run declared in `pretrain.run_sources` is imported from a released checkpoint
# (HF directory, native .pth, or the hub at paper scale) instead of trained. A cluster job:
# converting a 7B checkpoint needs a node's memory; set `path` to a copy downloaded
# beforehand where compute nodes have no internet.
rule import_released:
    """A released checkpoint imported as a run's encoder, in place of training it."""
    input:
        # none tracked: a local copy that is not there is refused by its config key
        lambda w: PLAN.import_inputs(w.run),
    output:
        encoder=f"{RESULTS}/runs/{{run}}/encoder.safetensors",
        provenance=f"{RESULTS}/runs/{{run}}/provenance.json",
    log:
        f"logs/{SCALE}/pretrain/{{run}}_import.log",
    benchmark:
        f"logs/{SCALE}/benchmark/pretrain/{{run}}_import.tsv"
    wildcard_constraints:
        run=PLAN.imported_pattern(),
    conda:
        ENV
    resources:
        **PLAN.import_resources(),
    params:
        source=lambda w: PLAN.import_command(w.run),
        out=lambda w: PLAN.run_dir(w.run),
    shell:
        "webssl-repro import-released --run {wildcards.run:q} {params.source} --out {params.out:q} > {log:q} 2>&1"


# A misspelt run asked for by its path: the runs there are, not "No rule to produce".
rule unknown_run:
    """Refuses a target under runs/ of a run this config has not, listing its runs."""
    input:
        lambda w: PLAN.unknown_run(f"{RESULTS}/runs/{w.run}/{w.file}"),
    output:
        f"{RESULTS}/runs/{{run}}/{{file}}",
    log:
        f"logs/{SCALE}/pretrain/unknown/{{run}}/{{file}}.log",
    wildcard_constraints:
        run=PLAN.unknown_run_pattern(),
        file=".+",
    localrule: True
    conda:
        ENV
    shell:
        "exit 1"


# `snakemake runs`: every run of the requested items pretrained (or imported), nothing
# evaluated; also where the config's stages stop at pretrain.
rule runs:
    """Target: every run of the grid, trained or imported."""
    input:
        PLAN.run_targets(),
