"""The DAG: run grid, targets, resources, validation, lint and the published render."""
import copy
import json
import re

import pandas as pd
import pytest
import yaml

from conftest import REPO, snakemake
from webssl_repro.config import ConfigError, load_config, validate_config
from webssl_repro.paper import specs
from webssl_repro.workflow import Plan

PAPER_GRID = sorted(
    [f"dino{s}-full2b-224" for s in ("1b", "2b", "3b", "5b", "7b")]
    + [f"dino7b-full{n}-224" for n in ("1b", "4b", "8b")]
    + ["dino7b-full8b-378", "dino7b-full8b-518"]
    + [f"clip{s}-full2b-224" for s in ("1b", "2b", "3b", "5b", "7b")]
    + [f"clip7b-full{n}-224" for n in ("1b", "4b", "8b")]
    + [f"mae{s}-full2b-224" for s in ("1b", "2b", "3b", "5b")]
    + [f"dino{s}-in1k-224" for s in ("1b", "2b", "3b", "5b")]
    + [f"dino{s}-{d}2b-224" for s in ("1b", "2b") for d in ("light", "heavy")]
)
ALL_ITEMS = ["table2", "table3", *(f"table{i}" for i in range(6, 16)), "fig1", "fig3", "fig4", "fig5", "fig6",
             "fig7", "fig9"]


@pytest.fixture(scope="module")
def paper_plan():
    return Plan(load_config(REPO / "config/paper.yaml"))


def test_paper_grid_is_exactly_the_papers_runs(paper_plan):
    assert sorted(paper_plan.runs) == PAPER_GRID
    assert len(PAPER_GRID) == 30


def test_grid_is_derived_from_the_item_specs(paper_plan):
    from_specs = {r for i in paper_plan.items for r in specs.get_item(i).runs}
    assert set(paper_plan.runs) == from_specs


def test_resources_grow_with_model_size_and_samples(paper_plan):
    res = {r: paper_plan.pretrain_resources(r) for r in paper_plan.runs}
    sizes = [res[f"dino{s}-full2b-224"] for s in ("1b", "2b", "3b", "5b", "7b")]
    assert [r.train_flops for r in sizes] == sorted(r.train_flops for r in sizes)
    assert sizes[0].gpus < sizes[-1].gpus
    samples = [res[f"dino7b-full{n}-224"].train_flops for n in ("1b", "2b", "4b", "8b")]
    assert samples == pytest.approx([samples[0] * k for k in (1, 2, 4, 8)])
    # 8 nodes x 8 GPUs for ViT-1B, 32 x 8 for ViT-7B (config/paper.yaml)
    assert (sizes[0].nodes, sizes[0].gpus, sizes[-1].nodes, sizes[-1].gpus) == (8, 64, 32, 256)


def test_multinode_runs_launch_srun_then_torchrun(paper_plan):
    launcher = paper_plan.launcher("dino7b-full2b-224")
    assert launcher.startswith("srun --nodes 32 --ntasks 32 --ntasks-per-node 1 torchrun --nnodes 32 --nproc-per-node 8")
    resources = paper_plan.pretrain_resources("dino7b-full2b-224").snakemake()
    assert resources["mpi"] == "srun" and resources["tasks_per_gpu"] == 0 and resources["gres"] == "gpu:8"


def test_single_node_layout_uses_gpu_and_standalone_torchrun():
    config = load_config(REPO / "config/paper.yaml")
    config["resources"]["nodes"]["1b"] = 1
    plan = Plan(config)
    assert plan.launcher("dino1b-full2b-224").startswith("torchrun --standalone --nnodes 1 --nproc-per-node 8")
    assert plan.pretrain_resources("dino1b-full2b-224").snakemake()["gpu"] == 8
    assert "dino1b-full2b-224" in plan.runs_by_layout(multinode=False)
    assert re.fullmatch(plan.run_pattern(multinode=True), "dino1b-full2b-224") is None


def test_mini_requests_only_built_stages():
    plan = Plan(load_config(REPO / "config/mini.yaml"))
    for item in plan.items:
        needed = {"pretrain"} | {{"filter": "data"}.get(e, e) for e in specs.get_item(item).evals}
        assert needed <= plan.stages, item


def test_published_item_inputs_are_only_the_source_tables():
    plan = Plan(load_config(REPO / "config/published.yaml"))
    assert plan.item_inputs("table6") == ["results/published/vqa.tsv"]
    assert plan.item_inputs("fig7") == ["results/published/classic.tsv", "results/published/table3.tsv"]
    assert plan.items == tuple(ALL_ITEMS)


