"""The DAG: run grid, targets, resources, dry runs, lint and the published render."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, snakemake
from webssl_repro.config import ConfigError, load_config, validate_config
from webssl_repro.paper import specs
from webssl_repro.runs import Run
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


def test_the_published_scale_has_no_data_run_or_eval_rules(workflow_dir):
    """Nothing at the published scale can write a corpus or a run into the checked-in
    results/published/; asking for fig8 there says why it is not built."""
    listed = snakemake(workflow_dir, "--list-rules", "--configfile", "config/published.yaml").stdout.splitlines()
    rules = {line.split()[0] for line in listed if line.strip()}
    assert {"render_table", "render_figure", "check", "report", "fig8"} <= rules
    assert all("(" in line for line in listed if line.strip()), listed  # each rule says what it is for
    assert "fig3 (Target: Scaling model size: Web-DINO vs CLIP on MC-2B (2B seen, 224 px))" in listed
    assert not {"shards", "in1k_data", "evalset", "text_filter", "pretrain_single", "vqa", "classic"} & rules
    fig8 = snakemake(workflow_dir, "-n", "fig8", "--configfile", "config/published.yaml")
    assert fig8.returncode != 0 and "fig8 is not built at scale published" in fig8.stdout + fig8.stderr


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
    readme = (REPO / "README.md").read_text()
    assert f"(`{total[0]}`)" in readme  # the README quotes this dry run
    jobs = int(re.search(r"^total\s+(\d+)$", out, re.M)[1])
    assert f"--dag draws all {jobs:,} jobs" in readme
    # Every job fits the partition's limit; the longest run is a chain of such jobs.
    limit = plan.config["resources"]["max_runtime_min"]
    runtimes = [int(x) for x in re.findall(r"runtime=(\d+)", out)]
    assert runtimes and max(runtimes) == limit
    per_target = snakemake(workflow_dir, "-n", "table6", "--configfile", "config/paper.yaml")
    assert "table6: 5 runs," in per_target.stdout + per_target.stderr
    assert "vqa_control" not in out  # at paper scale the paper's numbers show the probe reads images


def test_unbuildable_items_are_named_not_dropped():
    """An item the scale cannot build is listed, with why, in the message of ``all``."""
    config = load_config(REPO / "config/paper.yaml")
    config.update(items=[*config["items"], "table14"], stages=["data", "pretrain", "vqa"])
    plan = Plan(config)
    assert "table14" not in plan.items and "table7" not in plan.items
    assert plan.skipped_items["table14"] == ("off-the-shelf models only, none imported (pretrain.run_sources): "
                                             "see the published scale")
    assert plan.skipped_items["table7"] == "needs stages classic"
    assert "not built at this scale: " in plan.target_message() and "table14 (off-the-shelf" in plan.target_message()
    assert Plan(load_config(REPO / "config/paper.yaml")).skipped_items == {}


def test_an_evaluation_of_an_unknown_run_or_seed_names_it():
    """Snakemake alone reports only a missing encoder for these."""
    plan = Plan(load_config(REPO / "config/mini.yaml"))
    assert plan.evaluated_encoder("dino2b-full2b-224") == "results/mini/runs/dino2b-full2b-224/encoder.safetensors"
    with pytest.raises(ConfigError, match=r"evals/dino2b-full2b-224.s1: seed 1 is not in seeds \[0\]$"):
        plan.evaluated_encoder("dino2b-full2b-224.s1")
    with pytest.raises(ConfigError, match=r"evals/dino2b-full2b-378: dino2b-full2b-378 is not a run of this "
                                          r"config's items nor of pretrain.run_sources; the runs are dino1b-full2b-224, "):
        plan.evaluated_encoder("dino2b-full2b-378")


def test_runs_target_pretrains_the_grid_also_without_evaluation_stages():
    config = load_config(REPO / "config/mini.yaml")
    plan = Plan(config)
    assert plan.run_targets() == [f"results/mini/runs/{r}/encoder.safetensors" for r in plan.item_runs]
    assert len(plan.run_targets()) == 30
    pretrain_only = Plan({**config, "stages": ["data", "pretrain"]})
    assert pretrain_only.item_runs == () and pretrain_only.run_targets() == plan.run_targets()
    assert pretrain_only.target_message().endswith("; `snakemake runs` pretrains all 30 runs of the items")
    assert pretrain_only.vqa_controls() == []
    seeded = Plan({**config, "seeds": [0, 1]})
    assert len(seeded.run_targets()) == 60 and "results/mini/runs/dino1b-full2b-224.s1/encoder.safetensors" in \
        seeded.run_targets()
    assert Plan({**config, "stages": ["data"]}).run_targets() == []


def test_vqa_controls_run_only_with_the_vqa_stage():

    config = load_config(REPO / "config/mini.yaml")
    assert Plan(config).vqa_controls() == ["pixels", "blind"]
    without = Plan({**config, "stages": ["data", "pretrain", "classic", "alignment"]})
    assert without.vqa_controls() == [] and without.control_args() == ""
    assert not [t for t in without.check_inputs() if "/vqa.json" in t and "/controls/" in t]


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


def test_lint_is_clean(workflow_dir):
    for configfile in ("config/mini.yaml", "config/paper.yaml", "config/published.yaml"):
        proc = snakemake(workflow_dir, "--lint", "--configfile", configfile)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Congratulations" in proc.stdout + proc.stderr
    # snakefmt (the catalog's formatting check), at pyproject.toml's line length
    snakefmt = Path(sys.executable).parent / "snakefmt"
    proc = subprocess.run([str(snakefmt), "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
    last = [c.strip() for c in [line for line in md.splitlines() if line.startswith("|")][-1].split("|")[1:-1]]
    assert last[:6] == ["Web-DINO ViT-7B", "SSL", "MC-2B", "8.0B", "518", "59.9"] and last[-1] == "0.362"
    # A second run schedules nothing.
    again = snakemake(workflow_dir, "-n", "all", "--configfile", "config/published.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    # Other alignment language models change Fig. 9's bars only (and the check and report)
    other = snakemake(workflow_dir, "-n", "all", "--configfile", "config/published.yaml",
                      "--config", 'evaluate={"alignment": {"language_models": ["llama3.1-8b"]}}')
    rerun = re.findall(r"output: (\S+)", other.stdout)
    assert sorted(p for p in rerun if "/figures/" in p or "/tables/" in p) == [
        "paper/published/figures/fig9.pdf,"], other.stdout[-3000:]


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
    local = workflow_dir / "ckpt" / "dino2b-heavy"
    config["pretrain"]["run_sources"] = {
        "dino2b-heavy2b-224": {"checkpoint": "facebook/webssl-dino2b-heavy2b-224", "path": str(local)}}
    (workflow_dir / "released.yaml").write_text(yaml.safe_dump(config))
    # a local copy that is not there stops the dry run, by its key
    proc = snakemake(workflow_dir, "-n", "-p", "all", "--configfile", "released.yaml")
    assert proc.returncode != 0 and re.search(rf"pretrain.run_sources.dino2b-heavy2b-224.path: {local} does not "
                                              "exist", proc.stdout + proc.stderr), proc.stdout[-2000:]
    local.mkdir(parents=True)  # an HF directory
    proc = snakemake(workflow_dir, "-n", "-p", "all", "--configfile", "released.yaml")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"import_released\s+1\b", out) and re.search(r"pretrain_multinode\s+29\b", out)
    assert f"--checkpoint facebook/webssl-dino2b-heavy2b-224 --path {local}" in out
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
    """Paper scale: the VQA probe's 8 torchrun ranks each load the 8B LM before FSDP shards it,
    so it takes a whole node; the classic probes and the alignment job run the encoder on one GPU
    and take an eighth; the language_features job of Llama-3.1-70B spreads it over 4 GPUs
    (resources.lm_gpus), the 8B model's takes one. Mini: no GPU, defaults."""
    paper = Plan(load_config(REPO / "config/paper.yaml"))
    node = paper.config["resources"]["mem_mb_per_node"]
    assert paper.eval_resources("vqa") == {"gpu": 8, "nodes": 1, "runtime": 1440, "mem_mb": node, "cpus_per_task": 64}
    for kind in ("classic", "alignment"):
        assert paper.eval_resources(kind) == {"gpu": 1, "nodes": 1, "runtime": 1440, "mem_mb": node // 8,
                                              "cpus_per_task": 8}
    assert paper.eval_threads("classic") == 8
    assert paper.language_features_resources("llama3.1-70b") == {"gpu": 4, "nodes": 1, "runtime": 1440,
                                                                 "mem_mb": node // 2, "cpus_per_task": 32}
    assert paper.language_features_resources("llama3.1-8b") == {"gpu": 1, "nodes": 1, "runtime": 1440,
                                                                "mem_mb": node // 8, "cpus_per_task": 8}
    # named by its hub id, the 70B model gets the GPUs set for its lm_paths key
    assert paper.language_features_resources("meta-llama/Llama-3.1-70B")["gpu"] == 4
    assert paper.language_features_resources("meta-llama/Llama-3.1-8B")["gpu"] == 1
    mini = Plan(load_config(REPO / "config/mini.yaml"))
    assert mini.eval_resources("vqa") == {"gpu": 0, "runtime": 60} and mini.eval_threads() == 1
    assert mini.language_features_resources("minilm") == {"gpu": 0, "runtime": 60}


def test_language_features_are_one_job_per_model_rerun_by_their_weights(tmp_path):
    """Each LM's features are one job's output that every alignment job reads. Its params hold
    which weights the name loads, at which pinned revision (not k or the other LMs); a local copy's
    config, tokenizer and weight files are its inputs, so replacing them reruns it; a hub id, or
    a path this host does not see, adds none."""
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "added_tokens.json", "README.md", "generation_config.json"):
        (folder / name).write_text("{}")
    cfg = load_config(REPO / "config/paper.yaml")
    cfg["evaluate"]["alignment"]["lm_paths"]["llama3.1-8b"] = str(folder)
    with pytest.raises(ConfigError, match=r"lm_revisions: 'd04e592\w+' pins a hub id's commit, but "
                                          r"evaluate.alignment.lm_paths.llama3.1-8b is a local directory"):
        Plan(cfg)  # config/paper.yaml pins the hub's copy, which a local one does not follow
    cfg["evaluate"]["alignment"]["lm_revisions"]["llama3.1-8b"] = None  # an overlay's null unsets it
    validate_config(cfg)
    plan = Plan(cfg)
    assert plan.language_features_paths() == ["results/paper/language_features/llama3.1-8b.pt",
                                              "results/paper/language_features/llama3.1-70b.pt"]
    assert [Path(p).name for p in plan.language_weights("llama3.1-8b")] == [
        "added_tokens.json", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]
    assert plan.language_weights("llama3.1-70b") == []  # a hub id
    assert json.loads(plan.language_features_json("llama3.1-8b")) == {"scale": "paper",
                                                                       "lm_paths": {"llama3.1-8b": str(folder)}}
    assert json.loads(plan.language_features_json("llama3.1-70b")) == {
        "scale": "paper", "lm_paths": {"llama3.1-70b": "meta-llama/Llama-3.1-70B"},
        "lm_revisions": {"llama3.1-70b": "349b2ddb53ce8f2849a6c168a81980ab25258dac"}}
    cfg["evaluate"]["alignment"]["k"] = 5  # the score's, not the features'
    assert Plan(cfg).language_features_json("llama3.1-8b") == plan.language_features_json("llama3.1-8b")
    cfg["evaluate"]["alignment"]["lm_revisions"] = {"llama3.1-70b": "abc123"}  # the features': the 70B's only
    pinned = Plan(cfg)
    assert pinned.language_features_json("llama3.1-8b") == plan.language_features_json("llama3.1-8b")
    assert json.loads(pinned.language_features_json("llama3.1-70b"))["lm_revisions"] == {"llama3.1-70b": "abc123"}
    cfg["evaluate"]["alignment"]["language_models"] = ["llama3.1-8b", "meta-llama/Llama-3.1-70B"]
    assert json.loads(Plan(cfg).language_features_json("meta-llama/Llama-3.1-70B"))["lm_revisions"] == {
        "meta-llama/Llama-3.1-70B": "abc123"}  # named by its hub id, pinned by its short name
    del cfg["evaluate"]["alignment"]["lm_revisions"]
    cfg["evaluate"]["alignment"]["language_models"] = ["llama3.1-8b", "llama3.1-70b"]
    cfg["evaluate"]["alignment"]["lm_paths"]["llama3.1-8b"] = str(tmp_path / "not-here")
    assert Plan(cfg).language_weights("llama3.1-8b") == []
    assert re.fullmatch(plan.language_model_pattern(), "llama3.1-8b")
    assert not re.fullmatch(plan.language_model_pattern(), "llama3x1-8b")  # the dot is literal


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
    assert what["train"] == {"lr": 1e-4} and json.loads(plan.pretrain_settings_json(run)) == {
        "train": {"log_every": 7, "checkpoint_every": 900}}
    assert merge_nested(what, json.loads(plan.pretrain_settings_json(run))) == plan.run_config(run)
    vqa = json.loads(plan.eval_config_json("vqa"))
    assert "local_dir" not in vqa["data"]["alignment"] and vqa["data"]["alignment"]["repo"]
    # the memory knobs: a global batch's gradient does not depend on its micro-batches
    assert "gradient_checkpointing" not in vqa and "micro_batch_size" not in vqa.get("stage1", {})
    assert json.loads(plan.settings_json("vqa"))["stage2"] == {"micro_batch_size": 4}
    assert json.loads(plan.settings_json("vqa"))["data"]["alignment"]["local_dir"] == "/scratch/cambrian"
    classic = json.loads(plan.eval_config_json("classic"))
    assert "workers" not in classic and classic["precision"] == "bf16"
    assert json.loads(plan.settings_json("classic"))["workers"] == 7
    for kind in ("vqa", "classic", "alignment"):
        full = {"scale": "paper", **{k: v for k, v in cfg["evaluate"][kind].items() if k != "controls"}}
        assert merge_nested(json.loads(plan.eval_config_json(kind)), json.loads(plan.settings_json(kind))) == full


def test_in_memory_loader_workers_are_a_setting_streamed_ones_a_param(tmp_path):
    """An in-memory corpus builds the same batches with any number of loader workers, so
    ``pretrain.loader`` leaves the runs' params and checkpoint stamps as they were; a streamed
    corpus's order follows its readers, so there a new worker count retrains."""
    from webssl_repro.settings import merge_nested
    from webssl_repro.train.fingerprint import run_fingerprint

    run, data = "dino1b-full2b-224", tmp_path / "manifest.json"
    data.write_text("{}")
    plain = Plan(load_config(REPO / "config/mini.yaml"))
    plans = {}
    for name, loader in {"workers": {"workers": 2}, "stream": {"stream": True, "workers": 2},
                         "stream1": {"stream": True, "workers": 1}}.items():
        cfg = load_config(REPO / "config/mini.yaml")
        cfg["pretrain"]["loader"] = loader
        plans[name] = Plan(cfg)
    assert plans["workers"].run_config_json(run) == plain.run_config_json(run)
    assert json.loads(plans["workers"].pretrain_settings_json(run))["loader"] == {"workers": 2}
    assert "loader" not in json.loads(plain.pretrain_settings_json(run))
    full = plans["workers"].run_config(run)
    assert merge_nested(json.loads(plans["workers"].run_config_json(run)),
                        json.loads(plans["workers"].pretrain_settings_json(run))) == full
    assert run_fingerprint(full, [data]) == run_fingerprint(plain.run_config(run), [data])
    streamed = {k: plans[k] for k in ("stream", "stream1")}
    assert json.loads(streamed["stream"].run_config_json(run))["loader"] == {"stream": True, "workers": 2}
    assert "loader" not in json.loads(streamed["stream"].pretrain_settings_json(run))
    assert run_fingerprint(streamed["stream"].run_config(run), [data]) != run_fingerprint(
        streamed["stream1"].run_config(run), [data])


def test_filter_workers_are_a_setting_the_filter_job_still_reads(monkeypatch, tmp_path):
    """``data.filter.workers`` (and ``threads``, ``cache_path``) change how a filter runs, not the
    shards it keeps: changing them must leave the filter rules' params as they were (else every
    filter reruns and every light / heavy run retrains), and the job must still get them."""
    import shlex

    from webssl_repro.data import stages

    cfg = load_config(REPO / "config/paper.yaml")
    before = Plan(cfg)
    cfg["data"]["filter"] = {**cfg["data"]["filter"], "workers": 3}
    after = Plan(cfg)
    for plan in (before, after):
        assert "workers" not in plan.filter_command("light", 5) and "workers" not in plan.data_config_json("filter")
    assert before.filter_command("light", 5) == after.filter_command("light", 5)
    assert before.filter_command("heavy") == after.filter_command("heavy")
    assert after.filter_settings(whole=True) == ""  # merging parts runs no filter
    seen = {}
    monkeypatch.setattr(stages, "manifest_shards", lambda path: [])
    monkeypatch.setattr(stages, "filter_corpus", lambda variant, section, shards, out, part: seen.update(section)
                        or {"kept": 0})
    argv = shlex.split(f"{after.filter_command('light', 5)} {after.filter_settings()} --out {tmp_path / 'p.json'}")
    assert argv[:2] == ["webssl-repro", "data"] and stages.main(argv[2:]) == 0
    assert seen == {**cfg["data"]["filter"]}


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


def test_a_path_of_another_scale_or_run_names_what_builds_it(workflow_dir):
    """A target under another scale's tree (the config left out) names the config to add; one
    under runs/ of a run the config has not lists the runs: not "No rule to produce"."""
    out = lambda proc: proc.stdout + proc.stderr  # noqa: E731
    proc = snakemake(workflow_dir, "-n", "paper/published/figures/fig3.pdf")
    assert proc.returncode != 0 and ("paper/published/figures/fig3.pdf belongs to scale published, and this "
                                     "config is scale mini: add `--configfile config/published.yaml`") in out(proc)
    proc = snakemake(workflow_dir, "-n", "results/paper/evals/dino2b-heavy2b-224/vqa.json")
    assert proc.returncode != 0 and "belongs to scale paper" in out(proc)
    proc = snakemake(workflow_dir, "-n", "results/mini/runs/dino9b-full2b-224/encoder.safetensors")
    assert proc.returncode != 0 and ("dino9b-full2b-224 is not a run of this config's items nor of "
                                     "pretrain.run_sources; the runs are dino1b-full2b-224") in out(proc)
    proc = snakemake(workflow_dir, "-n", "paper/published/figures/fig3.pdf", "--configfile", "config/published.yaml")
    assert proc.returncode == 0 and "rule other_scale" not in proc.stdout, out(proc)[-2000:]


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


def test_schedule_defaults_are_the_method_configs():
    """The DAG checks warm-ups against the run's length without torch: its copy of each method
    config's batch size and warm-ups must be theirs."""
    from webssl_repro.methods.clip import ClipConfig
    from webssl_repro.methods.dino import DinoConfig
    from webssl_repro.methods.mae import MaeConfig
    from webssl_repro.recipes import SCHEDULE_DEFAULTS

    from webssl_repro.resources import COMPANION_DEFAULTS

    for method, cls in (("dino", DinoConfig), ("mae", MaeConfig), ("clip", ClipConfig)):
        defaults = cls()
        assert {k: getattr(defaults, k) for k in SCHEDULE_DEFAULTS[method]} == SCHEDULE_DEFAULTS[method], method
    for method, cls in (("mae", MaeConfig), ("clip", ClipConfig)):  # the runtime estimate's decoder / text tower
        assert {k: getattr(cls(), k) for k in COMPANION_DEFAULTS[method]} == COMPANION_DEFAULTS[method], method


def test_runtime_estimate_counts_the_mae_decoder_and_the_clip_text_tower(paper_plan):
    """MAE's decoder (every patch) and CLIP's text tower (77 tokens) are trained beside the
    encoder: at ViT-1B, 512-d x 8 blocks over 257 tokens add ~10 % to MAE's encoder on its 65
    visible ones, and a 1280-d x 32-block text tower ~16 % to CLIP's; a recipe's own sizes count."""
    from webssl_repro.resources import FWD_BWD, MAE_KEEP, block_params, forward_flops, samples_of

    arch = paper_plan.config["labels"]["sizes"]["1b"]

    def gelu_blocks(width, depth, tokens):  # 2 FLOPs per weight per token, plus QK^T and AV
        return 2 * depth * block_params("mae", width, 4 * width) * tokens + 4 * depth * tokens ** 2 * width

    for run, encoder, companion in (
            ("mae1b-full2b-224", forward_flops("mae", arch, 224, MAE_KEEP), gelu_blocks(512, 8, 16 * 16 + 1)),
            ("clip1b-full2b-224", forward_flops("clip", arch, 224), gelu_blocks(1280, 32, 77))):
        samples = samples_of(Run.parse(run), paper_plan.config)
        res = paper_plan.pretrain_resources(run)  # CLIP's blocks recomputed: its forward runs twice
        assert res.train_flops == pytest.approx(
            (FWD_BWD + res.recomputed) * (encoder + companion) * samples, rel=1e-12)
        assert 0.09 < companion / encoder < 0.17, run
    cfg = copy.deepcopy(paper_plan.config)
    cfg["pretrain"]["mae"]["decoder_depth"] = 4
    assert Plan(cfg).pretrain_resources("mae1b-full2b-224").train_flops == pytest.approx(
        FWD_BWD * (forward_flops("mae", arch, 224, MAE_KEEP) + gelu_blocks(512, 4, 257))
        * samples_of(Run.parse("mae1b-full2b-224"), cfg), rel=1e-12)

