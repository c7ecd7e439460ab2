# Frozen-encoder evaluations per run -> results/{scale}/evals/{run}/{vqa,classic,alignment}.json,
# and the VQA probe's controls (evaluate.vqa.controls) -> results/{scale}/controls/{pixels,blind}/vqa.json;
# the VQA probe is trained by its own job (-> .../vqa_probe/, evaluate/vqa/trained.py), so that changing
# only how it answers (evaluate.vqa max_new_tokens, eval_batch_size, data.benchmarks) trains nothing again;
# where the classic probes run, their tasks' best answers without the image -> results/{scale}/controls/no_image/classic.json;
# each alignment language model's features of the captions, once per scale -> results/{scale}/language_features/{lm}.pt
# (on the GPUs that LM needs, resources.lm_gpus), which every run's alignment job (one GPU) reads.
# vqa(_probe) and the controls' run under torchrun over the eval GPUs when evaluate.vqa.strategy is ddp/fsdp2 (PLAN.eval_launcher;
# a resource, so that changing resources.eval_gpus reruns nothing).
# vqa_probe, vqa and classic keep their progress in results/{scale}/eval_state/ (evaluate/progress.py; not an
# output, so a failed or stopped attempt keeps it): a job stopped before its time limit exits and
# its retry resumes. Its attempts.jsonl there refuses a retry after two attempts that failed
# without saving anything (train/attempts.py, as for pretraining); such a retry is submitted with
# a few minutes of one core (`_eval_res`), not the job's GPUs. Their programs are `exec`ed, as the
# trainer is (rules/pretrain.smk): a preempted job's shell would otherwise die before the save.


rule vqa_probe:
    """The VQA probe of one run's encoder trained: stage 1 (projector), stage 2 (projector + LM)."""
    input:
        encoder=lambda w: PLAN.evaluated_encoder(w.run),
        data=PLAN.vqa_data(),
    output:
        directory(PLAN.vqa_probe_path("{run}")),
    log:
        f"logs/{SCALE}/evaluate/{{run}}_vqa_probe.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/{{run}}_vqa_probe.tsv"
    retries: PLAN.eval_retries(remote=workflow.remote_exec)
    conda:
        ENV
    threads: PLAN.eval_threads()
    resources:
        **_eval_res("vqa_probe", lambda w: PLAN.vqa_probe_path(w.run)),
        settings=SETTINGS["vqa"],
        attempt=lambda w, attempt: attempt,
        launcher=lambda w, attempt: PLAN.eval_job_launcher(PLAN.vqa_probe_path(w.run), attempt, "vqa_probe"),
    params:
        evaluate=lambda w: PLAN.eval_config_json("vqa_probe"),
    shell:
        "exec {resources.launcher} evaluate vqa_probe --run-name {wildcards.run:q} --encoder {input.encoder:q} "
        "--eval-json {params.evaluate:q} --settings-json {resources.settings:q} --data {input.data:q} --out {output:q} "
        "--attempt {resources.attempt} > {log:q} 2>&1"


rule vqa:
    """The 16 VQA benchmarks answered by one run's trained probe, scored, averaged by category."""
    input:
        encoder=lambda w: PLAN.evaluated_encoder(w.run),
        probe=PLAN.vqa_probe_path("{run}"),
        data=PLAN.vqa_data(),
    output:
        PLAN.eval_path("{run}", "vqa"),
    log:
        f"logs/{SCALE}/evaluate/{{run}}_vqa.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/{{run}}_vqa.tsv"
    retries: PLAN.eval_retries(remote=workflow.remote_exec)
    conda:
        ENV
    threads: PLAN.eval_threads()
    resources:
        **_eval_res("vqa", lambda w: PLAN.eval_path(w.run, "vqa")),
        settings=SETTINGS["vqa"],
        attempt=lambda w, attempt: attempt,
        launcher=lambda w, attempt: PLAN.eval_job_launcher(PLAN.eval_path(w.run, "vqa"), attempt),
    params:
        evaluate=lambda w: PLAN.eval_config_json("vqa"),
    shell:
        "exec {resources.launcher} evaluate vqa --run-name {wildcards.run:q} --encoder {input.encoder:q} "
        "--probe {input.probe:q} "
        "--eval-json {params.evaluate:q} --settings-json {resources.settings:q} --data {input.data:q} --out {output:q} "
        "--attempt {resources.attempt} > {log:q} 2>&1"


rule vqa_control_probe:
    """The VQA probe trained on a control encoder (raw-pixel or zero tokens)."""
    input:
        data=PLAN.vqa_data(),
    output:
        directory(PLAN.control_probe_path("{control}")),
    log:
        f"logs/{SCALE}/evaluate/control_{{control}}_vqa_probe.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/control_{{control}}_vqa_probe.tsv"
    wildcard_constraints:
        control=PLAN.control_pattern(),
    retries: PLAN.eval_retries(remote=workflow.remote_exec)
    conda:
        ENV
    threads: PLAN.eval_threads()
    resources:
        **_eval_res("vqa_probe", lambda w: PLAN.control_probe_path(w.control)),
        settings=SETTINGS["vqa"],
        attempt=lambda w, attempt: attempt,
        launcher=lambda w, attempt: PLAN.eval_job_launcher(PLAN.control_probe_path(w.control), attempt, "vqa_probe"),
    params:
        evaluate=lambda w: PLAN.eval_config_json("vqa_probe"),
        encoder=PLAN.control_args(),
    shell:
        "exec {resources.launcher} evaluate vqa_probe --run-name control-{wildcards.control:q} "
        "--control {wildcards.control:q} {params.encoder} "
        "--eval-json {params.evaluate:q} --settings-json {resources.settings:q} --data {input.data:q} --out {output:q} "
        "--attempt {resources.attempt} > {log:q} 2>&1"