@pytest.mark.parametrize("key,value,needle", [
    ("scale_typo", "mini", "scale_typo"),
    ("seeds", "zero", "seeds"),
    ("labels.samples.2b", "many", "labels.samples.2b"),
    ("resources.mfu", 3.0, "resources.mfu"),
    ("pretrain.train.checkpoint_evry", 3, "'checkpoint_evry' was unexpected"),
    ("pretrain.dino.batch_sise", 3, "'batch_sise' was unexpected"),
    ("pretrain.clip.context_lenght", 3, "'context_lenght' was unexpected"),
    ("pretrain.in1k", {"dino": {"warmup_step": 3}}, "'warmup_step' was unexpected"),
    ("pretrain.in1k", {"vit": {}}, "'vit' was unexpected"),
    ("data.corpus.n_imgs", 3, "'n_imgs' was unexpected"),
    ("data.filter.backend", "mlm", "'mlm' is not one of"),
])
def test_bad_config_names_the_key(tmp_path, key, value, needle):
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    node = config
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_paper_scale_needs_real_shards():
    """Without ``data.shards`` (or ``data.in1k.shards``) the mini-web generator would stand in
    for MC-2B (ImageNet-1k) under the paper's 7B runs: a misspelt key must stop the dry run."""
    for drop in ("shards", "in1k"):
        config = load_config(REPO / "config/paper.yaml")
        config["data"]["shard" if drop == "shards" else "in1k"] = config["data"].pop(drop)
        if drop == "in1k":
            config["data"]["in1k"] = {"n_images": 1000}
        with pytest.raises(ConfigError, match="'shards' is a required property"):
            validate_config(config, "paper.yaml")


def _json_type(annotation) -> dict:
    """The schema a dataclass field's annotation asks for: int, float, bool, str, a pair of
    floats, or one of them or null."""
    import typing

    base = {int: "integer", float: "number", bool: "boolean", str: "string"}
    if annotation in base:
        return {"type": base[annotation]}
    if typing.get_origin(annotation) is tuple:
        (item, _) = typing.get_args(annotation)
        return {"type": "array", "items": {"type": base[item]}, "minItems": 2, "maxItems": 2}
    (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return {"type": [base[inner], "null"]}


def _typed_like(cls, properties: dict, skip=()) -> None:
    """``properties`` (a schema section) has exactly ``cls``'s fields, each with its type."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    assert set(properties) >= set(names), sorted(set(names) - set(properties))
    for name in names:
        if "enum" in properties[name]:  # a closed set of strings
            assert hints[name] is str and all(isinstance(v, str) for v in properties[name]["enum"]), name
            continue
        declared = {k: v for k, v in properties[name].items() if k in ("type", "items", "minItems", "maxItems")}
        assert declared == _json_type(hints[name]), (cls.__name__, name, declared)


def test_schema_types_the_config_dataclasses():
    """The schema lists each recipe's keys with their types, so the dry run rejects a misspelt
    key or a wrong value; they must stay the fields of the dataclasses that read them (plus
    CLIP's tower/tokenizer keys, and hires' steps)."""
    import dataclasses

    from webssl_repro.evaluate.vqa.probe import StageConfig, VqaConfig
    from webssl_repro.methods.clip import ClipConfig
    from webssl_repro.methods.dino import DinoConfig
    from webssl_repro.methods.mae import MaeConfig
    from webssl_repro.train import TrainConfig

    root = yaml.safe_load((REPO / "config/schema.yaml").read_text())["properties"]
    schema = root["pretrain"]["properties"]
    assert all(schema[name]["additionalProperties"] is False for name in ("train", "dino", "mae", "clip", "hires"))
    allowed = {name: set(schema[name]["properties"]) for name in ("train", "dino", "mae", "clip", "hires")}
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (TrainConfig, DinoConfig, MaeConfig, ClipConfig)}
    assert allowed["train"] == fields[TrainConfig] - {"samples_seen", "global_batch_size"}  # set from the run
    assert allowed["dino"] == fields[DinoConfig] and allowed["hires"] == fields[DinoConfig] | {"steps"}
    assert allowed["mae"] == fields[MaeConfig]
    assert allowed["clip"] == fields[ClipConfig] | {"layerscale", "tokenizer", "vocab_size"}
    _typed_like(TrainConfig, schema["train"]["properties"], skip=("samples_seen", "global_batch_size"))
    for name, cls in (("dino", DinoConfig), ("hires", DinoConfig), ("mae", MaeConfig), ("clip", ClipConfig)):
        _typed_like(cls, schema[name]["properties"])
    in1k = schema["in1k"]  # the ImageNet-1k runs' overrides: each method's own keys, nothing else
    assert in1k["additionalProperties"] is False and set(in1k["properties"]) == {"dino", "mae", "clip"}
    for name, section in in1k["properties"].items():
        assert section["additionalProperties"] is False and section["properties"] == schema[name]["properties"]
    from webssl_repro.methods.dino import CENTERINGS
    from webssl_repro.methods.schedules import LR_SCALINGS
    from webssl_repro.train.config import PRECISIONS, STRATEGIES

    closed = {("train", "precision"): PRECISIONS, ("train", "strategy"): STRATEGIES,
              ("dino", "centering"): CENTERINGS, ("hires", "centering"): CENTERINGS,
              ("dino", "lr_scaling"): LR_SCALINGS, ("hires", "lr_scaling"): LR_SCALINGS}
    for (section, key), values in closed.items():  # a choice the code refuses is refused by the dry run
        assert schema[section]["properties"][key]["enum"] == list(values), (section, key)
    vqa = root["evaluate"]["properties"]["vqa"]["properties"]
    _typed_like(VqaConfig, vqa, skip=("stage1", "stage2"))
    from webssl_repro.evaluate.vqa.probe import PRECISIONS as VQA_PRECISIONS

    assert vqa["precision"]["enum"] == list(VQA_PRECISIONS)
    for stage in ("stage1", "stage2"):
        assert set(vqa[stage]["properties"]) == {f.name for f in dataclasses.fields(StageConfig)}
        _typed_like(StageConfig, vqa[stage]["properties"])


def test_schema_closes_the_data_and_evaluate_sections_on_their_consumers_keys():
    """A misspelt key under data.filter or evaluate.* stops the dry run (it once reached the
    job, or silently changed the plan: `parts` misspelt gave one filter job over MC-2B)."""
    import dataclasses
    import inspect

    from webssl_repro.data.filter_mllm import MLLMFilter
    from webssl_repro.data.filters import OCRFilter
    from webssl_repro.evaluate import alignment_eval, classic
    from webssl_repro.evaluate.vqa.probe import VqaConfig
    from webssl_repro.evaluate.progress import DEFAULTS as PROGRESS
    from webssl_repro.evaluate.vqa.stage import STAGE_KEYS

    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())["properties"]

    def names(section):
        if "propertyNames" in section:
            return set(section["propertyNames"]["enum"])
        assert section["additionalProperties"] is False
        return set(section["properties"])
    ctor = {p for cls in (OCRFilter, MLLMFilter) for p in inspect.signature(cls.__init__).parameters} - {"self", "generate_fn"}
    assert names(schema["data"]["properties"]["filter"]) == ctor | {"backend", "parts"}
    evaluate = schema["evaluate"]["properties"]
    assert names(evaluate["vqa"]) == {f.name for f in dataclasses.fields(VqaConfig)} | set(STAGE_KEYS) | set(PROGRESS)
    assert names(evaluate["classic"]) == set(classic.DEFAULTS) | set(PROGRESS)
    for task in ("linear", "segmentation", "depth"):
        assert names(evaluate["classic"]["properties"][task]) == set(classic.DEFAULTS[task]), task
    assert names(evaluate["alignment"]) == set(alignment_eval.DEFAULTS)


@pytest.mark.parametrize("section, key", [("data.filter", "partz"), ("evaluate.vqa", "stratgy"),
                                          ("evaluate.alignment", "language_model"), ("evaluate.classic.depth", "iter"),
                                          ("evaluate.vqa.stage2", "epoch"), ("data.evalsets", "clasification"),
                                          ("data.evalsets.depth", "trian")])
def test_a_misspelt_section_key_is_refused_by_name(section, key):
    """At any depth: a nested key of a consumer's section is as closed as its top level."""
    cfg = load_config(REPO / "config/mini.yaml")
    *parts, last = section.split(".")
    node = cfg
    for part in parts:
        node = node.setdefault(part, {})
    node = node.setdefault(last, {"train": 8, "val": 4} if section == "data.evalsets.depth" else {})
    node[key] = 1
    with pytest.raises(ConfigError, match=rf"at key '{re.escape(section)}': ('{key}' is not one of|.*'{key}' was "
                                          rf"unexpected|'{key}' does not match|.* is not valid under any)"):
        validate_config(cfg)


@pytest.mark.parametrize("section, key, value", [("pretrain.dino", "batch_size", "thirty-two"),
                                                 ("pretrain.train", "betas", [0.9]),
                                                 ("evaluate.vqa.stage1", "lr", "fast"),
                                                 ("evaluate.classic.segmentation", "img_size", [64, 64, 64]),
                                                 ("evaluate.classic", "precision", "fp8"),
                                                 ("pretrain.train", "precision", "bf61"),
                                                 ("pretrain.dino", "centering", "center"),
                                                 ("evaluate.alignment", "k", 2.5),
                                                 ("evaluate.classic.linear", "batch_size", 0)])
def test_a_wrong_type_or_choice_is_refused_naming_its_key_and_value(section, key, value):
    cfg = load_config(REPO / "config/mini.yaml")
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(ConfigError, match=rf"at key '{re.escape(section)}.{key}': {re.escape(repr(value))} is "):
        validate_config(cfg)


@pytest.mark.parametrize("section, key, value", [("resources", "gpus_per_node", "eight"),
                                                 ("pretrain.dino", "batch_size", "thirty-two")])
def test_snakemake_rejects_a_bad_config_before_any_job(workflow_dir, section, key, value):
    bad = yaml.safe_load((workflow_dir / "config/mini.yaml").read_text())
    node = bad
    for part in section.split("."):
        node = node[part]
    node[key] = value
    (workflow_dir / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "bad.yaml")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert key in out and value in out
    assert not (workflow_dir / "paper").exists()


def test_paper_dry_run_lists_every_run_and_target(workflow_dir):
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "config/paper.yaml")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for run in PAPER_GRID:
        assert f"results/paper/runs/{run}/encoder.safetensors" in out, run
    plan = Plan(load_config(REPO / "config/paper.yaml"))
    for target in plan.all_targets():
        assert target in out, target
    assert re.search(r"pretrain_multinode\s+30\b", out)
    assert "gres=gpu:8" in out and "nodes=32" in out and "gpu_hours=" in out
    total = re.search(r"all: 30 runs, ([\d,]+) estimated pretraining GPU-hours", out)
    assert total and int(total[1].replace(",", "")) == round(plan.gpu_hours())
    assert f"(`{total[0]}`)" in (REPO / "README.md").read_text()  # the README quotes this dry run
    # Every job fits the partition's limit; the longest run is a chain of such jobs.
    limit = plan.config["resources"]["max_runtime_min"]
    runtimes = [int(x) for x in re.findall(r"runtime=(\d+)", out)]
    assert runtimes and max(runtimes) == limit
    per_target = snakemake(workflow_dir, "-n", "table6", "--configfile", "config/paper.yaml")
    assert "table6: 5 runs," in per_target.stdout + per_target.stderr
    assert "vqa_control" not in out  # at paper scale the paper's numbers show the probe reads images