rule vqa_control:
    """The VQA probe on a control encoder answers the benchmarks: does the probe read images?"""
    input:
        probe=PLAN.control_probe_path("{control}"),
        data=PLAN.vqa_data(),
    output:
        PLAN.control_path("{control}"),
    log:
        f"logs/{SCALE}/evaluate/control_{{control}}_vqa.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/control_{{control}}_vqa.tsv"
    wildcard_constraints:
        control=PLAN.control_pattern(),
    retries: PLAN.eval_retries(remote=workflow.remote_exec)
    conda:
        ENV
    threads: PLAN.eval_threads()
    resources:
        **_eval_res("vqa", lambda w: PLAN.control_path(w.control)),
        settings=SETTINGS["vqa"],
        attempt=lambda w, attempt: attempt,
        launcher=lambda w, attempt: PLAN.eval_job_launcher(PLAN.control_path(w.control), attempt),
    params:
        evaluate=lambda w: PLAN.eval_config_json("vqa"),
        encoder=PLAN.control_args(),
    shell:
        "exec {resources.launcher} evaluate vqa --run-name control-{wildcards.control:q} "
        "--control {wildcards.control:q} {params.encoder} "
        "--probe {input.probe:q} --eval-json {params.evaluate:q} --settings-json {resources.settings:q} --data {input.data:q} "
        "--out {output:q} --attempt {resources.attempt} > {log:q} 2>&1"


rule classic:
    """Classic vision of one run's encoder: IN-1k linear, ADE20K linear / +ms, NYUd lin.1 / lin.4."""
    input:
        encoder=lambda w: PLAN.evaluated_encoder(w.run),
        data=[PLAN.evalset(t) for t in CLASSIC_SETS],
    output:
        PLAN.eval_path("{run}", "classic"),
    log:
        f"logs/{SCALE}/evaluate/{{run}}_classic.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/{{run}}_classic.tsv"
    retries: PLAN.eval_retries(remote=workflow.remote_exec)
    conda:
        ENV
    threads: PLAN.eval_threads("classic")
    resources:
        **_eval_res("classic", lambda w: PLAN.eval_path(w.run, "classic")),
        settings=SETTINGS["classic"],
        attempt=lambda w, attempt: attempt,
    params:
        evaluate=lambda w: PLAN.eval_config_json("classic"),
    shell:
        "exec webssl-repro evaluate classic --run {wildcards.run:q} --encoder {input.encoder:q} "
        "--eval-json {params.evaluate:q} --settings-json {resources.settings:q} --data {input.data:q} --out {output:q} --attempt {resources.attempt} > {log:q} 2>&1"


rule classic_no_image:
    """The best answer to each classic task that ignores the image: the bar a classic number must clear."""
    input:
        data=[PLAN.evalset(t) for t in CLASSIC_SETS],
    output:
        PLAN.no_image_answers(),
    log:
        f"logs/{SCALE}/evaluate/control_no_image_classic.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/control_no_image_classic.tsv"
    conda:
        ENV
    resources:
        # CPU only; at paper scale it reads ADE20K's and NYUd's training maps and ImageNet's val
        runtime=PLAN.eval_runtime(),
    params:
        evaluate=lambda w: PLAN.eval_config_json("classic"),
    shell:
        "webssl-repro classic-no-image --eval-json {params.evaluate:q} --data {input.data:q} --out {output:q} > {log:q} 2>&1"


rule language_features:
    """One language model's features of the alignment captions, computed once for every run's alignment job."""
    input:
        captions=PLAN.evalset("captions"),
        weights=lambda w: PLAN.language_weights(w.lm),
    output:
        PLAN.language_features_path("{lm}"),
    log:
        f"logs/{SCALE}/evaluate/language_features_{{lm}}.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/language_features_{{lm}}.tsv"
    wildcard_constraints:
        lm=PLAN.language_model_pattern(),
    conda:
        ENV
    threads: lambda w: PLAN.language_features_resources(w.lm).get("cpus_per_task", 1)
    resources:
        **_lm_res(),
        settings=SETTINGS["alignment"],
    params:
        evaluate=lambda w: PLAN.language_features_json(w.lm),
    shell:
        "webssl-repro language-features --language-model {wildcards.lm:q} --eval-json {params.evaluate:q} "
        "--settings-json {resources.settings:q} --data {input.captions:q} --out {output:q} > {log:q} 2>&1"


rule alignment:
    """Mutual-kNN alignment of one run's encoder with each language model (Fig. 9)."""
    input:
        encoder=lambda w: PLAN.evaluated_encoder(w.run),
        captions=PLAN.evalset("captions"),
        language=PLAN.language_features_paths(),
    output:
        PLAN.eval_path("{run}", "alignment"),
    log:
        f"logs/{SCALE}/evaluate/{{run}}_alignment.log",
    benchmark:
        f"logs/{SCALE}/benchmark/evaluate/{{run}}_alignment.tsv"
    conda:
        ENV
    threads: PLAN.eval_threads("alignment")
    resources:
        **PLAN.eval_resources("alignment"),
        settings=SETTINGS["alignment"],
    params:
        evaluate=lambda w: PLAN.eval_config_json("alignment"),
    shell:
        "webssl-repro evaluate alignment --run {wildcards.run:q} --encoder {input.encoder:q} "
        "--eval-json {params.evaluate:q} --settings-json {resources.settings:q} --data {input.captions:q} "
        "--language-features {input.language:q} --out {output:q} > {log:q} 2>&1"