def test_runs_longer_than_the_time_limit_become_chains_of_jobs():
    """dino7b-full8b-224: 69,994 estimated minutes on 32 nodes; at a 2,880-minute limit that
    is 25 jobs, so the pretrain rules retry 24 times plus 2 for preemptions. The GPU-hours
    count the whole run, not one job; without a limit there is one job and no rule retries."""
    config = load_config(REPO / "config/paper.yaml")
    plan = Plan(config)
    res = plan.pretrain_resources("dino7b-full8b-224")
    assert (res.total_min, res.runtime_min, res.jobs) == (69_994, 2_880, 25)
    assert res.gpu_hours == pytest.approx(256 * 69_994 / 60)
    assert plan.pretrain_retries() == 26
    assert plan.pretrain_retries(remote=True) == 0  # inside a cluster job: the submitter retries
    del config["resources"]["max_runtime_min"]
    uncapped = Plan(config)
    assert uncapped.pretrain_resources("dino7b-full8b-224").runtime_min == 69_994
    assert uncapped.pretrain_resources("dino7b-full8b-224").jobs == 1 and uncapped.pretrain_retries() is None
    assert uncapped.gpu_hours() == pytest.approx(plan.gpu_hours())


def test_unbuildable_items_are_named_not_dropped():
    """An item the scale cannot build is listed, with why, in the message of ``all``."""
    config = load_config(REPO / "config/paper.yaml")
    config.update(items=[*config["items"], "table14"], stages=["data", "pretrain", "vqa"])
    plan = Plan(config)
    assert "table14" not in plan.items and "table7" not in plan.items
    assert plan.skipped_items["table14"] == "off-the-shelf models only: see the published scale"
    assert plan.skipped_items["table7"] == "needs stages classic"
    assert "not built at this scale: " in plan.target_message() and "table14 (off-the-shelf" in plan.target_message()
    assert Plan(load_config(REPO / "config/paper.yaml")).skipped_items == {}


@pytest.mark.parametrize("configfile", ["config/mini.yaml", "config/published.yaml"])
def test_dry_runs_of_other_scales(workflow_dir, configfile):
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", configfile)
    assert proc.returncode == 0, proc.stderr
    controls = re.search(r"vqa_control\s+(\d+)", proc.stdout)
    assert (int(controls[1]) if controls else 0) == (2 if "mini" in configfile else 0), proc.stdout[-3000:]
    if "mini" in configfile:  # a control's command line parses, with the scale's size and patch
        from webssl_repro.cli import build_parser

        args = build_parser().parse_args(["evaluate", "vqa", "--run", "control-blind", "--control", "blind",
                                          *Plan(load_config(REPO / configfile)).control_args().split(),
                                          "--out", "x.json"])
        assert (args.control, args.img_size, args.patch, args.encoder) == ("blind", 32, 8, None)


def test_slurm_profile_dry_run_works_verbatim(workflow_dir, monkeypatch):
    """As the README says: export the account and partition the profile reads, then dry-run."""
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    args = ("--profile", "slurm", "-n", "all", "--configfile", "config/paper.yaml")
    proc = snakemake(workflow_dir, *args)
    assert proc.returncode != 0 and "slurm_account reads $SLURM_ACCOUNT" in proc.stdout + proc.stderr
    monkeypatch.setenv("SLURM_ACCOUNT", "myaccount")
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    proc = snakemake(workflow_dir, *args)
    assert proc.returncode == 0, proc.stderr


def test_lint_is_clean(workflow_dir):
    for configfile in ("config/mini.yaml", "config/paper.yaml", "config/published.yaml"):
        proc = snakemake(workflow_dir, "--lint", "--configfile", configfile)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Congratulations" in proc.stdout + proc.stderr


def test_published_all_renders_every_item_with_the_papers_numbers(workflow_dir):
    proc = snakemake(workflow_dir, "--cores", "2", "all", "--configfile", "config/published.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = Plan(load_config(REPO / "config/published.yaml"))
    for target in plan.all_targets():
        assert (workflow_dir / target).stat().st_size > 0, target
    vqa = pd.read_csv(REPO / "results/published/vqa.tsv", sep="\t")
    for table in ("table6", "table8", "table10", "table11", "table12", "table13", "table14", "table15"):
        rendered = pd.read_csv(workflow_dir / f"paper/published/tables/{table}.tsv", sep="\t").set_index("source")
        printed = vqa[vqa["table"] == table].set_index("source")
        assert sorted(rendered.index) == sorted(printed.index)
        for column in ("mme", "docvqa", "cvbench3d", "Average"):
            assert (rendered.loc[printed.index, column] == printed[column]).all(), (table, column)
    table2 = pd.read_csv(workflow_dir / "paper/published/tables/table2.tsv", sep="\t").set_index("source")
    assert table2.loc["dino2b-heavy2b-224", "data_pct"] == 1.3
    assert table2.loc["dino2b-heavy2b-224", "OCR & Chart"] == 40.4
    md = (workflow_dir / "paper/published/tables/table3.md").read_text()
    assert "| Web-DINO ViT-7B 518" in md and "59.9" in md and "0.362" in md
    # A second run schedules nothing.
    again = snakemake(workflow_dir, "-n", "all", "--configfile", "config/published.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_one_figure_rebuilds_alone(workflow_dir):
    proc = snakemake(workflow_dir, "--cores", "1", "paper/published/figures/fig3.pdf",
                     "--configfile", "config/published.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workflow_dir / "paper/published/figures/fig3.pdf").exists()
    assert not (workflow_dir / "paper/published/tables").exists()


def test_seeds_repeat_every_run_and_feed_the_items(workflow_dir):
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    config["seeds"] = [0, 1]
    plan = Plan(config)
    assert len(plan.run_ids) == 2 * len(plan.runs)
    assert "dino1b-full2b-224.s1" in plan.run_ids
    assert plan.run_config("dino1b-full2b-224.s1")["seed"] == 1
    assert plan.run_config("dino1b-full2b-224")["seed"] == 0
    assert "results/mini/evals/dino1b-full2b-224.s1/classic.json" in plan.item_inputs("table7")
    (workflow_dir / "seeds.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "seeds.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "results/mini/runs/dino7b-full8b-224.s1/encoder.safetensors" in proc.stdout
    # the seed-1 hi-res fine-tune starts from the seed-1 224 px run
    assert plan.pretrain_inputs("dino7b-full8b-518.s1")["parent"] == "results/mini/runs/dino7b-full8b-224.s1/state.pt"


def test_released_run_source_replaces_training(workflow_dir):
    config = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    config["pretrain"]["run_sources"] = {
        "dino2b-heavy2b-224": {"checkpoint": "facebook/webssl-dino2b-heavy2b-224", "path": "/ckpt/dino2b-heavy"}}
    (workflow_dir / "released.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_dir, "-n", "-p", "all", "--configfile", "released.yaml")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"import_released\s+1\b", out) and re.search(r"pretrain_multinode\s+29\b", out)
    assert "--checkpoint facebook/webssl-dino2b-heavy2b-224 --path /ckpt/dino2b-heavy" in out
    config["pretrain"]["run_sources"] = {"dino2b-heavy2b-224": {"path": "/x"}}
    (workflow_dir / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "bad.yaml")
    assert proc.returncode != 0 and "checkpoint" in proc.stdout + proc.stderr


def test_put_cli_on_path_prepends_the_interpreters_bin_once(tmp_path):
    """Rules call `webssl-repro`: `.venv/bin/snakemake` without an activated venv must find it."""
    import os

    from webssl_repro.workflow import put_cli_on_path

    env = {"PATH": os.pathsep.join(["/usr/bin", "/bin"])}
    exe = str(tmp_path / "venv" / "bin" / "python")
    assert put_cli_on_path(env, exe).split(os.pathsep) == [str(tmp_path / "venv" / "bin"), "/usr/bin", "/bin"]
    assert put_cli_on_path(env, exe) == env["PATH"]  # idempotent: the Snakefile is parsed once per job
    assert env["PATH"].count(str(tmp_path / "venv" / "bin")) == 1
    assert put_cli_on_path({}, exe) == str(tmp_path / "venv" / "bin")


def test_eval_jobs_take_a_node_share_for_their_gpus():
    """Paper scale: the VQA probe's 8 torchrun ranks each load the 8B LM before FSDP shards it
    and the alignment job spreads the 70B LM over 8 GPUs, so both take a whole node; the
    classic probes run the encoder on one GPU and take an eighth. Mini: no GPU, defaults."""
    paper = Plan(load_config(REPO / "config/paper.yaml"))
    node = paper.config["resources"]["mem_mb_per_node"]
    for kind in ("vqa", "alignment"):
        assert paper.eval_resources(kind) == {"gpu": 8, "nodes": 1, "runtime": 1440, "mem_mb": node, "cpus_per_task": 64}
    assert paper.eval_resources("classic") == {"gpu": 1, "nodes": 1, "runtime": 1440, "mem_mb": node // 8, "cpus_per_task": 8}
    assert paper.eval_threads("classic") == 8
    mini = Plan(load_config(REPO / "config/mini.yaml"))
    assert mini.eval_resources("vqa") == {"gpu": 0, "runtime": 60} and mini.eval_threads() == 1


def test_a_size_missing_from_resources_nodes_is_an_error_not_one_node():
    cfg = load_config(REPO / "config/paper.yaml")
    del cfg["resources"]["nodes"]["7b"]
    with pytest.raises(ConfigError, match=r"resources.nodes has no entry for size .7b."):
        Plan(cfg).pretrain_resources("dino7b-full8b-224")


def test_settings_are_not_params_and_reach_the_job_unchanged():
    """Log cadence, decoding workers, batch chunks and where data sits change how a job runs,
    not its result: they leave the rules' params (Snakemake reruns a job whose params change)
    and travel as --settings-json, which the CLI lays back onto the params."""
    from webssl_repro.settings import merge_nested

    cfg = load_config(REPO / "config/paper.yaml")
    cfg["pretrain"] = {**cfg.get("pretrain", {}), "train": {"log_every": 7, "checkpoint_every": 900, "lr": 1e-4}}
    cfg["evaluate"]["vqa"]["data"]["alignment"]["local_dir"] = "/scratch/cambrian"
    plan = Plan(cfg)
    run = "dino1b-full2b-224"
    what = json.loads(plan.run_config_json(run))
    assert what["train"] == {"lr": 1e-4} and json.loads(plan.settings_json("pretrain")) == {
        "train": {"log_every": 7, "checkpoint_every": 900}}
    assert merge_nested(what, json.loads(plan.settings_json("pretrain"))) == plan.run_config(run)
    vqa = json.loads(plan.eval_config_json("vqa"))
    assert "local_dir" not in vqa["data"]["alignment"] and vqa["data"]["alignment"]["repo"]
    assert json.loads(plan.settings_json("vqa"))["data"]["alignment"]["local_dir"] == "/scratch/cambrian"
    classic = json.loads(plan.eval_config_json("classic"))
    assert "workers" not in classic and classic["precision"] == "bf16"
    assert json.loads(plan.settings_json("classic"))["workers"] == 7
    for kind in ("vqa", "classic", "alignment"):
        full = {"scale": "paper", **{k: v for k, v in cfg["evaluate"][kind].items() if k != "controls"}}
        assert merge_nested(json.loads(plan.eval_config_json(kind)), json.loads(plan.settings_json(kind))) == full


def test_a_hires_run_of_an_imported_parent_is_refused_by_name():
    """The 378/518 px fine-tune continues the 224 px run's DINO training (teacher, heads): an
    imported encoder alone cannot seed it, and the DAG says so instead of a missing state.pt."""
    cfg = load_config(REPO / "config/paper.yaml")
    cfg["pretrain"] = {**cfg.get("pretrain", {}),
                       "run_sources": {"dino7b-full8b-224": {"checkpoint": "facebook/webssl-dino7b-full8b-224"}}}
    with pytest.raises(ConfigError, match=r"run_sources.dino7b-full8b-224: dino7b-full8b-378 fine-tunes it"):
        Plan(cfg).pretrain_inputs("dino7b-full8b-378")


def test_an_item_this_scale_does_not_build_says_why(workflow_dir):
    proc = snakemake(workflow_dir, "-n", "table14", "--configfile", "config/paper.yaml")
    assert proc.returncode != 0
    assert ("table14 is not built at scale paper: not in this config's items. Its published render: "
            "snakemake table14 --configfile config/published.yaml") in proc.stdout + proc.stderr
    # asked for by its path, too (the render rule's input refuses it)
    proc = snakemake(workflow_dir, "-n", "paper/mini/tables/table14.tsv")
    assert proc.returncode != 0 and "table14 is not built at scale mini" in proc.stdout + proc.stderr
    # fig8 samples a scale's own corpus: the published scale has none, by name or by path
    for target in ("fig8", "paper/published/figures/fig8.pdf"):
        proc = snakemake(workflow_dir, "-n", target, "--configfile", "config/published.yaml")
        assert proc.returncode != 0 and "fig8 is not built at scale published" in proc.stdout + proc.stderr, target
        assert "text_filter" not in proc.stdout


def test_in1k_overrides_reach_only_the_imagenet_runs():
    """``pretrain.in1k.{method}`` is laid over the method's recipe for the ImageNet-1k runs: their
    params (so their fingerprint) change, every other run's stay as they were."""
    before = Plan(load_config(REPO / "config/mini.yaml"))
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["pretrain"]["in1k"] = {"dino": {"warmup_steps": 7, "warmup_teacher_temp_steps": 9}}
    after = Plan(cfg)
    recipe = after.run_config("dino1b-in1k-224")["recipe"]
    assert (recipe["warmup_steps"], recipe["warmup_teacher_temp_steps"]) == (7, 9)
    assert recipe["base_lr"] == cfg["pretrain"]["dino"]["base_lr"]  # the rest is the method's recipe
    assert after.run_config_json("dino1b-in1k-224") != before.run_config_json("dino1b-in1k-224")
    for run in after.run_ids:
        if "-in1k-" not in run:
            assert after.run_config_json(run) == before.run_config_json(run), run
    assert after.run_config("dino1b-full2b-224")["recipe"]["warmup_steps"] == 10


def test_paper_in1k_runs_take_dinov2s_warmup_shares(paper_plan):
    """DINOv2 ViT-g's 80 / 30 / 1 of 500 epochs as shares of the 300-epoch ImageNet-1k run
    (125,114 steps at 3072), not MC-2B's 100k-step warm-up (80 % of it)."""
    cfg = paper_plan.run_config("dino1b-in1k-224")
    recipe = cfg["recipe"]
    assert cfg["samples_seen"] == 300 * 1281167 and -(-cfg["samples_seen"] // recipe["batch_size"]) == 125114
    assert (recipe["warmup_steps"], recipe["warmup_teacher_temp_steps"], recipe["freeze_last_layer_steps"]) == (
        20000, 7500, 250)
    assert paper_plan.run_config("dino1b-full2b-224")["recipe"]["warmup_steps"] == 100000
    assert "warmup_teacher_temp_steps" not in paper_plan.run_config("dino1b-full2b-224")["recipe"]


@pytest.mark.parametrize("section,key,value,run,where", [
    ("dino", "warmup_steps", 64, "dino1b-full2b-224", "pretrain.dino.warmup_steps: 64"),
    ("in1k", "warmup_teacher_temp_steps", 100, "dino1b-in1k-224", "pretrain.in1k.dino.warmup_teacher_temp_steps: 100"),
    ("mae", "warmup_iters", 40, "mae1b-full2b-224", "pretrain.mae.warmup_iters: 40"),
    ("train", "warmup_steps", 64, "clip1b-full2b-224", "pretrain.train.warmup_steps: 64"),
])
def test_a_warmup_as_long_as_the_run_is_refused_by_name(section, key, value, run, where):
    """Mini runs of 2048 samples: 64 steps at DINO's batch 32, 32 at MAE's and CLIP's 64."""
    cfg = load_config(REPO / "config/mini.yaml")
    if section == "in1k":  # with a real temperature warm-up (mini's stays flat at 0.04)
        cfg["pretrain"]["in1k"] = {"dino": {key: value, "teacher_temp": 0.07}}
    else:
        cfg["pretrain"].setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=re.escape(where) + r" is not shorter than run " + re.escape(run)):
        Plan(cfg).run_config(run)


def test_a_warmup_left_at_its_default_is_checked_too():
    """A recipe that leaves DINO's teacher-temperature warm-up unset gets DinoConfig's 37,500
    steps: an ImageNet-1k run of 100 epochs (41,705 steps) passes, one of 90 (37,535) too, 80 not."""
    from webssl_repro.recipes import SCHEDULE_DEFAULTS

    cfg = load_config(REPO / "config/paper.yaml")
    cfg["pretrain"].pop("in1k")
    cfg["pretrain"]["dino"]["warmup_steps"] = 20000
    cfg["labels"]["in1k_epochs"] = 90
    Plan(cfg).run_config("dino1b-in1k-224")
    cfg["labels"]["in1k_epochs"] = 80
    with pytest.raises(ConfigError, match=r"pretrain\.dino\.warmup_teacher_temp_steps \(unset: the default\): 37500 "
                                          r"is not shorter than run dino1b-in1k-224, 33,364 steps.*pretrain\.in1k\.dino"):
        Plan(cfg).run_config("dino1b-in1k-224")
    assert SCHEDULE_DEFAULTS["dino"]["warmup_teacher_temp_steps"] == 37500


def test_a_flat_teacher_temperature_has_no_warmup_to_check():
    """Mini keeps the teacher at 0.04 throughout (warmup_teacher_temp == teacher_temp): its
    20-step "warm-up" may outlast a 4-step test run; lifting the end temperature makes it real."""
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["labels"]["samples"]["2b"] = 128  # 4 steps of 32
    cfg["pretrain"]["dino"]["warmup_steps"] = 2
    assert Plan(cfg).run_config("dino1b-full2b-224")["recipe"]["warmup_teacher_temp_steps"] == 20
    cfg["pretrain"]["dino"]["teacher_temp"] = 0.07
    with pytest.raises(ConfigError, match=r"pretrain\.dino\.warmup_teacher_temp_steps: 20 is not shorter"):
        Plan(cfg).run_config("dino1b-full2b-224")


def test_schedule_defaults_are_the_method_configs():
    """The DAG checks warm-ups against the run's length without torch: its copy of each method
    config's batch size and warm-ups must be theirs."""
    from webssl_repro.methods.clip import ClipConfig
    from webssl_repro.methods.dino import DinoConfig
    from webssl_repro.methods.mae import MaeConfig
    from webssl_repro.recipes import SCHEDULE_DEFAULTS

    for method, cls in (("dino", DinoConfig), ("mae", MaeConfig), ("clip", ClipConfig)):
        defaults = cls()
        assert {k: getattr(defaults, k) for k in SCHEDULE_DEFAULTS[method]} == SCHEDULE_DEFAULTS[method], method


def test_the_dry_run_stops_at_a_warmup_longer_than_its_run(workflow_dir):
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    config["pretrain"]["in1k"] = {"dino": {"warmup_steps": 500}}
    (workflow_dir / "long.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "long.yaml")
    assert proc.returncode != 0
    assert "pretrain.in1k.dino.warmup_steps: 500 is not shorter than run dino" in proc.stdout + proc.stderr


def test_run_sources_and_tolerances_are_checked_when_the_plan_is_made():
    """A run_sources key outside the grid, a checkpoint of another run, a download below the
    paper scale or a misspelt tolerance metric stop the dry run, each by its key."""
    paper = load_config(REPO / "config/paper.yaml")

    def plan_with(section: str, key: str, value) -> Plan:
        cfg = copy.deepcopy(paper)
        cfg.setdefault(section, {})[key] = value
        return Plan(cfg)

    ok = {"dino2b-heavy2b-224": {"checkpoint": "facebook/webssl-dino2b-heavy2b-224"}}
    assert "dino2b-heavy2b-224" in plan_with("pretrain", "run_sources", ok).run_sources
    with pytest.raises(ConfigError, match=r"run_sources.dino2b-heavyy2b-224: not a run of this config"):
        plan_with("pretrain", "run_sources", {"dino2b-heavyy2b-224": {"checkpoint": "facebook/webssl-dino2b-heavyy2b-224"}})
    with pytest.raises(ConfigError, match=r"run_sources.dino2b-heavy2b-224.checkpoint: 'facebook/webssl-dino7b"):
        plan_with("pretrain", "run_sources", {"dino2b-heavy2b-224": {"checkpoint": "facebook/webssl-dino7b-full8b-518"}})
    mini = load_config(REPO / "config/mini.yaml")
    mini["pretrain"]["run_sources"] = ok
    with pytest.raises(ConfigError, match=r"downloaded, which only the paper scale does \(this is 'mini'\)"):
        Plan(mini)
    mini["pretrain"]["run_sources"] = {"dino2b-heavy2b-224": {**ok["dino2b-heavy2b-224"], "path": "/ckpt/x"}}
    assert Plan(mini).import_command("dino2b-heavy2b-224").endswith("--path /ckpt/x")
    mini["seeds"] = [0, 1]
    with pytest.raises(ConfigError, match=r"seeds \[0, 1\]: each seed would import the same released encoder"):
        Plan(mini)
    with pytest.raises(ConfigError, match=r"check.tolerances: unknown metric\(s\) \['avg'\]"):
        plan_with("check", "tolerances", {"avg": 1.0, "Average": 1.0})
    assert plan_with("check", "tolerances", {"Average": 1.0, "alignment/llama3-8b": 0.01}).published is False


def test_profile_resources_that_read_unset_variables_stop_the_dry_run():
    from webssl_repro.plan_checks import check_profile_environment

    args = ["tmpdir=system_tmpdir", "slurm_account=$SLURM_ACCOUNT", "slurm_partition='${SLURM_PARTITION}'", "runtime=60"]
    check_profile_environment(args, {"SLURM_ACCOUNT": "acme", "SLURM_PARTITION": "gpu"})
    check_profile_environment(None, {})
    with pytest.raises(ConfigError, match=r"slurm_partition reads \$SLURM_PARTITION. Export"):
        check_profile_environment(args, {"SLURM_ACCOUNT": "acme"})
